"""The chunked driver of the student's losses: per-token sums over rows of hidden states, the LM
head applied chunk by chunk under activation checkpointing, so that no [N, V] logits tensor exists."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Project = Callable[[Tensor], Tensor]


def student_logprobs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / T) in at least float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def over_chunks(
    fn: Callable[..., tuple[Tensor, ...]],
    student: Tensor,
    rows: Sequence[Tensor | None],
    project: Project | None,
    chunk_size: int,
) -> list[Tensor]:
    """Sum ``fn(logits, *rows)`` over row chunks.

    With ``project`` (the lm_head), ``student`` is hidden states and each chunk's logits are
    built inside a non-reentrant checkpoint: only the chunk's hidden states are kept for backward
    and its logits are recomputed there, so no [N, V] tensor ever exists. Without it, ``student``
    is logits and ``fn`` runs once on all of them. An empty input still runs one (empty) chunk so
    the graph reaches the parameters on every rank (FSDP needs every rank to join backward).
    """
    if project is None:
        return list(fn(student, *rows))

    def chunk_fn(hidden: Tensor, *chunk_rows: Tensor | None) -> tuple[Tensor, ...]:
        return fn(project(hidden), *chunk_rows)

    totals: list[Tensor] | None = None
    for start in range(0, max(student.shape[0], 1), chunk_size):
        part = slice(start, start + chunk_size)
        out = checkpoint(
            chunk_fn, student[part], *(None if r is None else r[part] for r in rows), use_reentrant=False
        )
        totals = list(out) if totals is None else [t + o for t, o in zip(totals, out, strict=True)]
    assert totals is not None
    return totals
