"""OPD: on-policy distillation from a separate, larger teacher model (verl's recipe,
``docs/algo/opd.md``; TRL's GKD on student samples).

The student samples on its problem-only prompt; a teacher model of the same tokenizer
(``teacher.model``, a preset: qwen3_8b for a qwen3_1_7b student) scores the student's own tokens
after the same prompt, nothing privileged; the student minimizes the divergence of
``algorithm.loss`` on them. The default (``conf/algorithm/opd.yaml``) is forward KL(p_T || p_S)
over the teacher's top-k plus one bucket for the rest of the vocabulary, the teacher at temperature
1 and the student at the rollout's: an exact divergence between the two coarsened distributions.
verl's default loss mode is k3, a single-sample estimator; its top-k loss, ``forward_kl_topk``, is
``algorithm.loss.topk_tail=none`` with ``logprob_floor=-10`` and ``token_max=10`` (equal to verl's
own function, ``tests/test_loss_fidelity.py``): the top-k terms alone, not renormalized, negative
token sums clamped to 0. At tiny scale (a one-layer student of the two-layer tiny teacher, top-16,
8 steps) the bucket halved the partition KL (8e-5 -> 4e-5), while renormalizing over the top-k drove
the top-1 disagreement from 2% to 98% and verl's sums, negative on almost every token, clamped to 0
and gave no signal (README, "OPD"). Reverse KL is ``beta: 1`` (GKD's on-policy choice). There is no
exposure to choose, so the controller stays fixed, and the teacher, another network, keeps its own
weights (frozen).
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
    distills_targets = True
    routes_teachers = True

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
        scored = actors.score_routed(rollouts, 1.0)  # with teacher.routes, each row from its own teacher
        return Launched(actors.students.train_step(step, rollouts, scored))


ALGORITHMS = (OPD("opd"),)
