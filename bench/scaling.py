"""(g) How a step's cost grows with its work: the distributed OPSD step and the single-process
reference, alternating, against prompts per step at the workload's generation length, and against
the generation length at the workload's prompts (``SHAPES``), on fresh actors for each shape.

Cost is fitted as seconds = a + b * tokens over the shapes (least squares); the table gives each
shape's tokens/s and its ratio of step times, and ``scaling.png`` both curves.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import WORKLOADS, bench_config, summary
from bench.distributed import DistributedStep
from bench.single_process import SingleProcessStep

# (prompts per step, new tokens): the workload's shape, then each axis varied alone
SHAPES = {
    "smollm2_135m": [(4, 32), (8, 32), (16, 32), (4, 64), (4, 128)],
    "tiny": [(4, 8), (8, 16)],
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
        "fit": {
            arm: _fit([(r["tokens"]["median"], r[f"{arm}_s"]["median"]) for r in rows])
            for arm in ("distributed", "single_process")
        },
    }


def plot(data: dict, path: Path) -> None:
    """Step time against prompts per step (at the workload's length) and against the generation
    length (at the workload's prompts), both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, base = data["shapes"], data["shapes"][0]
    axes_rows = {
        "prompts per step": [r for r in rows if r["new_tokens"] == base["new_tokens"]],
        "new tokens per response": [r for r in rows if r["prompts"] == base["prompts"]],
    }
    fig, panels = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (label, chosen) in zip(panels, axes_rows.items(), strict=True):
        key = "prompts" if label.startswith("prompts") else "new_tokens"
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
