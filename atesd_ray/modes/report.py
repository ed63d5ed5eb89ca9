"""``mode=report``: the eval summaries of several runs in one table shaped like the paper's main table.

Rows are methods (Base, +SFT, +GRPO, OPSD, fixed α, ATESD, in that order, then any other), columns
the benchmarks' Average@k in percent and their mean. Each entry of ``report.runs`` is a directory
written by ``mode=eval`` (it holds ``eval/summary.json``) or a training run that evaluated at its
end (``eval.at_end``: its ``summary.json``), optionally labelled ``LABEL=DIR``; an
unlabelled row is named after how its checkpoint was trained (``trained_by`` in the summary), or
"Base" for an untrained model. ``report.paper_rows`` adds the published rows of DESIGN §4
(ATESD paper, arXiv 2605.11458, Average@12) for comparison. Writes ``report.md`` and
``report.json`` into ``report.output`` (default: the run directory) and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

from atesd_ray.config import Config
from atesd_ray.job import open_run_dir
from atesd_ray.tables import markdown_table

PAPER = "ATESD paper (arXiv 2605.11458)"
PAPER_SETS = ("aime24", "aime25", "hmmt25")
# DESIGN §4 main table: Average@12 on AIME24 / AIME25 / HMMT25 (the Base, +SFT and +GRPO rows are
# not in the brief, so they are not reproduced here)
PAPER_MAIN_TABLE = {
    "qwen3_1_7b": {"OPSD": (57.2, 43.9, 29.2), "ATESD": (59.17, 44.72, 29.17)},
    "qwen3_4b": {"OPSD": (76.4, 68.3, 46.1), "ATESD": (78.06, 71.39, 47.50)},
    "qwen3_8b": {"OPSD": (77.8, 70.8, 45.8), "ATESD": (80.56, 72.50, 48.33)},
}
SET_TITLES = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "hmmt25": "HMMT25",
    "math500": "MATH-500",
    "synthetic": "Synthetic",
}
METHOD_ORDER = ("Base", "+SFT", "+GRPO", "OPSD", "Fixed", "ATESD")


class ReportError(ValueError):
    pass


def method_label(trained_by: dict | None) -> str:
    """The paper's row name for a run: Base, +SFT, +GRPO, OPSD, Fixed α=…, ATESD."""
    if not trained_by:
        return "Base"
    algorithm = trained_by.get("algorithm")
    if algorithm == "fixed_exposure":
        return f"Fixed α={trained_by['alpha']:g}"
    return {"opsd": "OPSD", "atesd": "ATESD", "sft": "+SFT", "grpo": "+GRPO"}.get(
        algorithm, str(algorithm).upper()
    )


def parse_run(entry: str) -> tuple[str | None, Path]:
    """``LABEL=DIR`` or ``DIR``."""
    label, sep, path = entry.partition("=")
    if sep and label and "/" not in label:
        return label, Path(path)
    return None, Path(entry)


def _training_summary(path: Path) -> dict | None:
    """A training run's final held-out evaluation (``eval.at_end``) in the shape of an eval summary."""
    from atesd_ray.modes.evaluate import trained_by
    from atesd_ray.runtime.checkpoint import CheckpointManager

    if not (path / "summary.json").is_file():
        return None
    run = json.loads((path / "summary.json").read_text())
    if "eval_after" not in run:
        return None
    return {
        "model": run["model"],
        "protocol": {"samples": run["eval_after"]["k"]},
        "trained_by": trained_by(CheckpointManager(path, keep_last=1).latest()),
        "sets": {"held-out": run["eval_after"]},
    }


def run_row(entry: str) -> dict:
    """A table row from a ``mode=eval`` directory (``eval/summary.json``) or a training run that
    evaluated at its end (``summary.json``)."""
    label, path = parse_run(entry)
    summary_file = path / "eval" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else _training_summary(path)
    if summary is None:
        raise ReportError(
            f"report.runs: '{path}' has no eval/summary.json (nor a training summary.json with a final "
            f"evaluation); evaluate it first, e.g. `atesd-ray mode=eval eval.model=<run>/checkpoints/step_<N> run_dir={path}`"
        )
    k = summary["protocol"]["samples"]
    trained = summary.get("trained_by")
    return {
        "method": label or method_label(trained),
        "model": summary["model"],
        "source": str(path),
        "k": k,
        "step": trained.get("step") if trained else None,
        "values": {name: 100 * s[f"avg@{k}"] for name, s in summary["sets"].items()},
        "intervals": {
            name: [100 * v for v in s[f"avg@{k}_ci95"]]
            for name, s in summary["sets"].items()
            if f"avg@{k}_ci95" in s
        },
    }


def paper_rows(models: list[str]) -> list[dict]:
    return [
        {
            "method": method,
            "model": model,
            "source": PAPER,
            "k": 12,
            "step": None,
            "values": dict(zip(PAPER_SETS, values, strict=True)),
        }
        for model in models
        for method, values in PAPER_MAIN_TABLE[model].items()
    ]


def _merge(rows: list[dict]) -> list[dict]:
    """Rows of the same model, method and k from different evaluations (one per benchmark, say)
    become one row; a benchmark measured twice for one row is an error."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row["model"], row["method"], row["k"])
        if key not in merged:
            merged[key] = row | {"values": dict(row["values"]), "intervals": dict(row["intervals"])}
            continue
        into = merged[key]
        twice = set(into["values"]) & set(row["values"])
        if twice:
            raise ReportError(
                f"report.runs: {sorted(twice)} of {row['method']} ({row['model']}) is in both {into['source']} and {row['source']}"
            )
        into["values"] |= row["values"]
        into["intervals"] |= row["intervals"]
        into["source"] += f", {row['source']}"
    return list(merged.values())


def _order(row: dict) -> tuple:
    rank = next((i for i, m in enumerate(METHOD_ORDER) if row["method"].startswith(m)), len(METHOD_ORDER))
    return row["model"], row["source"] == PAPER, rank


def build_report(runs: list[str], paper_models: list[str]) -> dict:
    """Rows (sorted by model, then paper rows after measured ones, then method order) and columns
    (the paper's benchmarks, MATH-500, then other sets as first seen)."""
    rows = _merge([run_row(entry) for entry in runs]) + paper_rows(paper_models)
    seen = [name for row in rows for name in row["values"]]
    known = [*PAPER_SETS, "math500"]
    columns = [s for s in known if s in seen] + [s for s in dict.fromkeys(seen) if s not in known]
    for row in rows:
        have = [row["values"][c] for c in columns if c in row["values"]]
        row["avg"] = sum(have) / len(have) if len(have) == len(columns) else None
    return {"columns": columns, "rows": sorted(rows, key=_order)}


def report_markdown(report: dict) -> str:
    columns = report["columns"]
    ks = sorted({row["k"] for row in report["rows"]})
    headers = ["model", "method", *(SET_TITLES.get(c, c) for c in columns), "avg", "k", "source"]
    body = [
        [
            row["model"],
            row["method"],
            *(_entry(row, c) for c in columns),
            row["avg"],
            row["k"],
            row["source"],
        ]
        for row in report["rows"]
    ]
    note = (
        f"Average@k in percent (k = {', '.join(map(str, ks))}), with its 95% interval where measured; avg is "
        f"the mean over the columns, shown only for rows that have all of them.\n\n"
    )
    return note + markdown_table(headers, body)


def _entry(row: dict, column: str) -> float | str | None:
    value = row["values"].get(column)
    interval = row.get("intervals", {}).get(column)
    return f"{value:.2f} [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else value


def run(cfg: Config, run_dir: Path) -> dict:
    with open_run_dir(run_dir, cfg):
        report = build_report(list(cfg.report.runs), list(cfg.report.paper_rows))
        out = Path(cfg.report.output) if cfg.report.output else run_dir
        out.mkdir(parents=True, exist_ok=True)
        text = report_markdown(report)
        (out / "report.md").write_text(text)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(text, flush=True)
        return report
