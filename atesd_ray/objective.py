"""The student-side half of an algorithm (:class:`Objective`), and the batch helpers objectives share.

The student trainer (``workers/student.py``) runs every objective in one loop:

1. ``prepare(trainer, step, *inputs)`` on every rank: the step's object refs are resolved inside
   the actor (never in the driver) and the batch is laid out as per-row tensors (``Prepared.rows``);
2. micro-batches of this rank's rows go through the FSDP root's forward, which computes the final
   hidden states at the valid response positions and hands them to ``loss`` (:class:`Response`),
   so that the LM head is applied chunk by chunk while it is unsharded; gradients accumulate;
3. ``metrics(totals, prepared)`` reads the statistics summed over micro-batches and ranks; the
   trainer then clips, steps (unless the loss or the gradient is non-finite on any rank) and
   schedules the learning rate.

Losses are sums divided by a normalizer of the whole batch (say, its valid response tokens over all
ranks, ``Trainer.total_over_ranks``), so N ranks give the gradient of one process that saw it all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import ray
import torch
from torch import Tensor, nn

from atesd_ray.losses import TeacherTargets

if TYPE_CHECKING:  # verl (and transformers behind it) load where batches are built, not with the config
    from verl import DataProto

ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
# the rows of the student's own samples: with the engine's log-probs of them, which the student's
# step compares with its own (the train-inference gap, atesd_ray/rollout_gap.py)
ON_POLICY_KEYS = (*ROLLOUT_KEYS, "rollout_logprobs")
TEACHER_KEYS = (
    "teacher_logprobs",
    "teacher_ids",
    "teacher_sampled_logprob",
    "teacher_tail",
    # the teacher-signal transforms' (atesd_ray/teacher_signal.py), only when they are on
    "teacher_shift",
    "teacher_shift_tail",
    "teacher_contrast",
    "teacher_weight",
)


@dataclass
class Response:
    """The student at the valid response positions of one micro-batch, flattened over them."""

    hidden: Tensor  # [N, H] final hidden states
    tokens: Tensor  # [N] the response tokens there
    valid: Tensor  # [B, W] bool: which response positions they are
    head: nn.Module  # hidden states -> logits


@dataclass
class Prepared:
    """One step's batch on one rank: per-row tensors (micro-batches are cut from them), the factor
    each micro-batch's loss is multiplied by, and what ``metrics`` needs besides the sums."""

    rows: dict[str, Tensor]
    scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0]


class Trainer(Protocol):
    """What ``prepare`` may use of the student rank."""

    cfg: Any
    tokenizer: Any
    rank: int
    world: int

    def total_over_ranks(self, mask: Tensor) -> float: ...

    def student_prompts(self, problems: list[str]) -> list[list[int]]: ...


class Objective:
    """Subclasses name their summed statistics (``stats``; the first is the objective's loss sum)."""

    stats: ClassVar[tuple[str, ...]]

    def prepare(self, trainer: Trainer, step: int, *inputs: Any) -> Prepared:
        raise NotImplementedError

    def loss(self, out: Response, rows: dict[str, Tensor], prepared: Prepared) -> tuple[Tensor, Tensor]:
        """(the micro-batch's loss, already scaled, to backpropagate; [len(stats)] float sums)."""
        raise NotImplementedError

    def metrics(self, totals: dict[str, float], prepared: Prepared) -> dict:
        """The step's metrics from the summed statistics; ``loss`` among them."""
        raise NotImplementedError


def concat(parts: list[DataProto]) -> tuple[DataProto, list[dict]]:
    """One batch from per-chunk batches, and their per-chunk meta (which differs, e.g. timings).

    Each chunk is padded to its own widths (another replica, other prompts), so per-position
    tensors are first padded to the widest chunk: prompts on the left, responses and per-token
    targets on the right, with masks 0 over the padding.
    """
    from verl import DataProto

    metas = [p.meta_info for p in parts]
    for p in parts:
        p.meta_info = {}
    for key in parts[0].batch.keys():
        if parts[0].batch[key].dim() < 2:
            continue
        width = max(p.batch[key].shape[1] for p in parts)
        for p in parts:
            gap = width - p.batch[key].shape[1]
            if gap:
                side = [gap, 0] if key.startswith("prompt_") else [0, gap]
                p.batch[key] = torch.nn.functional.pad(p.batch[key], [0, 0] * (p.batch[key].dim() - 2) + side)
    return DataProto.concat(parts), metas


def scatter_rows(scored: DataProto | None, rows: Tensor) -> DataProto:
    """A routed teacher's targets of its ``rows`` [B] (bool) of a chunk as a chunk-sized batch: zeros
    on the other rows and ``teacher_rows`` marking its own (what :func:`merge_routed` takes)."""
    from verl import DataProto

    tensors = {"teacher_rows": rows.float()}
    for k, v in {} if scored is None else scored.batch.items():
        tensors[k] = torch.zeros((len(rows), *v.shape[1:]), dtype=v.dtype)
        tensors[k][rows] = v
    return DataProto.from_dict(
        tensors=tensors, meta_info={"time_s": 0.0} if scored is None else scored.meta_info
    )


def merge_routed(parts: list[DataProto]) -> DataProto:
    """One chunk's teacher targets from the chunk as each routed teacher scored it (multi-teacher
    OPD): each part holds its teacher's rows and ``teacher_rows`` [B], 1 on them; every row must be
    some teacher's."""
    from verl import DataProto

    owned = [p.batch["teacher_rows"].bool() for p in parts]
    missing = ~torch.stack(owned).any(0)
    if missing.any():
        raise ValueError(f"rows {missing.nonzero().flatten().tolist()} were routed to no teacher")
    scored = [(p, rows) for p, rows in zip(parts, owned, strict=True) if rows.any()]
    keys = [k for k in scored[0][0].batch.keys() if k != "teacher_rows"]
    for part, _ in scored[1:]:
        if set(part.batch.keys()) - {"teacher_rows"} != set(keys):
            raise ValueError(
                f"routed teachers sent different targets: {sorted(keys)} and {sorted(part.batch.keys())}"
            )
    tensors = {k: scored[0][0].batch[k].clone() for k in keys}
    for part, rows in scored[1:]:
        for k in keys:
            tensors[k][rows] = part.batch[k][rows]
    meta = {"time_s": max(p.meta_info.get("time_s", 0.0) for p in parts)}
    return DataProto.from_dict(tensors=tensors, meta_info=meta)


def fetch(refs: list[ray.ObjectRef]) -> tuple[DataProto, list[dict]]:
    """The chunks behind ``refs`` as one batch (see :func:`concat`)."""
    return concat(ray.get(refs))


def take(data: DataProto, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of ``keys`` that ``data`` holds."""
    return {k: data.batch[k] for k in keys if k in data.batch.keys()}


def teacher_targets(rows: dict[str, Tensor], at: Tensor) -> TeacherTargets:
    """The teacher's targets (``TEACHER_KEYS`` rows) at the response positions ``at`` [B, W]."""

    def part(key: str) -> Tensor | None:
        return None if key not in rows else rows[key][at]

    ids, contrast = part("teacher_ids"), part("teacher_contrast")
    return TeacherTargets(
        rows["teacher_logprobs"][at],
        None if ids is None else ids.long(),
        rows["teacher_sampled_logprob"][at],
        part("teacher_tail"),
        part("teacher_shift"),
        part("teacher_shift_tail"),
        None if contrast is None else contrast.bool(),
        part("teacher_weight"),
    )


def rollout_metrics(step: int, rollout: DataProto, meta: list[dict]) -> dict:
    """What the step's rollouts say about generation (the same on every rank)."""
    lengths = rollout.batch["response_mask"].sum(-1).float()
    finish = rollout.non_tensor_batch["finish_reason"]
    version = min(m["weight_version"] for m in meta)
    return {
        "accuracy": float(rollout.batch["reward"].mean()),
        "response_len": float(lengths.mean()),
        "truncated_frac": float((finish == "length").mean()),
        "rollout_version": version,
        "staleness": step - version,
        "time_rollout_s": max(m["time_s"] for m in meta),
    }


def teacher_metrics(teacher: DataProto, meta: list[dict]) -> dict:
    """What the step's teacher targets say (the same on every rank)."""
    out = {"time_teacher_s": max(m["time_s"] for m in meta)}
    keys = teacher.batch.keys()
    if "grounding" in keys:  # measured when the controller asked for it
        out["grounding"] = float(teacher.batch["grounding"].mean())
    # the privileged context and the signal transforms, when they are on: the share of rows that
    # read a correct peer / have a negative context, and the gate's mean weight over response tokens
    for key, name in (("hindsight", "hindsight_frac"), ("contrast_row", "contrast_frac")):
        if key in keys:
            out[name] = float(teacher.batch[key].float().mean())
    if "teacher_weight" in keys:
        mask = teacher.batch["teacher_weight"] > 0
        out["gate_weight"] = float(teacher.batch["teacher_weight"][mask].mean()) if mask.any() else 1.0
    return out
