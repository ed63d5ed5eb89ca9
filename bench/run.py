"""``make bench``: where an OPSD / ATESD step's time goes, and how it compares.

    python -m bench.run [--model smollm2_135m|tiny] [--repeats 3] [--out bench/results] [--prefix baseline_]
                        [--only-weight-sync]

Writes ``<prefix>step_breakdown.json`` (a), ``<prefix>overhead.json`` (b), ``<prefix>peer_trl.json``
(c), ``<prefix>weight_sync.json`` (d), ``<prefix>memory.json`` (e), ``<prefix>engines.json`` (f: HF
against vLLM), ``<prefix>scaling.json`` and ``scaling.png`` (g: cost against prompts and length),
``<prefix>sync_bytes.json`` (h: bytes per sync, the LoRA adapter against the merged model, and delta
syncs without LoRA against whole ones),
``<prefix>one_engine.json`` (i: one engine for the student and its frozen teacher
against a teacher actor of its own: step, sync and rollout seconds, bytes per sync, peak memory) and
the tables in ``README.md``.
(a)-(c) come from one loop that runs the distributed step, the single-process step and TRL's two
trainers in turn (ABCDABCD...), so load from other processes on the machine falls on all alike;
the first round is a warm-up and is not counted. Before it, a loop of the same kind races our step
with the rollout on vLLM against TRL's trainers: the second half of (c).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from atesd_ray.config import Config
from atesd_ray.job import prepare_data
from bench import engines, memory, one_engine, report, scaling, sync_bytes, weight_sync
from bench.common import WORKLOADS, bench_config, load_average, machine, summary
from bench.distributed import DistributedStep, breakdown, start_ray, task_intervals
from bench.single_process import SingleProcessStep
from bench.trl_peer import PEERS, trl_version

TOPK = 64
SYNC_REPEATS = 9  # syncs are cheap, and single ones stall now and then on this machine


def _stages(steps: list[dict], intervals: list) -> dict:
    rows = [breakdown(m, intervals) for m in steps]
    return {key: summary([r[key] for r in rows]) for key in rows[0]}


def _write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=2) + "\n")


def _alternate(arms: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each arm's step in turn, ``repeats + 1`` rounds (the first is a warm-up)."""
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(repeats + 1):
        for arm, fn in arms.items():
            results[arm].append(fn())
            print(f"bench: {arm} step {results[arm][-1]['step_time_s']:.2f} s", flush=True)
    return results


def _race(cfg: Config, dist: DistributedStep, peers: dict, repeats: int) -> dict[str, list[dict]]:
    """(a)-(c): the distributed step, the same work in one process, TRL's trainers, in turn."""
    single = SingleProcessStep(cfg, dist.batch)
    # the single-process step samples with the seeds of the distributed step just run
    arms = {"distributed": dist.run, "single_process": lambda: single.run(dist.step_index - 1)}
    return _alternate(arms | _runs(peers), repeats)


def _runs(steps: dict) -> dict[str, Callable[[], dict]]:
    return {name: step.run for name, step in steps.items()}


def _seconds(steps: list[dict]) -> dict:
    return summary([s["step_time_s"] for s in steps[1:]])


def _peer_results(context: dict, version: str | None, results: dict, vllm: dict, load: list) -> dict:
    """(c): our step (HF rollout; and vLLM rollout, its own alternation) against each TRL trainer."""
    if version is None:
        return context | {
            "trl_gkd": "unavailable",
            "reason": "trl is not installed (pip install -e '.[bench]')",
        }
    ours = _seconds(results["distributed"])
    out = context | {
        "trl": version,
        "teacher_prompt": "the student's problem-only prompt (TRL has no privileged prompt)",
        "ours_teacher_prompt": "the privileged prompt (problem + reference, alpha = 1)",
        "ours_opsd": ours,
        "ours_tokens": summary([s["tokens"] for s in results["distributed"][1:]]),
        "load_average": load,
        "peers": {},
    }
    ours_vllm = _seconds(vllm["distributed_vllm_rollout"])
    ours_vllm_tokens = summary([s["tokens"] for s in vllm["distributed_vllm_rollout"][1:]])
    for peer in PEERS:
        theirs, theirs_vllm = _seconds(results[peer]), _seconds(vllm[peer])
        out["peers"][peer] = {
            "seconds": theirs,
            "tokens": summary([s["tokens"] for s in results[peer][1:]]),
            "ratio_ours_over_peer": ours["median"] / theirs["median"],
            "beside_vllm_rollout": {
                "ours_seconds": ours_vllm,
                "peer_seconds": theirs_vllm,
                "ours_tokens": ours_vllm_tokens,
                "peer_tokens": summary([s["tokens"] for s in vllm[peer][1:]]),
                "ratio_ours_over_peer": ours_vllm["median"] / theirs_vllm["median"],
            },
        }
    return out


def _start(model: str, repeats: int) -> tuple[Config, dict]:
    """Torch's threads, the local Ray instance, the workload's config and the results' context."""
    torch.set_num_threads(os.cpu_count() or 1)
    start_ray()
    cfg = bench_config(model)
    return cfg, {
        "machine": machine(),
        "model": model,
        "workload": WORKLOADS[model] | {"teacher_topk": cfg.teacher.topk},
        "repeats": repeats,
        "load_average_start": load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _weight_sync(context: dict, dist: DistributedStep, repeats: int, out: Path, prefix: str) -> dict:
    results_d = context | weight_sync.measure(dist, max(repeats, SYNC_REPEATS))
    results_d["load_average"] = load_average()
    _write(out, f"{prefix}weight_sync.json", results_d)
    return results_d


def run_weight_sync(model: str, repeats: int, out: Path, prefix: str = "") -> dict:
    """(d) alone, on actors that have run one step; the other tables are kept as they are."""
    cfg, context = _start(model, repeats)
    dist = DistributedStep(cfg)
    context["niceness"] = dist.niceness()
    dist.run()
    results_d = _weight_sync(context, dist, repeats, out, prefix)
    dist.shutdown()
    (out / "README.md").write_text(report.render(out))
    return {"weight_sync": results_d}


def run(
    model: str,
    repeats: int,
    out: Path,
    prefix: str = "",
    layouts: tuple[str, ...] = tuple(one_engine.LAYOUTS),
) -> dict:
    """Every part; ``layouts``: which of (i)'s layouts to run (all by default)."""
    cfg, context = _start(model, repeats)
    version = trl_version()
    batch = prepare_data(cfg).train[: cfg.trainer.prompts_per_step]  # the batch every arm trains on
    peers = {name: cls(cfg, batch) for name, cls in PEERS.items()} if version else {}
    vllm: dict[str, list[dict]] = {}
    if peers:  # the race against TRL with the rollout on vLLM, the engine of runs on real machines
        vllm_dist = DistributedStep(bench_config(model, "rollout.engine=vllm"), name="bench-vllm")
        vllm = _alternate({"distributed_vllm_rollout": vllm_dist.run} | _runs(peers), repeats)
        vllm_dist.shutdown()

    dist = DistributedStep(cfg)
    context["niceness"] = dist.niceness()
    results = _race(cfg, dist, peers, repeats)
    for peer in peers.values():
        peer.close()
    del peers
    opsd_steps = results["distributed"][1:]
    load_mid = load_average()

    results_b = context | {
        "distributed": _seconds(results["distributed"]),
        "single_process": {
            key: summary([s[key] for s in results["single_process"][1:]])
            for key in ("step_time_s", "rollout_s", "teacher_s", "student_update_s", "tokens")
        },
        "distributed_tokens": summary([s["tokens"] for s in opsd_steps]),
        "load_average": load_mid,
    }
    single_median = results_b["single_process"]["step_time_s"]["median"]
    results_b["ratio_distributed_over_single"] = results_b["distributed"]["median"] / single_median
    _write(out, f"{prefix}overhead.json", results_b)
    results_c = _peer_results(context, version, results, vllm, load_mid)
    _write(out, f"{prefix}peer_trl.json", results_c)

    atesd_cfg = bench_config(model, "algorithm=atesd")
    dist.use_controller(atesd_cfg, "bench-atesd-controller")
    atesd_steps = [dist.run() for _ in range(repeats + 1)][1:]
    time.sleep(2.0)  # task events reach the timeline within a second
    intervals = task_intervals()
    results_a = context | {
        "opsd": _stages(opsd_steps, intervals),
        "atesd": _stages(atesd_steps, intervals),
        "atesd_alpha": [s["alpha"] for s in atesd_steps],
        "tokens_per_step": summary([s["tokens"] for s in opsd_steps]),
    }

    _write(out, f"{prefix}step_breakdown.json", results_a)

    topk_cfg = bench_config(model, f"teacher.topk={TOPK}")
    results_e = context | {"teacher_transfer": memory.teacher_transfer(dist, topk_cfg, repeats)}
    results_e["resident_bytes"] = memory.resident_memory(dist)
    results_e["load_average"] = load_average()
    _write(out, f"{prefix}memory.json", results_e)
    # after the memory reading: a collective's staging buffer is the transport's, not a step's
    results_d = _weight_sync(context, dist, repeats, out, prefix)
    batch = dist.batch
    dist.shutdown()

    results_f = context | engines.measure(model, batch, repeats)
    results_f["load_average"] = load_average()
    _write(out, f"{prefix}engines.json", results_f)

    _write(out, f"{prefix}sync_bytes.json", context | sync_bytes.measure(delta_model=model))
    results_i = context | one_engine.measure(model, repeats, layouts)
    results_i["load_average"] = load_average()
    _write(out, f"{prefix}one_engine.json", results_i)

    results_g = context | scaling.measure(model, repeats)
    results_g["load_average"] = load_average()
    _write(out, f"{prefix}scaling.json", results_g)
    scaling.plot(results_g, out / f"{prefix}scaling.png")

    parts = {
        "step_breakdown": results_a,
        "overhead": results_b,
        "peer_trl": results_c,
        "weight_sync": results_d,
        "memory": results_e,
        "engines": results_f,
        "scaling": results_g,
        "one_engine": results_i,
    }
    (out / "README.md").write_text(report.render(out))
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--prefix", default="", help="file name prefix, e.g. baseline_")
    parser.add_argument(
        "--only-weight-sync", action="store_true", help="re-measure (d) alone, keeping the other results"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        (run_weight_sync if args.only_weight_sync else run)(args.model, args.repeats, args.out, args.prefix)
    finally:
        ray.shutdown()
    print((args.out / "README.md").read_text())
    print(f"bench: {time.perf_counter() - t0:.0f} s; results in {args.out}/")


if __name__ == "__main__":
    main()
