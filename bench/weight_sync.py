"""(d) Weight sync by transport on the running actors, against a plain in-process copy.

Each repeat times one sync per transport in turn (object store, gloo collective, in-process
``load_state_dict``), so a noisy neighbour slows all three alike. A sync moves the student's
trainable tensors (``weight_format`` "trainable") from student rank 0 to the rollout actor.

A sync must carry the student's update count, and a receiver applies only a version newer than
its own; so before each repeat the rollout is set back one version, and every repeat moves and
applies the whole model as a training step's sync does.
"""

from __future__ import annotations

import copy
import time

import ray

from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.runtime.weight_sync.collective import CollectiveSync
from atesd_ray.runtime.weight_sync.object_store import ObjectStoreSync
from bench.common import summary
from bench.distributed import DistributedStep


def _hold_version(receiver, version: int) -> int:
    receiver.weight_version = version
    return version


def measure(dist: DistributedStep, repeats: int) -> dict:
    actors = dist.actors
    backend = actors.topology[0]["backend"]
    transports = {
        "object_store": ObjectStoreSync(actors.students, actors.rollouts.actors, backend),
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
    version = dist.step_index  # the student's update count
    receivers = actors.rollouts.actors
    try:
        for _ in range(repeats + 1):  # the first round warms up (process groups, buffers)
            for name, sync in transports.items():
                ray.get([r.__ray_call__.remote(_hold_version, version - 1) for r in receivers])
                t0 = time.perf_counter()
                ray.get(sync.sync(version))
                seconds[name].append(time.perf_counter() - t0)
                held = ray.get([r.get_weight_version.remote() for r in receivers])
                if held != [version] * len(receivers):
                    raise RuntimeError(f"{name}: the rollouts hold weights {held} after a sync of v{version}")
            t0 = time.perf_counter()
            target.load_state_dict(state, strict=False)
            seconds["in_process_copy"].append(time.perf_counter() - t0)
    finally:
        transports["collective"].teardown()
    out = {
        "bytes": nbytes,
        "tensors": len(state),
        "receivers": len(actors.rollouts.actors),
        "by_transport": {},
    }
    in_process = summary(seconds["in_process_copy"][1:])["median"]
    for name, values in seconds.items():
        timed = summary(values[1:])
        out["by_transport"][name] = {
            "seconds": timed,
            "gb_per_s": nbytes / timed["median"] / 1e9,
            "ratio_over_copy": timed["median"] / in_process,
        }
    return out
