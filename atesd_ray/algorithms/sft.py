"""One SFT step (baseline): the student's NLL of the reference solutions after the problem-only prompt.

No rollouts and no teacher: the batch's records go to the student group (one object in the store,
read by every rank), then the new weights go to the rollout actors so that evaluation during
training sees them.
"""

from __future__ import annotations

import time

import ray

from atesd_ray.config import Config
from atesd_ray.runtime.actors import Actors


def sft_step(
    cfg: Config,
    actors: Actors,
    step: int,
    batch: list[dict],
    next_batch: list[dict] | None,
    prefetched: list[ray.ObjectRef] | None,
) -> tuple[dict, None]:
    t0 = time.perf_counter()
    stats = actors.students.call("sft_step", step, ray.put(batch))[0]
    synced = actors.weight_sync.sync(version=step + 1)
    probe = actors.students.call("probe_nll")[0]
    ray.get(synced)
    metrics = ray.get(stats)
    metrics.update(probe_nll=ray.get(probe), weight_version=step + 1, step_time_s=time.perf_counter() - t0)
    metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
    return metrics, None
