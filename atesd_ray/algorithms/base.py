"""The seam every algorithm fills, and the part of a step they all share.

An :class:`Algorithm` (one module of this package) brings

- its settings, when it has any: a section of ``atesd_ray/config/algorithm.py`` (``algorithm.<key>``);
- ``check(cfg)``: its rules about the rest of the config, run before any actor starts;
- ``objective(cfg, signals)``: its student-side half (``atesd_ray/objective.py``), handed to the
  student ranks when they are built;
- ``launch(cfg, actors, step, batch, rollouts)``: its driver step, from the batch to the student
  ranks' ``train_step``, as object refs passed between actors (:class:`Launched`).

:func:`run_step` is the rest of every step: the rollouts of the next step when they may run ahead,
the weight sync and its check (``atesd_ray/rollout_gap.py``), the probe measurements (every step
those the controller learns from; the probe NLL also every ``tracking.probe_every`` steps), the
controller's observation and the step's metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import ray

from atesd_ray.rollout_gap import sync_gap
from atesd_ray.runtime.cluster import GroupCall, split_evenly

if TYPE_CHECKING:
    from atesd_ray.assembly import Actors
    from atesd_ray.config import Config
    from atesd_ray.objective import Objective


@dataclass
class Launched:
    """What an algorithm's step has set going."""

    stats: GroupCall  # the student ranks' train_step
    alpha: Any = None  # the exposure the teacher saw: a float, or a ref to a float or {uid: alpha}
    metrics: dict | ray.ObjectRef = field(
        default_factory=dict
    )  # more of the step's metrics (or a ref to them)


class Algorithm:
    prefetches: ClassVar[bool] = False  # its rollouts may be generated a step ahead (rollout.max_staleness=1)
    stepwise: ClassVar[bool] = False  # it builds step-wise monitored trajectories (mode=motab_synthesize)
    # the student distills the teacher's targets on its own tokens (teacher.context and teacher.signal apply)
    distills_targets: ClassVar[bool] = False
    routes_teachers: ClassVar[bool] = False  # it scores each problem with the teacher teacher.routes names

    def __init__(self, name: str):
        self.name = name

    def check(self, cfg: Config) -> None:
        """Rules about the rest of the config (raise ``schema.ConfigError`` through ``require``)."""

    def objective(self, cfg: Config, signals: frozenset[str]) -> Objective:
        """The student-side half; ``signals``: what else the run's consumers asked the step for
        (``controller.actor.needed_signals``)."""
        raise NotImplementedError

    def launch(
        self, cfg: Config, actors: Actors, step: int, batch: list[dict], rollouts: list[ray.ObjectRef] | None
    ) -> Launched:
        """Start step ``step`` on ``batch``; ``rollouts``: its rollouts when they were generated ahead."""
        raise NotImplementedError


# the student's probe measurements a consumer can declare it needs (``needed_signals``)
PROBES = ("probe_nll", "probe_kl")


def launch_rollouts(actors: Actors, records: list[dict], step: int, min_version: int) -> list[ray.ObjectRef]:
    """The student's rollouts of ``records``, one chunk per rollout replica or student rank
    (whichever is more, chunk i on replica i mod R); one ref per chunk."""
    chunks = split_evenly(records, max(len(actors.rollouts), len(actors.students)))
    return [
        actors.rollouts.serving(i).generate.remote(chunk, step, i, min_version)
        for i, chunk in enumerate(chunks)
    ]


def run_step(
    algorithm: Algorithm,
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
) -> tuple[dict, list[ray.ObjectRef] | None]:
    """Train on ``batch``; returns the step's metrics and, when the algorithm's rollouts may run a
    step ahead (``rollout.max_staleness: 1``), the rollouts of ``next_batch``, launched before this
    step's weight sync so that they overlap with the update. The driver moves object refs and, at
    the end, the small dict of statistics."""
    t0 = time.perf_counter()
    launched = algorithm.launch(cfg, actors, step, batch, prefetched)
    ahead = None
    if algorithm.prefetches and cfg.rollout.max_staleness and next_batch:
        ahead = launch_rollouts(
            actors, next_batch, step + 1, min_version=step + 1 - cfg.rollout.max_staleness
        )
    synced = actors.weight_sync.sync(version=step + 1)
    checked = actors.weight_sync.verify()
    done, every = step + 1, cfg.tracking.probe_every
    probes = [name for name in PROBES if name in actors.signals]
    if "probe_nll" not in probes and (done % every == 0 or done == cfg.trainer.total_steps):
        probes.insert(0, "probe_nll")  # logged at its cadence
    probe = actors.students.probe(probes) if probes else None
    observed = actors.controller.observe.remote(step, launched.stats.ref, probe and probe.ref)
    held = synced.get()  # the versions the receivers report holding
    gap = sync_gap(ray.get(checked))
    t_sync = time.perf_counter()
    metrics = launched.stats.get()  # every rank's answer: one that failed is seen here
    metrics.pop("per_example", None)  # the per-problem statistics are for the controller only
    metrics.update(
        ray.get(launched.metrics) if isinstance(launched.metrics, ray.ObjectRef) else launched.metrics
    )
    metrics.update(ray.get(observed))
    if launched.alpha is not None:
        alpha = ray.get(launched.alpha) if isinstance(launched.alpha, ray.ObjectRef) else launched.alpha
        metrics["alpha"] = float(alpha) if not isinstance(alpha, dict) else sum(alpha.values()) / len(alpha)
    if probe is not None:
        metrics.update(probe.get())
    if gap is not None:
        metrics["sync_logprob_gap"] = gap
    metrics.update(
        weight_version=min(held),
        step_time_s=time.perf_counter() - t0,
        time_to_sync_s=t_sync - t0,
    )
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
    return metrics, ahead
