"""The end-of-run block the driver prints last: what changed, what the controller chose, where the
run lives and how to continue it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atesd_ray.config import Config


def fmt_eval(summary: dict) -> str:
    k = summary["k"]
    lo, hi = summary.get(f"avg@{k}_ci95", (None, None))
    interval = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None else ""
    return f"avg@{k}={summary[f'avg@{k}']:.3f}{interval} over {summary['n_problems']} problems"


def init_provenance(cfg: Config) -> dict | None:
    """Where a model loaded from a run directory came from (``model.path=<run>``): that run's
    algorithm, steps and held-out accuracy before it trained."""
    if cfg.model.source != "path" or not (Path(cfg.model.path) / "summary.json").is_file():
        return None
    earlier = json.loads((Path(cfg.model.path) / "summary.json").read_text())
    keep = ("run_dir", "algorithm", "total_steps", "eval_before", "eval_after")
    return {k: earlier[k] for k in keep if k in earlier}


def _decision_lines(timeline: Path) -> list[str]:
    """One line per controller decision: its steps, α, and reward (with G_lp and G_gt) once scored."""
    if not timeline.is_file():
        return []
    lines = []
    for row in map(json.loads, timeline.read_text().splitlines()):
        steps = f"steps {row['first_step'] + 1}-{row['last_step'] + 1}"
        scored = row["status"] != "open"
        reward = (
            f"reward {row['reward']:+.4f} (G_lp {row['g_lp']:+.4f}, G_gt {row['g_gt']:+.3f})"
            if scored
            else "not scored yet (its look-ahead runs past the last step)"
        )
        lines.append(f"  decision {row['decision']}: {steps}, alpha={row['alpha']:.3f}, {reward}")
    return lines


def summary_text(summary: dict, first: dict | None) -> str:
    """The end-of-run block: what changed, what the controller chose, where the run lives, how to
    continue it."""
    last = summary.get("final_metrics", {})
    lines = [
        "",
        "=" * 72,
        f"{summary['algorithm']} on {summary['model']}: steps {summary['start_step']}..{summary['total_steps']}",
    ]
    init = summary.get("init")
    if init:
        lines.append(f"started from:   {init['run_dir']} ({init['algorithm']}, {init['total_steps']} steps)")
        if "eval_before" in init:
            lines.append(f"held-out accuracy before {init['algorithm']}: {fmt_eval(init['eval_before'])}")
    if "eval_before" in summary:
        lines.append(f"held-out accuracy before: {fmt_eval(summary['eval_before'])}")
    if "eval_after" in summary:
        lines.append(f"held-out accuracy after:  {fmt_eval(summary['eval_after'])}")
    if first:
        for key in ("loss", "mismatch_kl", "probe_nll", "probe_kl", "accuracy"):
            if key in first and key in last:
                lines.append(f"{key:>12}: {first[key]:.4f} (first step) -> {last[key]:.4f} (last step)")
    run_dir = Path(summary["run_dir"])
    decisions = _decision_lines(run_dir / "controller_timeline.jsonl")
    if decisions:
        lines += ["controller decisions (controller_timeline.jsonl):", *decisions]
    if summary.get("dashboard"):
        lines.append(
            f"live page:     {summary['dashboard']}  (python -m controller.dashboard {run_dir} after the run)"
        )
    lines += [
        f"run directory: {run_dir}  (metrics.jsonl, tensorboard/, checkpoints/ with huggingface/ folders, summary.json)",
        f"continue it:   atesd-ray <same overrides> run_dir={run_dir} trainer.total_steps=<more> (resume=auto is the default)",
        "=" * 72,
    ]
    return "\n".join(lines)
