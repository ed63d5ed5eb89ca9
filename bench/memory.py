"""(e) Teacher transfer bytes at top-k against the full vocabulary; peak memory per actor."""

from __future__ import annotations

import os
import time

import ray
from verl import DataProto

from atesd_ray.config import Config
from atesd_ray.runtime.cluster import ActorGroup
from bench.common import resident_bytes, summary
from bench.distributed import DistributedStep


def dataproto_bytes(data: DataProto) -> int:
    """Bytes of the tensors a DataProto carries (what crosses the object store, less pickling)."""
    return sum(t.numel() * t.element_size() for t in data.batch.values())


def teacher_transfer(dist: DistributedStep, topk_cfg: Config, repeats: int) -> dict:
    """Score the same rollout with the running teacher (full vocabulary) and with a second
    teacher actor at ``topk_cfg.teacher.topk``; bytes and scoring seconds of each."""
    from workers.teacher import TeacherWorker

    c = topk_cfg.cluster
    group = ActorGroup(
        TeacherWorker, 1, c.teacher, c.teacher_strategy, "bench-teacher-topk", lambda i: ((topk_cfg, i), {})
    )
    try:
        rollout = dist.actors.rollouts.actors[0].generate.remote(dist.batch, 0, 0, 0)
        teachers = {
            "full_vocab": dist.actors.teachers.actors[0],
            f"top{topk_cfg.teacher.topk}": group.actors[0],
        }
        out: dict = {}
        seconds: dict[str, list[float]] = {name: [] for name in teachers}
        for _ in range(repeats + 1):
            for name, teacher in teachers.items():
                t0 = time.perf_counter()
                scored = ray.get(teacher.score.remote(rollout, 1.0))
                seconds[name].append(time.perf_counter() - t0)
                out[name] = {
                    "bytes": dataproto_bytes(scored),
                    "shape": list(scored.batch["teacher_logprobs"].shape),
                }
        for name in teachers:
            out[name]["score_seconds"] = summary(seconds[name][1:])
        return out
    finally:
        group.shutdown()


def _own_memory(_actor) -> dict[str, int]:
    return resident_bytes(os.getpid())


def resident_memory(dist: DistributedStep) -> dict:
    """Each actor process's memory (``resident_bytes``), read inside the actor, and the driver's
    (which also held the single-process and TRL models)."""
    a = dist.actors
    named = {f"student{i}": h for i, h in enumerate(a.students.actors)}
    named |= {f"rollout{i}": h for i, h in enumerate(a.rollouts.actors)}
    named |= {f"teacher{i}": h for i, h in enumerate(a.teachers.actors)}
    named["controller"] = a.controller
    found = ray.get([h.__ray_call__.remote(_own_memory) for h in named.values()])
    return dict(zip(named, found, strict=True)) | {"driver": resident_bytes(os.getpid())}
