"""``mode=sweep_exposure``: the fixed-exposure mismatch diagnostic (DESIGN §4, §7).

The student answers ``sweep.problems`` training problems once (``rollout.n_samples`` each); the
teacher scores those same responses at every α of ``sweep.alphas``; the student group then measures,
per response token, KL(p_T^α || p_S), whether the two top-1 tokens differ, and the student's
confidence. Reported per α, over all tokens and per difficulty level: mean token KL, its tail (p95,
max), top-1 disagreement, confidence, and the teacher-grounded signal g. Writes
``sweep_exposure.json``, ``sweep_exposure.md`` and ``sweep_exposure.png`` into the run directory.

The student side is measured by the student group (``StudentRank.mismatch``) rather than by the
teacher actor running a second forward on the student prompt: the numbers then come from the
training step's own code (the FSDP student, the loss temperature, the KL over the teacher's support
with its tail bucket when top-k), so the sweep at α reports what a fixed-α run logs as
``mismatch_kl`` / ``top1_disagree`` at its first step, and each actor keeps one job (the teacher
scores the privileged context; the student knows its own distribution).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atesd_ray import algorithms
from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import launch_rollouts
from atesd_ray.config import Config
from atesd_ray.job import open_run_dir, prepare_data
from atesd_ray.runtime.cluster import place
from atesd_ray.tables import markdown_table


def mismatch_summary(rows: list[dict]) -> dict:
    """Token-level statistics over ``rows`` (each: per-token kl, disagree, confidence; grounding)."""
    kl = np.concatenate([np.asarray(r["kl"], dtype=np.float64) for r in rows]) if rows else np.zeros(0)
    disagree = (
        np.concatenate([np.asarray(r["disagree"], dtype=np.float64) for r in rows]) if rows else np.zeros(0)
    )
    confidence = (
        np.concatenate([np.asarray(r["confidence"], dtype=np.float64) for r in rows]) if rows else np.zeros(0)
    )
    empty = kl.size == 0
    return {
        "responses": len(rows),
        "tokens": int(kl.size),
        "kl_mean": math.nan if empty else float(kl.mean()),
        "kl_p95": math.nan if empty else float(np.percentile(kl, 95)),
        "kl_max": math.nan if empty else float(kl.max()),
        "top1_disagree": math.nan if empty else float(disagree.mean()),
        "confidence": math.nan if empty else float(confidence.mean()),
        "grounding": float(np.mean([r["grounding"] for r in rows])) if rows else math.nan,
    }


def summarize_alpha(alpha: float, rows: list[dict]) -> dict:
    levels = sorted({r["difficulty"] for r in rows if r["difficulty"] is not None})
    return {
        "alpha": alpha,
        **mismatch_summary(rows),
        "levels": {
            str(level): mismatch_summary([r for r in rows if r["difficulty"] == level]) for level in levels
        },
    }


def sweep_table(results: list[dict]) -> str:
    levels = sorted({lv for r in results for lv in r["levels"]}, key=int)
    headers = [
        "α",
        "tokens",
        "mean KL",
        "p95 KL",
        "max KL",
        "top-1 disagree",
        "confidence",
        "g",
        *(f"mean KL L{lv}" for lv in levels),
    ]
    rows = [
        [
            f"{r['alpha']:.2f}",
            r["tokens"],
            r["kl_mean"],
            r["kl_p95"],
            r["kl_max"],
            r["top1_disagree"],
            r["confidence"],
            r["grounding"],
            *(r["levels"][lv]["kl_mean"] if lv in r["levels"] else None for lv in levels),
        ]
        for r in results
    ]
    return markdown_table(headers, rows, digits=4)


def rises_with_alpha(results: list[dict], key: str = "kl_mean") -> bool:
    ordered = [r[key] for r in sorted(results, key=lambda r: r["alpha"])]
    return all(b > a for a, b in zip(ordered, ordered[1:], strict=False))


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in results]
    levels = sorted({lv for r in results for lv in r["levels"]}, key=int)
    fig, (ax_kl, ax_top1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_kl.plot(alphas, [r["kl_mean"] for r in results], "o-", color="black", label="mean (all)")
    ax_kl.plot(alphas, [r["kl_p95"] for r in results], "s--", color="gray", label="p95 (all)")
    ax_top1.plot(alphas, [r["top1_disagree"] for r in results], "o-", color="black", label="all")
    for lv in levels:
        pts = [(r["alpha"], r["levels"][lv]) for r in results if lv in r["levels"]]
        ax_kl.plot(
            [a for a, _ in pts], [s["kl_mean"] for _, s in pts], ".-", alpha=0.7, label=f"mean (level {lv})"
        )
        ax_top1.plot(
            [a for a, _ in pts], [s["top1_disagree"] for _, s in pts], ".-", alpha=0.7, label=f"level {lv}"
        )
    ax_kl.set(xlabel="exposure α", ylabel="token KL(teacher ‖ student)", title="mismatch")
    ax_top1.set(xlabel="exposure α", ylabel="top-1 disagreement", title="top-1 disagreement")
    for ax in (ax_kl, ax_top1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config, run_dir: Path) -> dict:
    """Run the sweep; returns what ``sweep_exposure.json`` holds."""
    algorithms.check(cfg)
    with open_run_dir(run_dir, cfg):
        data = prepare_data(cfg)
        records = data.train[: cfg.sweep.problems]
        print(f"{data.summary}; sweeping α over {cfg.sweep.alphas} on {len(records)} problems", flush=True)
        place(cfg)
        # the sweep reports g per exposure: its teachers measure it whatever the controller
        name = f"atesd-sweep-{run_dir.resolve().name}-{int(time.time())}"
        actors = build_actors(cfg, 1, name=name, signals=frozenset({"grounding"}))
        results = []
        try:
            rollouts = launch_rollouts(actors, records, step=0, min_version=0)
            per_alpha = len(records) * cfg.rollout.n_samples
            # on a terminal: problems x samples scored, over all alphas (the rollouts are sampled once)
            with tqdm(
                total=len(cfg.sweep.alphas) * per_alpha,
                desc="α sweep",
                unit="sample",
                disable=None,
                leave=False,
            ) as bar:
                for alpha in cfg.sweep.alphas:
                    t0 = time.perf_counter()
                    scored = actors.teachers.score(rollouts, alpha)
                    rows = actors.students.mismatch(rollouts, scored).get()
                    results.append(summarize_alpha(alpha, rows) | {"time_s": time.perf_counter() - t0})
                    r = results[-1]
                    bar.update(per_alpha)
                    bar.write(
                        f"α={alpha:.2f}: mean KL {r['kl_mean']:.4f}, p95 {r['kl_p95']:.4f}, max {r['kl_max']:.4f}, "
                        f"top-1 disagree {r['top1_disagree']:.4f} over {r['tokens']} tokens"
                    )
        finally:
            actors.shutdown()
        monotonic = rises_with_alpha(results)
        out = {
            "model": cfg.model.name,
            "problems": len(records),
            "samples_per_problem": cfg.rollout.n_samples,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "temperature": cfg.algorithm.loss.temperature,
            "teacher_topk": cfg.teacher.topk,
            "kl_rises_with_alpha": monotonic,
            "results": results,
        }
        table = sweep_table(results)
        head = (
            f"Fixed-exposure sweep: {cfg.model.name}, {len(records)} problems x {cfg.rollout.n_samples} samples, "
            f"up to {cfg.rollout.max_new_tokens} new tokens; per-token statistics at the loss temperature "
            f"{cfg.algorithm.loss.temperature}.\n\n"
        )
        text = head + table + f"\nMean token KL rises monotonically with α: {'yes' if monotonic else 'no'}\n"
        (run_dir / "sweep_exposure.json").write_text(json.dumps(out, indent=2))
        (run_dir / "sweep_exposure.md").write_text(text)
        plot(
            results,
            run_dir / "sweep_exposure.png",
            f"fixed-exposure sweep: {cfg.model.name}, {len(records)} problems",
        )
        print(text, flush=True)
        return out
