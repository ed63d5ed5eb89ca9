"""``python -m atesd_ray.gpu_check`` (``make gpu-check``): see the package doc."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import atesd_ray.gpu_check
from atesd_ray.gpu_check.checks import RESULTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make gpu-check", description=atesd_ray.gpu_check.__doc__.splitlines()[0]
    )
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


sys.exit(main())
