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
    "tiny": [(4, 8), (8, 8), (4, 16)],
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["shapes"]
    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, color in (("distributed", "black"), ("single_process", "gray")):
        pts = sorted((r["tokens"]["median"], r[f"{arm}_s"]["median"], r[f"{arm}_tokens_per_s"]) for r in rows)
        ax_time.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=arm.replace("_", " "))
        ax_rate.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=color, label=arm.replace("_", " "))
    for r in rows:
        ax_time.annotate(
            f"{r['prompts']}x{r['new_tokens']}",
            (r["tokens"]["median"], r["distributed_s"]["median"]),
            fontsize=7,
        )
    ax_time.set(xlabel="response tokens per step", ylabel="step time (s)", title="step time")
    ax_rate.set(xlabel="response tokens per step", ylabel="tokens / s", title="throughput")
    for ax in (ax_time, ax_rate):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
