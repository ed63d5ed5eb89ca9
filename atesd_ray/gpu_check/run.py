"""gpu-check, the run part: the installed project (Ray, vLLM's CUDA build) on one GPU or more."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from atesd_ray.gpu_check.checks import check


def run_part(out: Path) -> None:
    import ray

    from atesd_ray.config import compose
    from atesd_ray.modes.train import run
    from atesd_ray.rollout_gap import max_gap

    gpus = torch.cuda.device_count()
    config = compose

    base = [
        "model=smollm2_135m",
        "algorithm=opsd",
        "rollout.engine=vllm",
        "rollout.max_new_tokens=64",
        "trainer.prompts_per_step=8",
        "trainer.micro_batch=4",
        "data.probe_size=2",
        "eval.at_start=false",
        "eval.at_end=false",
        "dashboard.enabled=false",
        "tracking.backends=[jsonl]",
    ]

    def train(name: str, *overrides) -> tuple[list[dict], dict]:
        cfg = config(*base, *overrides, f"run_dir={out / name}")
        run(cfg, out / name)
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        bound = max_gap(cfg.rollout, cfg.model.dtype)
        for m in metrics:
            for key in ("rollout_logprob_gap_mean", "sync_logprob_gap"):
                assert m.get(key) is None or m[key] <= bound, f"step {m['step']}: {key} {m[key]} > {bound}"
        return metrics, json.loads((out / name / "topology.json").read_text())

    def summary(metrics):
        keys = (
            "rollout_logprob_gap_mean",
            "rollout_logprob_gap_max",
            "sync_logprob_gap",
            "step_time_s",
            "time_rollout_s",
            "time_teacher_s",
            "time_to_sync_s",
        )
        return {k: [round(m[k], 6) for m in metrics if k in m] for k in keys}

    @check("3 OPSD steps, float32: vLLM rollout, HF teacher, FSDP student on GPUs")
    def _opsd():
        metrics, topology = train("opsd", "trainer.total_steps=3")
        devices = {role: {a["device"] for a in actors} for role, actors in topology.items()}
        assert all(d.startswith("cuda") for ds in devices.values() for d in ds), devices
        return {"devices": devices, **summary(metrics)}

    @check("2 OPSD steps, bfloat16: the gap that sets the bf16 bound")
    def _bf16():
        metrics, _ = train("opsd-bf16", "trainer.total_steps=2", "model.dtype=bfloat16")
        return summary(metrics)

    @check("bf16 delta syncs into the GPU vLLM: 4 steps, a full sync every 2, each sync checked")
    def _delta():
        delta = ("trainer.delta_sync=true", "trainer.full_sync_every=2")
        metrics, _ = train("delta-bf16", "trainer.total_steps=4", "model.dtype=bfloat16", *delta)
        return summary(metrics)

    @check("collective sync one tensor per bucket into the GPU vLLM, exact")
    def _buckets():
        from atesd_ray.algorithms import build_actors
        from atesd_ray.algorithms.base import launch_rollouts
        from atesd_ray.data.synthetic import generate
        from atesd_ray.runtime.cluster import place
        from atesd_ray.runtime.weight_sync.collective import CollectiveSync
        from atesd_ray.sampling import SamplingParams
        from atesd_ray.sequences import rows_to_lists

        whole = gpus >= 2  # NCCL needs a GPU per member
        cfg = config(
            *base,
            f"cluster.student.gpus={1 if whole else 0.4}",
            f"cluster.rollout.gpus={1 if whole else 0.4}",
            "cluster.teacher.gpus=0",
            "trainer.lr=1e-3",
        )
        place(cfg)
        actors = build_actors(cfg, 4, name="gpu-check-buckets")
        try:
            sync = CollectiveSync(
                actors.students, actors.rollouts.actors, "nccl" if whole else "gloo", bucket_bytes=1
            )
            sync.setup()
            records = [dataclasses.asdict(r) for r in generate(4, seed=5)]
            rollouts = launch_rollouts(actors, records, 0, min_version=0)
            scored = [actors.teachers.actors[0].score.remote(r, 1.0) for r in rollouts]
            actors.students.train_step(0, rollouts, scored).get()
            t0 = time.perf_counter()
            sync.sync(1).get()
            sync_s = time.perf_counter() - t0
            rollout = actors.rollouts.actors[0]
            b = ray.get(rollout.generate.remote(records, 9, 0, 1, SamplingParams(1.0, 1.0, 0, 16))).batch
            prompts, responses = (
                rows_to_lists(b["prompt_ids"], b["prompt_mask"]),
                rows_to_lists(b["response_ids"], b["response_mask"]),
            )
            student = actors.students.score(prompts, responses).get()
            mine = ray.get(rollout.score_responses.remote(prompts, responses))
            gap = max(
                abs(x - y) for a, c in zip(student, mine, strict=True) for x, y in zip(a, c, strict=True)
            )
            sync.teardown()
            assert gap < 1e-4, f"the rollout is {gap:.3g} nats off the student"
            return {
                "backend": "nccl" if whole else "gloo (one GPU)",
                "max_gap": gap,
                "sync_s": round(sync_s, 3),
            }
        finally:
            actors.shutdown()

    @check("CUDA IPC, rollout colocated with the student rank on one GPU")
    def _ipc_run():
        metrics, topology = train(
            "cuda-ipc",
            "trainer.total_steps=2",
            "cluster.colocate_rollout=true",
            "cluster.student.gpus=0.4",
            "cluster.rollout.gpus=0.4",
            "cluster.teacher.gpus=0.2",
            "trainer.weight_transport=cuda_ipc",
        )
        assert all(m.get("sync_logprob_gap") is not None for m in metrics)
        return summary(metrics)

    @check("LoRA adapter syncs into the GPU vLLM, the frozen teacher on the same engine")
    def _adapter():
        lora = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32", "teacher.topk=16"]
        shared = ["rollout.vllm.lora=adapter", "teacher.engine=rollout", "algorithm.loss.temperature=1.0"]
        merged, _ = train("lora-merged", "trainer.total_steps=3", *lora)
        adapter, topology = train("lora-adapter", "trainer.total_steps=3", *lora, *shared)
        assert topology["teacher"] == topology["rollout"], topology
        return {"merged": summary(merged), "adapter, one engine": summary(adapter)}

    @check("EMA teacher on the GPU taking syncs")
    def _ema():
        transport = (
            [
                "trainer.weight_transport=collective",
                "cluster.student.gpus=1",
                "cluster.rollout.gpus=1",
                "cluster.teacher.gpus=1",
            ]
            if gpus >= 3
            else []
        )
        metrics, topology = train("ema", "trainer.total_steps=2", "teacher.weights=ema", *transport)
        assert topology["teacher"][0]["device"].startswith("cuda"), topology["teacher"]
        return {"transport": "collective (nccl)" if transport else "object_store", **summary(metrics)}
