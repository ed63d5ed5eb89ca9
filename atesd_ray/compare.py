"""``make compare``: the methods side by side at the scale of the embedded demo.

``--suite paper`` (the default): ATESD, OPSD (α = 1) and one fixed α; ``--suite signals``: OPSD,
ATESD, and ATESD with each teacher-signal variant and the hindsight context (README, "The teacher's
context and signal"), two samples per problem. They train one after another on this machine from the
same SFT warm-up (``experiment=demo_warmup``, or ``--warmup-dir``), with the demo's budget, data and
seed (``experiment=demo``), the warm-up evaluated once at the start and each method every
``--eval-every`` steps and at the end. A method whose run finished in an earlier call is kept, so an
interrupted comparison goes on where it stopped. Writes into ``--out``: the runs, ``report.md`` /
``report.json`` (the ``mode=report`` table: Average@k per method with 95% intervals, and the
guardrails: pass@k, response lengths, mismatch, fork rate, entropy), ``compare.png`` (held-out
accuracy, teacher-student mismatch and fork rate against step) and ``verdict.txt``, a line that says
what the numbers show and whether the intervals separate the methods.

    python -m atesd_ray.compare --out runs/compare [--suite paper|signals] [--warmup-dir DIR]
        [--warmup OVERRIDE ...] [overrides of every method's run ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SUITES = {
    "paper": {
        "ATESD": ["algorithm=atesd"],
        "OPSD": ["algorithm=opsd"],
        "Fixed α=0.5": ["algorithm=fixed_exposure", "algorithm.alpha=0.5"],
    },
    # the teacher signal and the privileged context (atesd_ray/teacher_signal.py), each on ATESD
    "signals": {
        "OPSD": ["algorithm=opsd"],
        "ATESD": ["algorithm=atesd"],
        "ATESD + Purified": ["algorithm=atesd", "teacher.signal.contrast=reference_only"],
        "ATESD + RLCSD": ["algorithm=atesd", "teacher.signal.contrast=wrong_hint"],
        "ATESD + EGRSD": ["algorithm=atesd", "teacher.signal.entropy_gate=true"],
        "ATESD + hindsight": ["algorithm=atesd", "teacher.context=hindsight"],
    },
}
# what every run of a suite shares on top of experiment=demo: the signals suite samples two responses
# to each of half as many problems (peers for hindsight and wrong hints, the same rollouts a step) and
# evaluates 4 samples per problem at temperature 1, for pass@4 against Average@4
SHARED = {
    "paper": [],
    "signals": [
        "rollout.n_samples=2",
        "trainer.prompts_per_step=4",
        "eval.samples=4",
        "eval.temperature=1.0",
    ],
}
GUARDRAILS = ("mismatch_kl", "fork_rate", "fork_entropy", "entropy", "response_len")


def _slug(method: str) -> str:
    return method.lower().replace(" + ", "-").replace(" ", "-").replace("α=", "alpha")


def curves(run_dir: Path, before: dict) -> dict:
    """Held-out accuracy by step (0: ``before``, the warm-up's evaluation) and the guardrails per step."""
    k = before["k"]
    out: dict = {"accuracy": {0: before[f"avg@{k}"]}} | {g: {} for g in GUARDRAILS}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for g in GUARDRAILS:
            out[g][m["step"] + 1] = m.get(g)
        if f"eval/avg@{k}" in m:
            out["accuracy"][m["step"] + 1] = m[f"eval/avg@{k}"]
    return out


def guardrail_table(runs: dict[str, Path], before: dict) -> str:
    """Per method: held-out Average@k and pass@k after training, and the guardrails of its last step
    (mismatch KL, fork rate, entropy at forks, entropy, rollout response length; held-out length)."""
    k = before["k"]
    head = f"| method | avg@{k} | pass@{k} | held-out length | " + " | ".join(GUARDRAILS) + " |"
    lines = [head, "|" + "---|" * (4 + len(GUARDRAILS))]
    for method, run_dir in runs.items():
        after = json.loads((run_dir / "summary.json").read_text())["eval_after"]
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        cells = [
            f"{after[f'avg@{k}']:.3f}",
            f"{after[f'pass@{k}']:.3f}",
            f"{after.get('response_len', 0):.1f}",
        ]
        cells += [f"{last[g]:.4g}" if isinstance(last.get(g), float) else "–" for g in GUARDRAILS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, kl, fork) = plt.subplots(1, 3, figsize=(15, 3.8))
    for method, c in runs.items():
        for ax, key in ((acc, "accuracy"), (kl, "mismatch_kl"), (fork, "fork_rate")):
            steps = [s for s in sorted(c[key]) if c[key][s] is not None]
            ax.plot(steps, [c[key][s] for s in steps], marker="o" if key == "accuracy" else ".", label=method)
    acc.set(xlabel="step", ylabel="held-out Average@k", title="Held-out accuracy")
    kl.set(xlabel="step", ylabel="mean token KL(teacher || student)", title="Teacher-student mismatch")
    fork.set(xlabel="step", ylabel="share of rollout tokens", title="Fork rate (student entropy > 0.672)")
    for ax in (acc, kl, fork):
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
    parser.add_argument("--suite", choices=list(SUITES), default="paper", help="which methods to compare")
    parser.add_argument(
        "--warmup-dir", type=Path, help="an experiment=demo_warmup run to start from (default: train one)"
    )
    args, overrides = parser.parse_known_args(argv)
    out = args.out.resolve()

    from atesd_ray.config import compose
    from atesd_ray.console import configure_driver

    configure_driver("info")
    from atesd_ray.modes.report import build_report, report_markdown
    from atesd_ray.modes.train import run

    warmup = args.warmup_dir.resolve() if args.warmup_dir else out / "warmup"
    if not args.warmup_dir:
        run(compose("experiment=demo_warmup", *args.warmup, f"run_dir={warmup}"), warmup)
    runs: dict[str, Path] = {}
    for method, choice in SUITES[args.suite].items():
        run_dir = out / _slug(method)
        print(f"\n--- {method}: {run_dir}", flush=True)
        cfg = compose(
            "experiment=demo",
            *SHARED[args.suite],
            *choice,
            f"model.path={warmup}",
            f"eval.every_n_steps={args.eval_every}",
            f"eval.at_start={not runs}",  # the same warm-up, evaluated once
            "dashboard.enabled=false",
            f"run_dir={run_dir}",
            *overrides,
        )
        summary = run_dir / "summary.json"
        if not (summary.is_file() and "eval_after" in json.loads(summary.read_text())):
            run(cfg, run_dir)  # a method that finished in an earlier call of this command is kept
        runs[method] = run_dir
    before = json.loads((next(iter(runs.values())) / "summary.json").read_text())["eval_before"]
    # each run under its method's name (LABEL=DIR), so that the suite's ATESD variants are rows of
    # their own; a name holding "=" (Fixed α=0.5) would split there, and is the run's own label anyway
    report = build_report([str(d) if "=" in m else f"{m}={d}" for m, d in runs.items()], [])
    table = report_markdown(report)
    line = verdict(report["rows"])
    (out / "report.json").write_text(json.dumps(report | {"verdict": line}, indent=2))
    (out / "verdict.txt").write_text(line + "\n")
    guardrails = guardrail_table(runs, before)
    (out / "report.md").write_text(table + "\n" + line + "\n\n" + guardrails + "\n")
    figure = plot({m: curves(d, before) for m, d in runs.items()}, out / "compare.png")
    print(f"\n{table}\n{line}\n\n{guardrails}\nplot: {figure}\nreport: {out / 'report.md'}", flush=True)
    return report | {"verdict": line}


if __name__ == "__main__":
    main()
