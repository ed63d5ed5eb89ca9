"""One on-policy distillation step (OPSD, fixed exposure, ATESD), as refs passed between actors.

rollout -> teacher (at the controller's exposure) -> student update -> weight sync -> controller.
The driver only moves object refs and, at the end, the small dict of step statistics.
"""

from __future__ import annotations

import time

import ray

from atesd_ray.config import Config
from atesd_ray.runtime.actors import Actors


def split_evenly(items: list, parts: int) -> list[list]:
    per, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + per + (i < extra)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]


def launch_rollouts(actors: Actors, records: list[dict], step: int, min_version: int) -> list[ray.ObjectRef]:
    """Split the batch over the rollout replicas (chunk i -> replica i mod R); one ref per chunk."""
    chunks = split_evenly(records, max(len(actors.rollouts), len(actors.students)))
    replicas = actors.rollouts.actors
    return [
        replicas[i % len(replicas)].generate.remote(chunk, step, i, min_version)
        for i, chunk in enumerate(chunks)
    ]


def distill_step(
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
) -> tuple[dict, list[ray.ObjectRef] | None]:
    """Train on ``batch``; returns the step's metrics and, with ``max_staleness: 1``, the rollouts of
    ``next_batch``, launched before this step's weight sync so they overlap with the update."""
    t0 = time.perf_counter()
    rollouts = prefetched or launch_rollouts(actors, batch, step, min_version=step)
    alpha = actors.controller.exposure.remote(step, [r["id"] for r in batch])
    teachers = actors.teachers.actors
    grounding = cfg.controller.scores_decisions
    scored = [teachers[i % len(teachers)].score.remote(r, alpha, grounding) for i, r in enumerate(rollouts)]
    stats = actors.students.call("train_step", step, rollouts, scored)[0]
    ahead = None
    if cfg.rollout.max_staleness and next_batch:
        ahead = launch_rollouts(
            actors, next_batch, step + 1, min_version=step + 1 - cfg.rollout.max_staleness
        )
    synced = actors.weight_sync.sync(version=step + 1)
    probe = actors.students.call("probe_nll")[0]
    observed = actors.controller.observe.remote(step, stats, probe)
    *_, controller_metrics = ray.get(synced + [observed])
    t_sync = time.perf_counter()
    metrics = ray.get(stats)
    metrics.pop("per_example", None)  # the per-problem statistics are for the controller only
    alpha_value = ray.get(alpha)
    metrics.update(
        controller_metrics,
        alpha=alpha_value if isinstance(alpha_value, float) else sum(alpha_value.values()) / len(alpha_value),
        probe_nll=ray.get(probe),
        weight_version=step + 1,
        step_time_s=time.perf_counter() - t0,
        time_to_sync_s=t_sync - t0,
    )
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
    return metrics, ahead
