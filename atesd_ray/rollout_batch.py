"""The rollout batch: the wire format from a rollout to the teacher and the student, defined once.

One row per response, as a ``verl.DataProto``:

- tensors: ``prompt_ids`` / ``prompt_mask`` [B, P] (left-padded), ``response_ids`` /
  ``response_mask`` [B, R] (right-padded), ``reward`` [B] (1.0 when the graded answer is right), and
  ``rollout_logprobs`` [B, R], the engine's log-probs of the tokens it sampled: only where the
  student sampled every response token in one pass (MOTAB's stitched trajectories have none).
  A producer may add per-token masks of its own (MOTAB's ``distill_mask`` / ``nll_mask``);
- non-tensors: ``uid`` (record id), ``sample`` (index among the record's samples), ``problem``,
  ``reference``, ``answer``, ``difficulty``, ``source`` (the record's), ``finish_reason`` ("stop" | "length"),
  ``response_text``, ``extracted`` (the answer the grader read, or None);
- meta: ``weight_version`` (of the weights that wrote it), ``step``, ``time_s``, and for a rollout
  chunk its ``chunk``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from atesd_ray.grading import Grade
from atesd_ray.sequences import left_pad, right_pad

if TYPE_CHECKING:
    from verl import DataProto


def rollout_batch(
    records: Sequence[dict],
    samples: Sequence[int],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    finish_reasons: Sequence[str],
    texts: Sequence[str],
    grades: Sequence[Grade],
    meta: dict,
    logprobs: Sequence[Sequence[float] | None] | None = None,
    masks: dict[str, Sequence[Sequence[int]]] | None = None,
) -> DataProto:
    """Row i: ``records[i]``'s sample ``samples[i]``, ``responses[i]`` after ``prompts[i]``, how it
    finished, its decoded text and its grade; ``logprobs[i]``, the engine's log-prob of each
    response token (rows without any get zeros, and the batch none when ``logprobs`` is None);
    ``masks``: per-token masks by name, one row per response."""
    from verl import DataProto

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    response_ids, response_mask = right_pad(responses, pad_id)
    tensors = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "response_ids": response_ids,
        "response_mask": response_mask,
        "reward": torch.tensor([float(g.correct) for g in grades]),
    }
    if logprobs is not None:
        tensors["rollout_logprobs"] = torch.zeros(response_ids.shape, dtype=torch.float32)
        for i, row in enumerate(logprobs):
            if row:
                tensors["rollout_logprobs"][i, : len(row)] = torch.tensor(row)
    for name, rows in (masks or {}).items():
        tensors[name] = right_pad(rows, 0, response_ids.shape[1])[0]

    def column(values) -> np.ndarray:
        return np.array(list(values), dtype=object)

    return DataProto.from_dict(
        tensors=tensors,
        non_tensors={
            "uid": column(r["id"] for r in records),
            "sample": column(samples),
            "problem": column(r["problem"] for r in records),
            "reference": column(r["reference"] for r in records),
            "answer": column(r["answer"] for r in records),
            "difficulty": column(r.get("difficulty") for r in records),
            "source": column(r.get("source") for r in records),
            "finish_reason": column(finish_reasons),
            "response_text": column(texts),
            "extracted": column(g.answer for g in grades),
        },
        meta_info=meta,
    )
