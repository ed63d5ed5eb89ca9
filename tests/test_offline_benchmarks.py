"""The paper's benchmark sets from local files (the JSONL copies of AIME 2024, AIME 2025 and HMMT Feb
2025 in ../shared/data, read in place, never copied): ``mode=eval`` of the bundled model over all
their problems writes the summary with every row mapped and graded, the files' own answers grade as
correct, and ``mode=report`` builds the paper-shaped table from them. Also W&B in offline mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from atesd_ray.data.loaders import load_eval_set
from atesd_ray.grading import grade_many
from atesd_ray.main import run_mode
from tests.conftest import TINY, make_config

ROOT = Path(__file__).resolve().parents[1]
FILES = {"aime24": "aime_2024.jsonl", "aime25": "aime_2025.jsonl", "hmmt25": "hmmt_feb_2025.jsonl"}


def _shared_data() -> Path | None:
    for candidate in (
        os.environ.get("ATESD_SHARED_DATA"),
        ROOT.parent / "shared" / "data",
        "/work/shared/data",
    ):
        if candidate and all((Path(candidate) / f).is_file() for f in FILES.values()):
            return Path(candidate)
    return None


DATA = _shared_data()
needs_data = pytest.mark.skipif(
    DATA is None, reason="the benchmark files of ../shared/data are not on this machine"
)


def _local_sets() -> list[str]:
    """Overrides: eval=paper with each of its three sets read from the local file."""
    out = ["eval=paper"]
    for i, (name, file) in enumerate(FILES.items()):
        out += [
            f"eval.sets.{i}.name={name}",
            f"eval.sets.{i}.source=jsonl",
            f"eval.sets.{i}.path={DATA / file}",
            f"eval.sets.{i}.columns={{problem: question}}",
        ]
    return out


@needs_data
def test_every_row_of_the_local_files_maps_and_its_answer_grades():
    for i, name in enumerate(FILES):
        cfg = make_config("mode=eval", *_local_sets())
        loaded = load_eval_set(cfg.eval.sets[i])
        assert len(loaded.records) == 30 and not loaded.skipped, (name, loaded.skipped)
        golds = [r.answer for r in loaded.records]
        grades = grade_many([f"The answer is \\boxed{{{a}}}." for a in golds], golds, 5.0)
        assert all(g.correct for g in grades), [
            (a, g) for a, g in zip(golds, grades, strict=True) if not g.correct
        ]


def _eval(run_dir: Path, name: str, *overrides: str) -> dict:
    """``mode=eval`` of one set read from its local file (``eval=jsonl``)."""
    local = ["eval=jsonl", f"eval.sets.0.name={name}", f"eval.sets.0.path={DATA / FILES[name]}"]
    cfg = make_config("mode=eval", *local, *overrides, "eval.thinking=false", f"run_dir={run_dir}")
    return run_mode(cfg, run_dir)


@needs_data
@pytest.mark.ray
@pytest.mark.vllm
def test_eval_of_the_bundled_model_on_aime_2024(ray_cluster, tmp_path):
    """All 30 problems, two samples of four new tokens each on the vLLM engine: too short to answer,
    long enough to show that every row maps, is generated and graded, and lands in the summary."""
    summary = _eval(
        tmp_path, "aime24", "model=smollm2_135m", "rollout.engine=vllm", "eval.samples=2", "eval.max_new_tokens=4", "eval.temperature=1.0",
    )  # fmt: skip
    s = summary["sets"]["aime24"]
    assert set(summary["sets"]) == {"aime24"} and (s["n_problems"], s["n_samples"], s["k"]) == (30, 60, 2)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "aime24.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 30 and len(rows) == 60
    assert all(r["answer"] and r["response"] and r["finish_reason"] == "length" for r in rows)
    assert (
        s["truncated_frac"] == 1.0
        and s["avg@2"] == 0.0
        and s["avg@2_ci95"] == [0.0, pytest.approx(0.1135, abs=1e-3)]
    )
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["sets"]["aime24"]["n_samples"] == 60


@needs_data
@pytest.mark.ray
def test_report_builds_the_paper_table_from_three_evals(ray_cluster, tmp_path):
    """One eval per set (the tiny model, one greedy token each), merged by report into one row in
    the paper's columns, with the paper's rows beside it."""
    dirs = []
    for name in FILES:
        run_dir = tmp_path / name
        _eval(
            run_dir,
            name,
            *TINY,
            "eval.samples=1",
            "eval.max_new_tokens=1",
            "eval.temperature=0",
        )
        dirs.append(str(run_dir))
    report_dir = tmp_path / "report"
    runs = ",".join(f'"Base={d}"' for d in dirs)
    report = run_mode(
        make_config(
            "mode=report", f"report.runs=[{runs}]", "report.paper_rows=[qwen3_1_7b]", f"run_dir={report_dir}"
        ),
        report_dir,
    )
    assert report["columns"] == list(FILES)
    base = [r for r in report["rows"] if r["method"] == "Base"]
    assert len(base) == 1 and base[0]["values"] == {name: 0.0 for name in FILES} and base[0]["avg"] == 0.0
    table = (report_dir / "report.md").read_text()
    assert "AIME24" in table and "HMMT25" in table and "59.17" in table  # the paper's ATESD row beside it


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's ``run-*.wandb`` file (LevelDB log records of W&B protos)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7  # after the ":W&B" header
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


@pytest.mark.ray
def test_wandb_offline_writes_the_step_metrics_and_the_controllers_series(ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    cfg = make_config(
        *TINY, "algorithm=atesd", "controller.hold=1", "controller.lookahead=1", "controller.batch_decisions=2",
        "tracking.backends=[jsonl,wandb]", f"run_dir={out}",
    )  # fmt: skip
    run_mode(cfg, out)
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((tmp_path / "wandb").rglob("*"))[:20]
    history = _wandb_history(runs[0])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [0, 1]
    for h, m in zip(history, logged, strict=True):
        assert h["loss"] == pytest.approx(m["loss"]) and h["probe_nll"] == pytest.approx(m["probe_nll"])
        assert h["controller/alpha"] == pytest.approx(m["controller/alpha"])
