"""On-policy self-distillation with a privileged teacher: OPSD (the teacher reads the whole
reference), a fixed exposure α, and ATESD (the exposure controller picks α).

One step, as refs passed between actors: rollout -> teacher at the controller's exposure ->
student update (forward KL, or the generalized JSD, of the teacher's targets on the student's own
tokens); ``run_step`` adds the weight sync, the probe and the controller's observation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray
import torch

from atesd_ray.algorithms.base import Algorithm, Launched, launch_rollouts
from atesd_ray.losses import DistillStats, distill_loss
from atesd_ray.objective import (
    ON_POLICY_KEYS,
    TEACHER_KEYS,
    Objective,
    Prepared,
    Response,
    fetch,
    rollout_metrics,
    take,
    teacher_metrics,
    teacher_targets,
)
from atesd_ray.schema import require

if TYPE_CHECKING:
    from verl import DataProto

    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config, LossConfig
    from atesd_ray.objective import Trainer


def example_stats(rollout: DataProto, teacher: DataProto) -> dict[str, dict[str, float]]:
    """Per problem (record id), for a per-example exposure controller: the pass rate, the grounding
    g, and the sampled-token mismatch: the token mean of log p_S(y) - log p_T(y) over the student's
    own samples, an estimate of KL(p_S || p_T) that needs no extra forward pass (exact in
    expectation when the rollout and loss temperatures agree)."""
    mask = rollout.batch["response_mask"].float()
    gap = ((rollout.batch["rollout_logprobs"] - teacher.batch["teacher_sampled_logprob"]) * mask).sum(-1)
    uids = rollout.non_tensor_batch["uid"]
    out = {}
    for uid in dict.fromkeys(uids):
        rows = torch.from_numpy(uids == uid)
        out[str(uid)] = {
            "reward": float(rollout.batch["reward"][rows].mean()),
            "mismatch": float(gap[rows].sum() / mask[rows].sum().clamp(min=1.0)),
            "grounding": float(teacher.batch["grounding"][rows].mean()),
        }
    return out


class DistillObjective(Objective):
    """The distillation loss of ``algorithm.loss`` on every valid response token, summed and divided
    by the batch's valid response tokens (all ranks)."""

    stats = DistillStats.FIELDS

    def __init__(self, loss: LossConfig, per_example: bool = False):
        self.loss_cfg = loss
        self.per_example = per_example

    def prepare(self, trainer: Trainer, step: int, rollout_refs: list, teacher_refs: list) -> Prepared:
        rollout, rollout_meta = fetch(rollout_refs)
        teacher, teacher_meta = fetch(teacher_refs)
        tokens = trainer.total_over_ranks(rollout.batch["response_mask"])
        info = rollout_metrics(step, rollout, rollout_meta) | teacher_metrics(teacher, teacher_meta)
        if self.per_example:
            info["per_example"] = example_stats(rollout, teacher)
        rows = take(rollout, ON_POLICY_KEYS) | take(teacher, TEACHER_KEYS)
        return Prepared(rows, trainer.world / max(tokens, 1.0), info)

    def loss(self, out: Response, rows: dict, prepared: Prepared) -> tuple:
        targets = teacher_targets(rows, out.valid)
        loss, stats = distill_loss(out.hidden, targets, self.loss_cfg, tokens=out.tokens, project=out.head)
        return loss * prepared.scale, stats.as_tensor()

    def metrics(self, totals: dict[str, float], prepared: Prepared) -> dict:
        means = DistillStats.from_tensor(torch.tensor([totals[f] for f in self.stats])).means()
        return means | {"tokens": int(totals["tokens"])} | prepared.info


class Distill(Algorithm):
    """``opsd`` and ``fixed_exposure`` hold α at ``algorithm.alpha`` (1 and the chosen value);
    ``atesd`` lets the controller choose it (``controller.kind`` atesd, or random / linear as baselines)."""

    prefetches = True
    distills_targets = True

    def check(self, cfg: Config) -> None:
        if self.name == "atesd":
            require(
                cfg.controller.kind != "fixed",
                "controller.kind",
                "algorithm=atesd chooses the exposure (controller.kind=atesd, or random / linear as baselines); "
                "for one fixed exposure use algorithm=fixed_exposure algorithm.alpha=<alpha>",
            )
        else:  # the algorithm's name is what runs and reports say: a controller must not change it
            require(
                cfg.controller.kind == "fixed",
                "controller.kind",
                f"algorithm={self.name} holds its exposure fixed; controller.kind={cfg.controller.kind} "
                "would choose it, so the run would not be what it is called: use algorithm=atesd",
            )
        require(
            cfg.teacher.model is None,
            "teacher.model",
            f"algorithm={self.name} distills from the privileged self-teacher; got teacher.model="
            f"{cfg.teacher.model} (a separate teacher model is another algorithm)",
        )

    def objective(self, cfg: Config, signals: frozenset[str]) -> DistillObjective:
        return DistillObjective(cfg.algorithm.loss, per_example="per_example" in signals)

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        rollouts = rollouts or launch_rollouts(actors, batch, step, min_version=step)
        alpha = actors.controller.exposure.remote(step, [r["id"] for r in batch])
        scored = actors.teachers.score(rollouts, alpha)
        return Launched(actors.students.train_step(step, rollouts, scored), alpha)


ALGORITHMS = (Distill("opsd"), Distill("fixed_exposure"), Distill("atesd"))
