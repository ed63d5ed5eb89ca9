"""Batches generated in several chunks (one per rollout replica / student rank) join into one,
whatever each chunk's own prompt and response widths."""

from __future__ import annotations

import torch
from verl import DataProto

from atesd_ray.objective import concat
from atesd_ray.sequences import left_pad, right_pad, rows_to_lists


def _chunk(prompts: list[list[int]], responses: list[list[int]], k: int = 3) -> tuple[DataProto, DataProto]:
    p_ids, p_mask = left_pad(prompts, 0)
    r_ids, r_mask = right_pad(responses, 0)
    rollout = DataProto.from_dict(
        tensors={"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask,
                 "reward": torch.ones(len(prompts))},
        meta_info={"weight_version": 1},
    )  # fmt: skip
    targets = torch.arange(r_ids.numel() * k, dtype=torch.float32).view(*r_ids.shape, k) + 1
    teacher = DataProto.from_dict(
        tensors={"teacher_logprobs": targets * r_mask.unsqueeze(-1)}, meta_info={"time_s": 0.1}
    )
    return rollout, teacher


def test_chunks_of_different_widths_concatenate_aligned():
    a_prompts, a_responses = [[5, 6, 7], [8]], [[1, 2], [3, 4, 9, 9]]
    b_prompts, b_responses = [[4, 4, 4, 4, 4, 4]], [[7]]
    (ra, ta), (rb, tb) = _chunk(a_prompts, a_responses), _chunk(b_prompts, b_responses)
    targets_a, targets_b = ta.batch["teacher_logprobs"].clone(), tb.batch["teacher_logprobs"].clone()
    rollout, metas = concat([ra, rb])
    teacher, _ = concat([ta, tb])
    assert metas == [{"weight_version": 1}, {"weight_version": 1}]
    b = rollout.batch
    assert b["prompt_ids"].shape == (3, 6) and b["response_ids"].shape == (3, 4)
    # every row still holds exactly its own tokens: prompts end at the right edge, responses start at the left
    assert rows_to_lists(b["prompt_ids"], b["prompt_mask"]) == a_prompts + b_prompts
    assert rows_to_lists(b["response_ids"], b["response_mask"]) == a_responses + b_responses
    assert b["prompt_mask"][:, -1].all() and b["response_mask"][:, 0].all()
    t = teacher.batch["teacher_logprobs"]
    assert t.shape == (3, 4, 3)
    assert torch.equal(t[:2], targets_a) and torch.equal(t[2, :1], targets_b[0])
    assert (t[2, 1:] == 0).all()
