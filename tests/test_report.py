"""mode=report: eval summaries of several runs in one table shaped like the paper's main table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atesd_ray.config import ConfigError
from atesd_ray.main import run_mode
from atesd_ray.modes.report import ReportError, build_report, method_label
from tests.conftest import make_config


def write_eval(run: Path, model: str, avgs: dict[str, float], trained_by: dict | None, k: int = 4) -> Path:
    """What mode=eval writes to eval/summary.json (the fields the report reads)."""
    (run / "eval").mkdir(parents=True)
    summary = {
        "model": model,
        "checkpoint": None,
        "trained_by": trained_by,
        "protocol": {"samples": k},
        "sets": {name: {"n_problems": 30, "k": k, f"avg@{k}": v} for name, v in avgs.items()},
    }
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    return run


def test_method_labels():
    assert method_label(None) == "Base"
    assert method_label({"algorithm": "fixed_exposure", "alpha": 0.5}) == "Fixed α=0.5"
    assert [method_label({"algorithm": a}) for a in ("opsd", "atesd", "sft", "grpo")] == [
        "OPSD",
        "ATESD",
        "+SFT",
        "+GRPO",
    ]


def test_report_rows_columns_and_averages(tmp_path):
    base = write_eval(tmp_path / "base", "qwen3_1_7b", {"aime25": 0.40, "aime24": 0.50, "hmmt25": 0.30}, None)
    atesd = write_eval(tmp_path / "atesd", "qwen3_1_7b", {"aime24": 0.60, "aime25": 0.45, "hmmt25": 0.30},
                       {"algorithm": "atesd", "alpha": 1.0, "step": 100})  # fmt: skip
    sft = write_eval(
        tmp_path / "sft", "qwen3_1_7b", {"aime24": 0.52, "aime25": 0.41}, {"algorithm": "sft", "step": 9}
    )
    report = build_report([str(atesd), f"mine={sft}", str(base)], ["qwen3_1_7b"])

    assert report["columns"] == ["aime24", "aime25", "hmmt25"]  # the paper's order, not the files'
    got = [(r["method"], r["source"]) for r in report["rows"]]
    assert got == [
        ("Base", str(base)),
        ("ATESD", str(atesd)),
        ("mine", str(sft)),
        ("OPSD", "ATESD paper (arXiv 2605.11458)"),
        ("ATESD", "ATESD paper (arXiv 2605.11458)"),
    ]
    rows = {(r["method"], r["source"]): r for r in report["rows"]}
    assert rows[("ATESD", str(atesd))]["values"] == pytest.approx(
        {"aime24": 60.0, "aime25": 45.0, "hmmt25": 30.0}
    )
    assert rows[("ATESD", str(atesd))]["avg"] == pytest.approx(45.0)
    assert rows[("mine", str(sft))]["avg"] is None  # lacks HMMT25: no average over a different set of columns
    paper_opsd = rows[("OPSD", "ATESD paper (arXiv 2605.11458)")]
    assert paper_opsd["values"] == {"aime24": 57.2, "aime25": 43.9, "hmmt25": 29.2}
    assert paper_opsd["avg"] == pytest.approx(43.43, abs=0.01)  # the paper prints 43.4


def test_report_mode_writes_and_prints(tmp_path, capsys):
    run = write_eval(
        tmp_path / "grpo", "tiny", {"synthetic": 0.25, "math500": 0.5}, {"algorithm": "grpo", "step": 2}
    )
    cfg = make_config("mode=report", f"report.runs=[{run}]", f"run_dir={tmp_path / 'report'}")
    report = run_mode(cfg, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    assert text in capsys.readouterr().out
    header, _, row = text.strip().splitlines()[-3:]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model",
        "method",
        "MATH-500",
        "Synthetic",
        "avg",
        "k",
        "source",
    ]
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "tiny",
        "+GRPO",
        "50.00",
        "25.00",
        "37.50",
        "4",
        str(run),
    ]


def test_report_errors_name_the_run(tmp_path):
    with pytest.raises(ReportError, match=f"'{tmp_path}' has no eval/summary.json"):
        build_report([str(tmp_path)], [])
    with pytest.raises(ConfigError, match="report.paper_rows"):
        make_config("mode=report", "report.paper_rows=[qwen3_2b]")
    with pytest.raises(ConfigError, match="report.runs"):
        make_config("mode=report")
