"""(d) Weight sync by transport on the running actors, against a plain in-process copy.

Each transport is timed over syncs of its own in a row (object store, then gloo collective),
each followed by its floor and an in-process ``load_state_dict`` of the same bytes, so a noisy
neighbour slows a transport and its references alike. A sync moves the student's trainable
tensors (``weight_format`` "trainable") from student rank 0 to the rollout actor. Beside them,
the floor of each transport on this machine: ``ray_put_alone`` is student rank 0 putting the same
packed bytes into the object store (Ray's one copy, nothing handed over or loaded), and
``broadcast_alone`` the collective's process group broadcasting the same buckets with nothing
gathered, packed or loaded.

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
from atesd_ray.runtime.weight_sync.object_store import ObjectStoreSync, export
from atesd_ray.runtime.weights import bucket_bytes
from bench.common import summary
from bench.distributed import DistributedStep


def _put_alone(sender, fmt: str) -> bool:
    ray.put(export(sender, fmt, True, sender.version, "whole"))
    return True


def _broadcast_alone(member, sizes: list[int]) -> bool:
    for nbytes in sizes:
        member.weight_group.broadcast(member.weight_group.staging(nbytes))
    return True


def measure(dist: DistributedStep, repeats: int) -> dict:
    actors = dist.actors
    backend = actors.topology["student"][0]["backend"]
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
    sizes = [bucket_bytes(b) for b in transports["collective"].buckets()]
    group = [actors.students.actors[0], *actors.rollouts.actors]
    seconds: dict[str, list[float]] = {
        name: [] for name in [*transports, "ray_put_alone", "broadcast_alone", "in_process_copy"]
    }
    fmt = transports["object_store"].format
    floors = {
        "object_store": ("ray_put_alone", lambda: [group[0].weight_transfer.remote(_put_alone, fmt)]),
        "collective": (
            "broadcast_alone",
            lambda: [m.weight_transfer.remote(_broadcast_alone, sizes) for m in group],
        ),
    }
    version = dist.step_index  # the student's update count
    receivers = actors.rollouts.actors
    try:
        # each transport's syncs in a block of their own, as in a run that uses only it (a receiver
        # that shares the store's memory copies into its own after a broadcast, and back)
        for name, sync in transports.items():
            floor, floor_refs = floors[name]
            for i in range(repeats + 1):  # the first round warms up (process groups, buffers)
                ray.get([r.rewind_version.remote(version - 1) for r in receivers])
                t0 = time.perf_counter()
                sync.sync(version).get()
                t1 = time.perf_counter()
                held = ray.get([r.get_weight_version.remote() for r in receivers])
                if held != [version] * len(receivers):
                    raise RuntimeError(f"{name}: the rollouts hold weights {held} after a sync of v{version}")
                t2 = time.perf_counter()
                ray.get(floor_refs())
                t3 = time.perf_counter()
                target.load_state_dict(state, strict=False)
                t4 = time.perf_counter()
                if i > 0:
                    seconds[name].append(t1 - t0)
                    seconds[floor].append(t3 - t2)
                    seconds["in_process_copy"].append(t4 - t3)
    finally:
        transports["collective"].teardown()
    out = {
        "bytes": nbytes,
        "tensors": len(state),
        "receivers": len(actors.rollouts.actors),
        "by_transport": {},
    }
    in_process = summary(seconds["in_process_copy"])["median"]
    for name, values in seconds.items():
        timed = summary(values)
        out["by_transport"][name] = {
            "seconds": timed,
            "gb_per_s": nbytes / timed["median"] / 1e9,
            "ratio_over_copy": timed["median"] / in_process,
        }
    return out
