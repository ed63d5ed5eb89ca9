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
import json
import time
import traceback
from pathlib import Path

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
    from atesd_ray.gpu_check.kernels import torch_part

    torch_part()
    if not args.torch_only:
        from atesd_ray.gpu_check.run import run_part

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
