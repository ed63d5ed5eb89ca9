"""(d) Weight sync by transport on the running actors, against a plain in-process copy.

Each repeat times one sync per transport in turn (object store, gloo collective, in-process
``load_state_dict``), so a noisy neighbour slows all three alike. A sync moves the student's
trainable tensors (``weight_format`` "trainable") from student rank 0 to the rollout actor.
"""

from __future__ import annotations

import copy
import time

import ray

from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.runtime.weight_sync import CollectiveSync, ObjectStoreSync
from bench.common import summary
from bench.distributed import DistributedStep


def measure(dist: DistributedStep, repeats: int, first_version: int) -> dict:
    actors = dist.actors
    backend = actors.topology[0]["backend"]
    transports = {
        "object_store": ObjectStoreSync(actors.students, actors.rollouts.actors),
        "collective": CollectiveSync(actors.students, actors.rollouts.actors, backend),
    }
    for sync in transports.values():
        sync.setup()
    tokenizer = load_tokenizer(dist.cfg.model)
    source = load_model(dist.cfg.model, vocab_size=len(tokenizer))
    target = copy.deepcopy(source)
    state = {n: p.detach() for n, p in source.named_parameters() if p.requires_grad}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    seconds: dict[str, list[float]] = {name: [] for name in [*transports, "in_process_copy"]}
    version = first_version
    try:
        for _ in range(repeats + 1):  # the first round warms up (process groups, buffers)
            for name, sync in transports.items():
                version += 1
                t0 = time.perf_counter()
                ray.get(sync.sync(version))
                seconds[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            target.load_state_dict(state, strict=False)
            seconds["in_process_copy"].append(time.perf_counter() - t0)
    finally:
        transports["collective"].teardown()
    held = ray.get(actors.rollouts.actors[0].get_weight_version.remote())
    if held != version:
        raise RuntimeError(f"the rollout holds weights v{held} after the last sync v{version}")
    out = {
        "last_version": version,
        "bytes": nbytes,
        "tensors": len(state),
        "receivers": len(actors.rollouts.actors),
        "by_transport": {},
    }
    for name, values in seconds.items():
        timed = summary(values[1:])
        out["by_transport"][name] = {"seconds": timed, "gb_per_s": nbytes / timed["median"] / 1e9}
    return out
