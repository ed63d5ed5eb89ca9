"""What every part of the benchmark shares: its config, the machine's description, medians, RSS."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

from atesd_ray.config import Config, compose

# One fixed workload for every part: the same prompts each step, plain temperature-1 sampling
# (what TRL's GKDTrainer does: top_k=0, top_p=1) and the loss at temperature 1 (as TRL's).
WORKLOADS = {
    "smollm2_135m": {"prompts": 4, "new_tokens": 32},
    "tiny": {"prompts": 4, "new_tokens": 8},
}


def bench_config(
    model: str, *extra: str, prompts: int | None = None, new_tokens: int | None = None
) -> Config:
    """The workload's config (``prompts`` per step, ``new_tokens`` each: the model's workload unless
    given), with Hydra overrides ``extra``."""
    prompts = prompts or WORKLOADS[model]["prompts"]
    new_tokens = new_tokens or WORKLOADS[model]["new_tokens"]
    overrides = [
        f"model={model}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.micro_batch={prompts}",
        f"rollout.micro_batch={prompts}",
        f"teacher.micro_batch={prompts}",
        f"rollout.max_new_tokens={new_tokens}",
        "rollout.n_samples=1",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        "algorithm.loss.temperature=1.0",
        "trainer.total_steps=1000",
        "data.synthetic.n_train=32",
        "data.synthetic.n_eval=8",
        "data.synthetic.levels=[1]",
        "data.probe_size=2",
        # OPSD's step reads no probe NLL (an ATESD controller declares it and gets it every step); the
        # single-process reference measures none either
        "tracking.probe_every=1000",
        "tracking.backends=[jsonl]",
        "dashboard.enabled=false",
        *extra,
    ]
    return compose(*overrides)


def machine() -> dict:
    """What the figures were measured on."""
    import ray
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_driver": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summary(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (seconds, bytes, ...)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def resident_bytes(pid: int) -> dict[str, int]:
    """A local process's resident memory, in bytes: ``peak`` (VmHWM), and now ``private`` (RssAnon)
    and ``shared`` (RssShmem: shared-memory pages it has read, such as Ray's object store, which
    count in its RSS and in every other reader's, but exist once)."""
    fields = {"VmHWM": "peak", "RssAnon": "private", "RssShmem": "shared"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) * 1024
    if len(out) != len(fields):
        raise RuntimeError(f"no {', '.join(sorted(set(fields) - set(out)))} in /proc/{pid}/status")
    return out


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
