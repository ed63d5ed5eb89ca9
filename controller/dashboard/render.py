"""The end-of-run picture of the controller: ``controller_timeline.png`` in the run directory.

The same views as the live page, drawn on a bare matplotlib ``Figure`` (rendered by Agg; no
display and no pyplot state in the driver): α per step with the hold windows shaded, the reward
and its parts per decision, the state features at each decision, and the student's loss,
mismatch and accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from controller.dashboard.data import METRICS_FILE, TIMELINE_FILE, read_jsonl

PNG_FILE = "controller_timeline.png"


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def _value(entry: dict, key: str) -> float:
    """A number to plot; a missing one (e.g. G_gt of an ablated reward) is a gap."""
    value = entry.get(key)
    return value if isinstance(value, int | float) else math.nan


def render_timeline(run_dir: Path) -> Path | None:
    """Draw the run's timeline and metrics; returns the PNG's path (None when no step was logged)."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / METRICS_FILE)
    decisions = read_jsonl(run_dir / TIMELINE_FILE)
    if not rows:
        return None
    fig = Figure(figsize=(13, 10), layout="constrained")
    axes = fig.subplots(3, 2)
    fig.suptitle(f"{run_dir.resolve().name}: exposure controller and student")
    ax = axes[0, 0]
    for i, d in enumerate(decisions):
        ax.axvspan(
            d["first_step"] - 0.5, d["last_step"] + 0.5, color=("#e0e7ff" if i % 2 else "#ede9fe"), lw=0
        )
    ax.plot(*_series(rows, "alpha"), "o-", color="#155eef")
    ax.set(title="α per step (shaded: hold windows)", xlabel="step", ylabel="α", ylim=(0, 1.05))

    ax = axes[0, 1]
    scored = [d for d in decisions if d.get("reward") is not None]
    if scored:
        x = [d["decision"] for d in scored]
        ax.bar(x, [d["reward"] for d in scored], color="#155eef", alpha=0.7, label="R")
        ax.plot(x, [_value(d, "g_lp") for d in scored], "o-", color="#e04f16", label="G_lp")
        ax.plot(x, [_value(d, "g_gt") for d in scored], "s-", color="#079455", label="G_gt")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no scored decision", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="reward per decision", xlabel="decision")

    ax = axes[1, 0]
    with_features = [d for d in decisions if d.get("features")]
    for name in with_features[-1]["features"] if with_features else []:
        ax.plot(
            [d["first_step"] for d in with_features],
            [_value(d["features"], name) for d in with_features],
            "o-",
            label=name,
        )
    if with_features:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
    ax.set(title="state features at each decision (raw)", xlabel="step of the decision")

    for ax, keys, title in (
        (axes[1, 1], ("loss",), "student loss"),
        (axes[2, 0], ("mismatch_kl", "top1_disagree"), "teacher-student mismatch"),
        (axes[2, 1], ("accuracy",), "rollout accuracy"),
    ):
        for key in keys:
            ax.plot(*_series(rows, key), "o-", label=key)
        ax.set(title=title, xlabel="step")
        ax.legend()
    axes[2, 1].set_ylim(-0.02, 1.02)
    path = run_dir / PNG_FILE
    fig.savefig(path, dpi=90)
    return path
