"""(g) How a step's cost grows with its work: the distributed OPSD step and the single-process
reference, alternating, against prompts per step at the workload's generation length, and against
the generation length at the workload's prompts (``SHAPES``), on fresh actors for each shape.

Cost is fitted along each axis as seconds = a + b * tokens (least squares): more prompts and
longer generations add tokens at different prices (a prompt brings its forward passes, a longer
generation only decoding steps of the same batch). The table gives each shape's tokens/s and its
ratio of step times, and ``scaling.png`` both curves.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import WORKLOADS, bench_config, summary
from bench.distributed import DistributedStep
from bench.single_process import SingleProcessStep

# (prompts per step, new tokens): the workload's shape, then each axis varied alone
SHAPES = {
    "smollm2_135m": [(4, 32), (8, 32), (16, 32), (4, 64), (4, 128)],
    "tiny": [(4, 8), (8, 8), (4, 16)],
}


def axes(rows: list[dict]) -> dict[str, list[dict]]:
    """The shapes along each axis: more prompts at the first shape's length, longer generations
    at its prompts (the first shape is on both)."""
    base = rows[0]
    return {
        "prompts": [r for r in rows if r["new_tokens"] == base["new_tokens"]],
        "length": [r for r in rows if r["prompts"] == base["prompts"]],
    }


def _fit(points: list[tuple[float, float]]) -> dict:
    """seconds = intercept + per_token * tokens, least squares, and its R²."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    total = sum((y - my) ** 2 for _, y in points)
    return {
        "intercept_s": intercept,
        "per_1k_tokens_s": 1000 * slope,
        "r2": 1 - residual / total if total else 1.0,
    }


def measure(model: str, repeats: int) -> dict:
    rows = []
    for prompts, new_tokens in SHAPES[model]:
        cfg = bench_config(model, prompts=prompts, new_tokens=new_tokens)
        dist = DistributedStep(cfg, name=f"bench-scaling-{prompts}x{new_tokens}")
        try:
            single = SingleProcessStep(cfg, dist.batch)
            ours, theirs = [], []
            for _ in range(repeats + 1):  # the first round warms up
                ours.append(dist.run())
                theirs.append(single.run(dist.step_index - 1))
        finally:
            dist.shutdown()
        ours, theirs = ours[1:], theirs[1:]
        row = {
            "prompts": prompts,
            "new_tokens": new_tokens,
            "distributed_s": summary([s["step_time_s"] for s in ours]),
            "single_process_s": summary([s["step_time_s"] for s in theirs]),
            "tokens": summary([s["tokens"] for s in ours]),
        }
        tokens = row["tokens"]["median"]
        row["distributed_tokens_per_s"] = tokens / row["distributed_s"]["median"]
        row["single_process_tokens_per_s"] = tokens / row["single_process_s"]["median"]
        row["ratio_distributed_over_single"] = (
            row["distributed_s"]["median"] / row["single_process_s"]["median"]
        )
        rows.append(row)
        print(
            f"bench scaling: {prompts} x {new_tokens}: ratio {row['ratio_distributed_over_single']:.2f}",
            flush=True,
        )
    return {
        "workload": WORKLOADS[model],
        "shapes": rows,
        "fit": fits(rows),
    }


def fits(rows: list[dict]) -> dict:
    """Per arm and axis: seconds = intercept + per_token * tokens."""
    return {
        arm: {
            axis: _fit([(r["tokens"]["median"], r[f"{arm}_s"]["median"]) for r in chosen])
            for axis, chosen in axes(rows).items()
        }
        for arm in ("distributed", "single_process")
    }


def plot(data: dict, path: Path) -> None:
    """Step time against prompts per step (at the workload's length) and against the generation
    length (at the workload's prompts), both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"prompts": ("prompts per step", "prompts"), "length": ("new tokens per response", "new_tokens")}
    fig, panels = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, chosen) in zip(panels, axes(data["shapes"]).items(), strict=True):
        label, key = labels[axis]
        chosen = sorted(chosen, key=lambda r: r[key])
        for arm, color in (("distributed", "black"), ("single_process", "gray")):
            ax.plot([r[key] for r in chosen], [r[f"{arm}_s"]["median"] for r in chosen], "o-", color=color,
                    label=arm.replace("_", " "))  # fmt: skip
        for r in chosen:
            ax.annotate(f"{r['distributed_tokens_per_s']:.1f} tok/s", (r[key], r["distributed_s"]["median"]),
                        fontsize=7, textcoords="offset points", xytext=(4, -10))  # fmt: skip
        ax.set(xlabel=label, ylabel="step time (s)", xticks=[r[key] for r in chosen])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("step time against the work per step (distributed tokens/s annotated)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
