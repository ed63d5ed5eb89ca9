"""(i) One engine for the student and its frozen self-teacher, against a teacher actor of its own.

Each layout trains the same OPSD steps of the bundled model with LoRA (r 16, every projection)
through the real actors, one layout after another (each one's memory is its own): the first step
warms up, the next ``repeats`` are counted. Per layout: the step time and the teacher's part of it,
the seconds of one weight sync alone (``repeats`` syncs after the steps, the rollout set back one
version before each, so that every one moves and loads the whole payload), the bytes each sync moves (the rollout's weight
format, counted by the sync's own stream), and each actor process's peak resident memory with their
sum, the node's total (one node here).

- ``hf, teacher actor``: HF rollout taking the adapter, HF teacher actor holding the base again;
- ``hf, one engine``: ``teacher.engine=rollout``, the teacher scores on the rollout's network;
- ``vllm merged, teacher actor``: vLLM rollout taking merged weights, HF teacher actor;
- ``vllm adapter, one engine``: ``rollout.vllm.lora=adapter teacher.engine=rollout``, the teacher's
  prompt logprobs on the rollout's engine with the adapter off.
"""

from __future__ import annotations

import time

import ray

from atesd_ray.runtime.weight_formats import stream_weights
from bench.common import bench_config, resident_bytes, summary
from bench.distributed import DistributedStep

LORA = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32", "teacher.topk=16"]
LAYOUTS = {
    "hf, teacher actor": [],
    "hf, one engine": ["teacher.engine=rollout"],
    "vllm merged, teacher actor": ["rollout.engine=vllm"],
    "vllm adapter, one engine": [
        "rollout.engine=vllm",
        "rollout.vllm.lora=adapter",
        "teacher.engine=rollout",
    ],
}


def _peak(_actor) -> dict:
    import os

    return resident_bytes(os.getpid())


def _sync_bytes(cfg, fmt: str) -> int:
    from atesd_ray.models import DTYPES, load_model, load_tokenizer

    m = cfg.model
    model = load_model(m, vocab_size=len(load_tokenizer(m)))
    return sum(
        t.numel() * t.element_size()
        for _, t in stream_weights(model, fmt, DTYPES[m.dtype], "meta", m.lora.alpha / m.lora.r, meta=True)
    )


def measure(model: str, repeats: int, layouts: tuple[str, ...] = tuple(LAYOUTS)) -> dict:
    steps: dict[str, list[dict]] = {name: [] for name in layouts}
    out: dict = {"layouts": {}}
    for name in layouts:  # one layout's actors at a time: their memory is their own
        extra = LAYOUTS[name]
        cfg = bench_config(model, *LORA, *extra)
        dist = DistributedStep(cfg, name=f"bench-{name.replace(',', '').replace(' ', '-')}")
        try:
            for _ in range(repeats + 1):
                steps[name].append(dist.run())
            a = dist.actors
            sync_s, version = [], dist.step_index  # the student's update count
            for _ in range(repeats):  # the receivers set back one version: each sync loads it all
                ray.get([r.rewind_version.remote(version - 1) for r in a.rollouts.actors])
                t0 = time.perf_counter()
                a.weight_sync.send(version, True).get()
                sync_s.append(time.perf_counter() - t0)
            processes = {f"student{i}": h for i, h in enumerate(a.students.actors)}
            processes |= {f"rollout{i}": h for i, h in enumerate(a.rollouts.actors)}
            if a.teachers.actors != a.rollouts.actors:
                processes |= {f"teacher{i}": h for i, h in enumerate(a.teachers.actors)}
            memory = dict(
                zip(
                    processes,
                    ray.get([h.__ray_call__.remote(_peak) for h in processes.values()]),
                    strict=True,
                )
            )
            fmt = ray.get(a.rollouts.actors[0].weight_format.remote())
        finally:
            dist.shutdown()
        counted = steps[name][1:]
        out["layouts"][name] = {
            "overrides": extra,
            "sync_format": fmt,
            "sync_bytes": _sync_bytes(cfg, fmt),
            "step_s": summary([s["step_time_s"] for s in counted]),
            "sync_s": summary(sync_s),
            "time_teacher_s": summary([s["time_teacher_s"] for s in counted]),
            "time_rollout_s": summary([s["time_rollout_s"] for s in counted]),
            "rollout_tokens": summary([s["tokens"] for s in counted]),
            "peak_bytes": {p: m["peak"] for p, m in memory.items()},
            "node_peak_bytes": sum(m["peak"] for m in memory.values()),
            "actors": sorted(memory),
        }
    return out
