"""One GRPO step (baseline): n graded samples per prompt, group-normalized rewards, clipped policy gradient.

rollout (``rollout.n_samples`` = ``algorithm.grpo.n_samples`` responses per prompt, graded by the
rollout actor: batch key ``reward``) -> [frozen teacher: reference log-probs, only when
``algorithm.grpo.kl_coef`` > 0] -> student update -> weight sync. The rollout's sampled-token
log-probs are the old policy's; with ``max_staleness: 1`` the next batch's rollouts are launched
before the sync, so they are one version behind and the clipped ratio corrects for it.
"""

from __future__ import annotations

import time

import ray

from atesd_ray.algorithms.distill import launch_rollouts
from atesd_ray.config import Config
from atesd_ray.runtime.actors import Actors


def grpo_step(
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
) -> tuple[dict, list[ray.ObjectRef] | None]:
    t0 = time.perf_counter()
    rollouts = prefetched or launch_rollouts(actors, batch, step, min_version=step)
    reference = None
    if cfg.algorithm.grpo.kl_coef:
        teachers = actors.teachers.actors
        reference = [
            teachers[i % len(teachers)].reference_logprobs.remote(r, cfg.rollout.temperature)
            for i, r in enumerate(rollouts)
        ]
    stats = actors.students.call("grpo_step", step, rollouts, reference)[0]
    ahead = None
    if cfg.rollout.max_staleness and next_batch:
        ahead = launch_rollouts(
            actors, next_batch, step + 1, min_version=step + 1 - cfg.rollout.max_staleness
        )
    synced = actors.weight_sync.sync(version=step + 1)
    probe = actors.students.call("probe_nll")[0]
    ray.get(synced)
    t_sync = time.perf_counter()
    metrics = ray.get(stats)
    metrics.update(
        probe_nll=ray.get(probe),
        weight_version=step + 1,
        step_time_s=time.perf_counter() - t0,
        time_to_sync_s=t_sync - t0,
    )
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
    return metrics, ahead
