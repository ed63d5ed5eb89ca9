"""``make gpu-check``: what only a GPU can show, in one command of a few minutes (README, "GPU status").

The torch part needs only PyTorch (CUDA), transformers and peft (``--torch-only`` runs just it, on
a machine without Ray or vLLM); it imports no Ray:

1. a bfloat16 student step of a Qwen3-shaped model with LoRA r 64: forward, the distillation loss
   (chunked over the LM head), backward, AdamW; finite, timed, peak memory;
2. the loss kernels on the GPU against float64 on the CPU, and the rollout gap's sampler cut;
3. a one-GPU NCCL group built as the collective transport builds it (timeout), a broadcast, abort;
4. the CUDA IPC path between two processes: a buffer shared by handle and opened on the receiver's
   own device reads back exactly; the sender then frees it (``ipc_collect``).

The run part needs the installed project (Ray, vLLM's CUDA build), on one GPU or more:

5. three OPSD steps of the bundled model, vLLM rollout and HF teacher beside the student, all on
   GPUs: the train-inference gap and every sync check under the float32 bound, every role's
   device a GPU (``topology.json``), timings; then two bfloat16 steps, whose gap sets that bound;
6. a collective sync one tensor per bucket (every fused q/k/v and gate/up split) into the GPU
   vLLM: its log-probs equal the student's to 1e-4 (NCCL between two GPUs; gloo staging on one);
7. CUDA IPC: rollout colocated with the student rank on one GPU, two steps, sync checks exact;
8. an EMA teacher on the GPU taking syncs of CPU tensors (and of an NCCL broadcast with 3 GPUs).

Prints one line per check and writes ``gpu_check.json``; exits 1 when a check fails, 2 when there
is no GPU (one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS: list[dict] = []


def check(name: str):
    """Run the decorated check now; record pass/fail, its details and its time."""

    def run(fn):
        t0 = time.perf_counter()
        try:
            details = fn() or {}
            ok = True
        except Exception as err:  # a failed check is reported and the others still run
            details, ok = (
                {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=4)},
                False,
            )
        row = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), **details}
        RESULTS.append(row)
        shown = {k: v for k, v in details.items() if k != "trace"}
        print(
            f"{'PASS' if ok else 'FAIL'}  {name} ({row['seconds']} s): {json.dumps(shown, default=str)}",
            flush=True,
        )
        return fn

    return run


# -- the torch part ----------------------------------------------------------------------------------


def _loss_cfg(**kw):
    base = {
        "kind": "jsd",
        "beta": 0.0,
        "temperature": 1.1,
        "clip": None,
        "topk_tail": "renormalize",
        "chunk_size": 256,
    }
    return SimpleNamespace(**(base | kw))


def torch_part() -> None:
    from atesd_ray.losses import TeacherTargets, distill_loss
    from atesd_ray.rollout_gap import SamplerCut, sampler_logprobs
    from atesd_ray.runtime.transfer import backend_group, share

    gpu = torch.device("cuda", 0)

    @check("bf16 student step, Qwen3-shaped, LoRA r64")
    def _student_step():
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        model = Qwen3ForCausalLM(config).to(gpu, torch.bfloat16)
        model.gradient_checkpointing_enable()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets)
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)
        ids = torch.randint(0, config.vocab_size, (4, 1024), device=gpu)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        hidden = (
            model.base_model.model.model(input_ids=ids)
            .last_hidden_state[:, 512:]
            .reshape(-1, config.hidden_size)
        )
        n = hidden.shape[0]
        teacher = TeacherTargets(
            torch.randn(n, 256, device=gpu).log_softmax(-1) - 1.0,
            torch.randint(0, config.vocab_size, (n, 256), device=gpu),
            torch.randn(n, device=gpu) - 3.0,
        )
        loss, _ = distill_loss(
            hidden, teacher, _loss_cfg(kind="topk", topk_tail="bucket"), project=model.get_output_embeddings()
        )
        (loss / n).backward()
        optimizer.step()
        torch.cuda.synchronize()
        assert math.isfinite(float(loss)), f"loss {float(loss)}"
        return {
            "tokens": n,
            "loss_per_token": float(loss) / n,
            "step_s": round(time.perf_counter() - t0, 3),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }

    @check("loss kernels on the GPU = float64 on the CPU")
    def _kernels():
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(300, 1000, generator=g, dtype=torch.float64) * 3
        t_full = (torch.randn(300, 1000, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
        top = t_full.topk(32)
        tokens = torch.randint(0, 1000, (300,), generator=g)
        worst = {}
        for name, targets, cfg in [
            ("jsd beta 0.5", TeacherTargets(t_full, None, t_full[:, 0]), _loss_cfg(beta=0.5)),
            (
                "top-k renormalize",
                TeacherTargets(top.values, top.indices, t_full[:, 0]),
                _loss_cfg(kind="topk"),
            ),
            (
                "top-k bucket",
                TeacherTargets(top.values, top.indices, t_full[:, 0]),
                _loss_cfg(kind="topk", topk_tail="bucket"),
            ),
        ]:
            ref, _ = distill_loss(logits, targets, cfg)
            got, _ = distill_loss(logits.float().to(gpu), targets.to(gpu), cfg)
            worst[name] = abs(float(got) - float(ref)) / max(1.0, abs(float(ref)))
        cut = SamplerCut(1.1, 20, 0.95)
        gap = (
            (
                sampler_logprobs(logits.float().to(gpu), tokens.to(gpu), cut).cpu().double()
                - sampler_logprobs(logits, tokens, cut)
            )
            .abs()
            .max()
        )
        worst["sampler cut"] = float(gap)
        assert max(worst.values()) < 1e-4, worst
        return {"relative_error": worst}

    @check("one-GPU NCCL group: the transport's construction, broadcast, abort")
    def _nccl():
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=60))
        group = backend_group("nccl", store, 0, 1, timedelta(seconds=60))
        t = torch.arange(1 << 20, device=gpu, dtype=torch.float32)
        options = dist.BroadcastOptions()
        options.rootRank = 0
        group.broadcast([t], options).wait()
        torch.cuda.synchronize()
        assert torch.equal(t, torch.arange(1 << 20, device=gpu, dtype=torch.float32))
        group.abort()
        return {}

    @check("CUDA IPC between two processes, opened on the receiver's device")
    def _ipc():
        ctx = torch.multiprocessing.get_context("spawn")
        handles, answers = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=_ipc_receiver, args=(handles, answers))
        child.start()
        buffer = (torch.arange(64 << 20, device=gpu) % 251).to(torch.uint8)
        handles.put(share(buffer))
        total = answers.get(timeout=120)
        child.join(timeout=60)
        expected = int(buffer.sum(dtype=torch.int64))
        del buffer
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
        assert total == expected, (total, expected)
        return {"bytes": 64 << 20}


def _ipc_receiver(handles, answers) -> None:
    from atesd_ray.runtime.transfer import open_shared

    buffer = open_shared(handles.get(timeout=120))
    answers.put(int(buffer.sum(dtype=torch.int64)))
    torch.cuda.synchronize()


# -- the run part ------------------------------------------------------------------------------------


def run_part(out: Path) -> None:
    import ray
    from hydra import compose, initialize_config_module

    from atesd_ray.config import register_schemas, to_config
    from atesd_ray.rollout_gap import max_gap
    from atesd_ray.train import run

    register_schemas()
    gpus = torch.cuda.device_count()

    def config(*overrides):
        with initialize_config_module("conf", version_base=None):
            return to_config(compose("config", overrides=list(overrides)))

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

    @check("collective sync one tensor per bucket into the GPU vLLM, exact")
    def _buckets():
        from atesd_ray.algorithms.base import launch_rollouts
        from atesd_ray.data.synthetic import generate
        from atesd_ray.runtime.actors import build_actors
        from atesd_ray.runtime.devices import place
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
            ray.get(actors.students.call("train_step", 0, rollouts, scored))
            t0 = time.perf_counter()
            ray.get(sync.sync(1))
            sync_s = time.perf_counter() - t0
            rollout = actors.rollouts.actors[0]
            b = ray.get(rollout.generate.remote(records, 9, 0, 1, SamplingParams(1.0, 1.0, 0, 16))).batch
            prompts, responses = (
                rows_to_lists(b["prompt_ids"], b["prompt_mask"]),
                rows_to_lists(b["response_ids"], b["response_mask"]),
            )
            student = ray.get(actors.students.call("score", prompts, responses))[0]
            mine = ray.get(rollout.score.remote(prompts, responses))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--torch-only", action="store_true", help="only the part that needs PyTorch alone")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "run it on a machine with an NVIDIA GPU"
        )
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"gpu-check on {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch_part()
    if not args.torch_only:
        run_part(args.out.resolve())
    report = {
        "device": props.name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "checks": RESULTS,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(
        f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {report['seconds']} s; {args.out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
