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

``--seeds 42,7,1234`` runs the suite once per seed (into ``OUT/seed-N``, each with its own report,
verdict and plot, all from the one warm-up; the seed also draws the held-out samples, so the warm-up
is evaluated under each) and sets the seeds side by side: ``seeds.md`` (each method's Average@k per
seed, their mean and spread, the guardrails' means, and which orderings every seed agrees on) and
``seeds.png``.

    python -m atesd_ray.compare --out runs/compare [--suite paper|signals] [--warmup-dir DIR]
        [--seeds N,N,...] [--warmup OVERRIDE ...] [overrides of every method's run ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from atesd_ray.tables import markdown_table

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


def step_series(run_dir: Path, keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """Each of ``keys`` by step (1-based), from the run's metrics.jsonl, where the step logged it."""
    out: dict[str, dict[int, float]] = {key: {} for key in keys}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for key in keys:
            if m.get(key) is not None:
                out[key][m["step"] + 1] = m[key]
    return out


def curves(run_dir: Path, before: dict) -> dict:
    """Held-out accuracy by step (0: ``before``, the warm-up's evaluation) and the guardrails per step."""
    accuracy = f"eval/avg@{before['k']}"
    series = step_series(run_dir, (*GUARDRAILS, accuracy))
    return {"accuracy": {0: before[f"avg@{before['k']}"]} | series.pop(accuracy), **series}


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


def _held_out(evaluation: dict) -> dict:
    """A held-out evaluation's Average@k, its 95% interval, pass@k and response length."""
    k = evaluation["k"]
    return {
        "k": k,
        "avg": evaluation[f"avg@{k}"],
        "ci": evaluation[f"avg@{k}_ci95"],
        "pass": evaluation[f"pass@{k}"],
        "len": evaluation.get("response_len"),
    }


def seed_rows(per_seed: dict[int, dict[str, Path]]) -> tuple[dict, dict]:
    """Per seed, the warm-up's held-out evaluation; per method and seed, the final one, and the
    first and last step's fork rate and mismatch KL."""
    warmup, rows = {}, {}
    for seed, runs in per_seed.items():
        first = json.loads((next(iter(runs.values())) / "summary.json").read_text())
        warmup[seed] = _held_out(first["eval_before"])
        for method, run_dir in runs.items():
            after = json.loads((run_dir / "summary.json").read_text())["eval_after"]
            steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows.setdefault(method, {})[seed] = _held_out(after) | {
                "fork": (steps[0].get("fork_rate"), steps[-1].get("fork_rate")),
                "kl": (steps[0].get("mismatch_kl"), steps[-1].get("mismatch_kl")),
            }
    return warmup, rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def seeds_table(warmup: dict, rows: dict) -> str:
    """The methods (and the warm-up) by seed: Average@k [95% CI] per seed, the mean and standard
    deviation over seeds, and the means of pass@k, held-out length, fork rate and mismatch KL."""
    seeds = list(warmup)
    k = next(iter(warmup.values()))["k"]
    headers = ["method", *(f"seed {s}: Average@{k} [95% CI]" for s in seeds), f"mean Average@{k} (sd)"]
    headers += [
        f"mean pass@{k}",
        "mean held-out length",
        "fork rate, first → last step",
        "mismatch KL, first → last step",
    ]
    lines = []
    for method, per in {"warm-up": warmup, **rows}.items():
        avgs = [per[s]["avg"] for s in seeds]
        spread = f" ({statistics.stdev(avgs):.3f})" if len(avgs) > 1 else ""
        cells = [f"{per[s]['avg']:.3f} [{per[s]['ci'][0]:.3f}, {per[s]['ci'][1]:.3f}]" for s in seeds]
        cells += [f"{_mean(avgs):.3f}{spread}", _mean([per[s]["pass"] for s in seeds])]
        length = _mean([per[s]["len"] for s in seeds])
        cells.append(None if length is None else f"{length:.1f}")
        for key in ("fork", "kl"):
            first, last = (_mean([per[s][key][i] for s in seeds if key in per[s]]) for i in (0, 1))
            cells.append(f"{first:.3f} → {last:.3f}" if first is not None and last is not None else None)
        lines.append([method, *cells])
    return markdown_table(headers, lines, digits=3)


def seeds_agree(warmup: dict, rows: dict) -> str:
    """The orderings every seed agrees on: methods above (or below) the warm-up, and each method's
    lead over others, in Average@k, on every seed."""
    seeds = list(warmup)
    said = []
    for side, sign in (("above", 1), ("below", -1)):
        named = [
            m for m, per in rows.items() if all(sign * (per[s]["avg"] - warmup[s]["avg"]) > 0 for s in seeds)
        ]
        if named:
            said.append(f"{side} the warm-up on every seed: {', '.join(named)}")
    for method, per in rows.items():
        beaten = [
            o
            for o, other in rows.items()
            if o != method and all(per[s]["avg"] > other[s]["avg"] for s in seeds)
        ]
        if beaten:
            said.append(f"{method} above {', '.join(beaten)} on every seed")
    if not said:
        return f"No ordering holds on all {len(seeds)} seeds."
    return "; ".join(said) + "."


def seeds_plot(warmup: dict, rows: dict, per_seed: dict[int, dict[str, Path]], path: Path) -> Path:
    """Final held-out Average@k per method and seed with 95% intervals (the warm-up's dashed), and
    the mismatch KL and fork rate against step, means over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, methods = list(warmup), list(rows)
    k = next(iter(warmup.values()))["k"]
    fig, (acc, kl, fork) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for i, seed in enumerate(seeds):
        colour = f"C{i}"
        x = [j + (i - (len(seeds) - 1) / 2) * 0.2 for j in range(len(methods))]
        y = [rows[m][seed]["avg"] for m in methods]
        low = [v - rows[m][seed]["ci"][0] for m, v in zip(methods, y, strict=True)]
        high = [rows[m][seed]["ci"][1] - v for m, v in zip(methods, y, strict=True)]
        acc.errorbar(x, y, yerr=[low, high], fmt="o", color=colour, capsize=3, label=f"seed {seed}")
        acc.axhline(warmup[seed]["avg"], color=colour, linestyle="--", linewidth=1)
    acc.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    acc.set(ylabel=f"held-out Average@{k} (95% CI)", title="After training (dashed: the warm-up)")
    for method in methods:
        per_run = [step_series(per_seed[s][method], ("mismatch_kl", "fork_rate")) for s in seeds]
        for ax, key in ((kl, "mismatch_kl"), (fork, "fork_rate")):
            steps = sorted(set.intersection(*(set(c[key]) for c in per_run)))
            means = [_mean([c[key][step] for c in per_run]) for step in steps]
            ax.plot(steps, means, marker=".", label=method)
    kl.set(xlabel="step", ylabel="mean token KL(teacher || student)", title="Mismatch, mean over seeds")
    fork.set(xlabel="step", ylabel="share of rollout tokens", title="Fork rate, mean over seeds")
    for ax in (acc, kl, fork):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_suite(suite: str, out: Path, warmup: Path, eval_every: int, overrides: list[str]) -> dict[str, Path]:
    """Each method of the suite trained from ``warmup`` into ``out/<method>`` (a finished one kept)."""
    from atesd_ray.config import compose
    from atesd_ray.modes.train import run

    runs: dict[str, Path] = {}
    for method, choice in SUITES[suite].items():
        run_dir = out / _slug(method)
        print(f"\n--- {method}: {run_dir}", flush=True)
        cfg = compose(
            "experiment=demo",
            *SHARED[suite],
            *choice,
            f"model.path={warmup}",
            f"eval.every_n_steps={eval_every}",
            f"eval.at_start={not runs}",  # the same warm-up, evaluated once
            "dashboard.enabled=false",
            f"run_dir={run_dir}",
            *overrides,
        )
        summary = run_dir / "summary.json"
        if not (summary.is_file() and "eval_after" in json.loads(summary.read_text())):
            run(cfg, run_dir)  # a method that finished in an earlier call of this command is kept
        runs[method] = run_dir
    return runs


def report_suite(runs: dict[str, Path], out: Path) -> dict:
    """``report.md``, ``report.json``, ``verdict.txt`` and ``compare.png`` for one suite's runs."""
    from atesd_ray.modes.report import build_report, report_markdown

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


def report_seeds(per_seed: dict[int, dict[str, Path]], out: Path) -> dict:
    """``seeds.md`` and ``seeds.png``: the suite's methods side by side over the seeds."""
    warmup, rows = seed_rows(per_seed)
    table, agreed = seeds_table(warmup, rows), seeds_agree(warmup, rows)
    (out / "seeds.md").write_text(table + "\n" + agreed + "\n")
    figure = seeds_plot(warmup, rows, per_seed, out / "seeds.png")
    print(f"\n{table}\n{agreed}\nplot: {figure}\nreport: {out / 'seeds.md'}", flush=True)
    return {"warmup": warmup, "methods": rows, "agreed": agreed}


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
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(seed) for seed in text.split(",")],
        metavar="N,N,...",
        help="run the suite once per seed (OUT/seed-N) and set them side by side",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.seeds and any(o.lstrip("+").startswith("seed=") for o in overrides):
        parser.error("give the seeds with --seeds or as seed=N, not both")
    out = args.out.resolve()

    from atesd_ray.config import compose
    from atesd_ray.console import configure_driver

    configure_driver("info")
    from atesd_ray.modes.train import run

    warmup = args.warmup_dir.resolve() if args.warmup_dir else out / "warmup"
    if not args.warmup_dir:
        run(compose("experiment=demo_warmup", *args.warmup, f"run_dir={warmup}"), warmup)
    if not args.seeds:
        return report_suite(run_suite(args.suite, out, warmup, args.eval_every, overrides), out)
    per_seed = {}
    for seed in args.seeds:
        seed_out = out / f"seed-{seed}"
        per_seed[seed] = run_suite(
            args.suite, seed_out, warmup, args.eval_every, [*overrides, f"seed={seed}"]
        )
        report_suite(per_seed[seed], seed_out)
    return report_seeds(per_seed, out)


if __name__ == "__main__":
    main()
