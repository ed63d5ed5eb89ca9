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


def write_training_run(
    run: Path, avg: float, ci: tuple, fork: tuple, kl: tuple, before: float | None = None
) -> Path:
    """What a training run with eval.at_end (and eval.at_start, ``before``) writes, the fields
    ``compare`` reads: summary.json's held-out evaluations and metrics.jsonl's first and last step."""
    run.mkdir(parents=True)
    held_out = {
        "k": 4,
        "avg@4": avg,
        "avg@4_ci95": list(ci),
        "pass@4": avg + 0.3,
        "response_len": 40 + 10 * avg,
    }
    summary = {"eval_after": held_out}
    if before is not None:
        summary["eval_before"] = {"k": 4, "avg@4": before, "avg@4_ci95": [before - 0.1, before + 0.1],
                                  "pass@4": 0.7, "response_len": 44.0}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    steps = [
        {"step": 0, "fork_rate": fork[0], "mismatch_kl": kl[0]},
        {"step": 1, "fork_rate": fork[1], "mismatch_kl": kl[1]},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    return run


def test_compare_sets_the_seeds_side_by_side(tmp_path):
    from atesd_ray.compare import report_seeds

    # two methods under two seeds: B above A on both, A above the warm-up on one seed only
    per_seed = {
        1: {"A": write_training_run(tmp_path / "1" / "a", 0.30, (0.2, 0.4), (0.1, 0.3), (0.2, 0.1), before=0.4),
            "B": write_training_run(tmp_path / "1" / "b", 0.50, (0.4, 0.6), (0.1, 0.2), (0.2, 0.05))},
        2: {"A": write_training_run(tmp_path / "2" / "a", 0.50, (0.4, 0.6), (0.2, 0.1), (0.4, 0.3), before=0.45),
            "B": write_training_run(tmp_path / "2" / "b", 0.60, (0.5, 0.7), (0.2, 0.4), (0.4, 0.15))},
    }  # fmt: skip
    out = report_seeds(per_seed, tmp_path)

    assert out["agreed"] == "above the warm-up on every seed: B; B above A on every seed."
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "seeds.md").read_text().splitlines()[2:] if line.startswith("|")}  # fmt: skip
    # per seed, then mean (sample sd), mean pass@4, mean length, fork and KL means first → last
    assert rows["warm-up"] == [
        "0.400 [0.300, 0.500]",
        "0.450 [0.350, 0.550]",
        "0.425 (0.035)",
        "0.700",
        "44.0",
        "–",
        "–",
    ]
    assert rows["A"] == ["0.300 [0.200, 0.400]", "0.500 [0.400, 0.600]", "0.400 (0.141)", "0.700", "44.0",
                         "0.150 → 0.200", "0.300 → 0.200"]  # fmt: skip
    assert rows["B"] == ["0.500 [0.400, 0.600]", "0.600 [0.500, 0.700]", "0.550 (0.071)", "0.850", "45.5",
                         "0.150 → 0.300", "0.300 → 0.100"]  # fmt: skip
    assert (tmp_path / "seeds.png").stat().st_size > 10_000


def test_compare_takes_the_seeds_one_way(capsys):
    from atesd_ray.compare import main

    with pytest.raises(SystemExit):
        main(["--seeds", "1,2", "+seed=3"])
    assert "give the seeds with --seeds or as seed=N, not both" in capsys.readouterr().err
