"""Token layout shared by every actor.

A batch of sequences is ``[left-padded prompt | right-padded response]``: prompts of shape [B, P]
and responses of shape [B, R]. With this layout the logits that predict response token j of every
row sit at the same column, P - 1 + j, whatever the prompt lengths, so any model (student on the
problem-only prompt, teacher on the privileged prompt) is scored on the same response slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (HF models assume arange otherwise)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def join(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
):
    """(input_ids, attention_mask, position_ids, response_start) of ``[prompt | response]``."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return ids, mask, position_ids(mask), prompt_ids.shape[1]


def response_slice(hidden: torch.Tensor, response_start: int, response_len: int) -> torch.Tensor:
    """The hidden states (or logits) that predict the response tokens: [B, R, ...]."""
    return hidden[:, response_start - 1 : response_start - 1 + response_len]


def rows_to_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``n`` rows (micro-batches)."""
    return [slice(s, s + size) for s in range(0, n, size)]


def response_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score fixed responses after their prompts: log-softmax(logits / ``temperature``) [B, W, V] at
    the positions that predict each response token, and the responses padded to ``width`` (default:
    the longest), ids and mask [B, W], all on the model's device. Only the logits of those
    positions are computed."""
    device = model.get_input_embeddings().weight.device
    p_ids, p_mask = left_pad(prompts, pad_id)
    r_ids, r_mask = (t.to(device) for t in right_pad(responses, pad_id, width))
    ids, mask, pos, _ = join(p_ids.to(device), p_mask.to(device), r_ids, r_mask)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=r_ids.shape[1] + 1
    ).logits
    return torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1), r_ids, r_mask


def token_logprobs(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, W] log-probs of ``ids`` [B, W] under ``logprobs`` [B, W, V]."""
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
