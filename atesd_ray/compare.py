"""``make compare``: the paper's comparison at the scale of the embedded demo.

ATESD, OPSD (α = 1) and one fixed α train one after another on this machine from the same SFT
warm-up (``experiment=demo_warmup``), with the demo's budget, data and seed (``experiment=demo``),
each evaluated on the same held-out problems at the start, every ``--eval-every`` steps and at the
end. Writes into ``--out``: the runs, ``report.md`` / ``report.json`` (the ``mode=report`` table:
Average@k per method with 95% intervals), ``compare.png`` (held-out accuracy and teacher-student
mismatch against step for the three methods) and ``verdict.txt``, a line that says what the numbers
show and whether the intervals separate the methods.

    python -m atesd_ray.compare --out runs/compare [--warmup OVERRIDE ...] [overrides of the three runs ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = {
    "ATESD": ["algorithm=atesd"],
    "OPSD": ["algorithm=opsd"],
    "Fixed α=0.5": ["algorithm=fixed_exposure", "algorithm.alpha=0.5"],
}


def _slug(method: str) -> str:
    return method.lower().replace(" ", "-").replace("α=", "alpha")


def curves(run_dir: Path) -> dict:
    """Held-out accuracy by step (0: before training) and mismatch KL per step, from one run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    k = summary["eval_before"]["k"]
    accuracy = {0: summary["eval_before"][f"avg@{k}"]}
    mismatch = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        mismatch[m["step"] + 1] = m["mismatch_kl"]
        if f"eval/avg@{k}" in m:
            accuracy[m["step"] + 1] = m[f"eval/avg@{k}"]
    return {"accuracy": accuracy, "mismatch": mismatch}


def plot(runs: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, c in runs.items():
        steps = sorted(c["accuracy"])
        acc.plot(steps, [c["accuracy"][s] for s in steps], marker="o", label=method)
        steps = sorted(c["mismatch"])
        kl.plot(steps, [c["mismatch"][s] for s in steps], marker=".", label=method)
    acc.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy")
    kl.set(xlabel="step", ylabel="mean token KL(teacher || student)", title="Teacher-student mismatch")
    for ax in (acc, kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdict(rows: list[dict]) -> str:
    """What the final held-out accuracies show, and whether their 95% intervals separate them."""
    scored = sorted(
        ((r["method"], r["values"]["held-out"], r["intervals"]["held-out"]) for r in rows),
        key=lambda r: -r[1],
    )
    (best, _, (low, _)), rest = scored[0], scored[1:]
    shown = "; ".join(f"{m} {v:.1f}% [{lo:.1f}, {hi:.1f}]" for m, v, (lo, hi) in scored)
    beaten = [m for m, _, (_, hi) in rest if hi < low]
    if len(beaten) == len(rest):
        return f"{best} is best beyond the 95% intervals: {shown}."
    if beaten:
        return f"{best} leads ({shown}); its interval clears only {', '.join(beaten)}."
    return f"No method is distinguishable at this scale: the 95% intervals overlap ({shown})."


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--eval-every", type=int, default=4, help="held-out evaluation every N steps")
    parser.add_argument(
        "--warmup",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="a Hydra override for the warm-up run",
    )
    args, overrides = parser.parse_known_args(argv)
    out = args.out.resolve()

    from atesd_ray.config import compose
    from atesd_ray.console import configure_driver

    configure_driver("info")
    from atesd_ray.modes.report import build_report, report_markdown
    from atesd_ray.modes.train import run

    warmup = out / "warmup"
    run(compose("experiment=demo_warmup", *args.warmup, f"run_dir={warmup}"), warmup)
    runs = {}
    for method, choice in METHODS.items():
        run_dir = out / _slug(method)
        print(f"\n--- {method}: {run_dir}", flush=True)
        cfg = compose(
            "experiment=demo",
            *choice,
            f"model.path={warmup}",
            f"eval.every_n_steps={args.eval_every}",
            "dashboard.enabled=false",
            f"run_dir={run_dir}",
            *overrides,
        )
        run(cfg, run_dir)
        runs[method] = run_dir
    report = build_report([str(d) for d in runs.values()], [])
    table = report_markdown(report)
    line = verdict(report["rows"])
    (out / "report.md").write_text(table + "\n" + line + "\n")
    (out / "report.json").write_text(json.dumps(report | {"verdict": line}, indent=2))
    (out / "verdict.txt").write_text(line + "\n")
    figure = plot({m: curves(d) for m, d in runs.items()}, out / "compare.png")
    print(f"\n{table}\n{line}\nplot: {figure}\nreport: {out / 'report.md'}", flush=True)
    return report | {"verdict": line}


if __name__ == "__main__":
    main()
