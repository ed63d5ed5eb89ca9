"""OPD: on-policy distillation from a separate, larger teacher model (verl's recipe,
``docs/algo/opd.md``; TRL's GKD on student samples).

The student samples on its problem-only prompt; a teacher model of the same tokenizer
(``teacher.model``, a preset: qwen3_8b for a qwen3_1_7b student) scores the student's own tokens
after the same prompt, nothing privileged; the student minimizes the divergence of
``algorithm.loss`` on them: forward KL(p_T || p_S) with ``beta: 0`` (verl's default), reverse
KL(p_S || p_T) with ``beta: 1`` (GKD's on-policy choice), on the teacher's top-k (``teacher.topk``,
renormalized or with a tail bucket) or the full vocabulary (``teacher.topk: 0``). The student's
side is the self-distillation objective; there is no exposure to choose, so the controller stays
fixed, and the teacher, another network, keeps its own weights (frozen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from atesd_ray.algorithms.base import Algorithm, Launched, launch_rollouts
from atesd_ray.algorithms.distill import DistillObjective
from atesd_ray.schema import require

if TYPE_CHECKING:
    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config


class OPD(Algorithm):
    prefetches = True

    def check(self, cfg: Config) -> None:
        require(
            cfg.teacher.model is not None,
            "teacher.model",
            "algorithm=opd distills from a separate teacher model: set teacher.model=<preset> "
            "(one of the same tokenizer as the student, e.g. qwen3_8b for model=qwen3_1_7b)",
        )
        require(
            cfg.controller.kind == "fixed",
            "controller.kind",
            f"algorithm=opd shows its teacher no reference, so there is no exposure to choose; "
            f"got controller.kind={cfg.controller.kind}",
        )

    def objective(self, cfg: Config, signals: frozenset[str]) -> DistillObjective:
        return DistillObjective(cfg.algorithm.loss)

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        rollouts = rollouts or launch_rollouts(actors, batch, step, min_version=step)
        # the separate teacher reads the student's prompt: the exposure it is given plays no part
        scored = actors.teachers.score(rollouts, 1.0)
        return Launched(actors.students.train_step(step, rollouts, scored))


ALGORITHMS = (OPD("opd"),)
