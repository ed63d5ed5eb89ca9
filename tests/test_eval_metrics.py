"""Eval summaries from per-sample rows (hand-computed Average@k, pass@k, maj@k), and which model mode=eval loads."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from atesd_ray.evaluation import summarize_rows
from atesd_ray.grading import shutdown_helpers
from atesd_ray.modes.evaluate import eval_markdown, resolve_model, set_summary
from tests.conftest import make_config


@pytest.fixture(scope="module", autouse=True)
def _helpers():
    yield
    shutdown_helpers()


# (problem id, gold, [(extracted, correct), ...] for samples 0..3)
PROBLEMS = [
    ("p1", "5", [("5", True), ("4", False), ("3", False), ("5", True)]),
    ("p2", "6", [("7", False), ("7", False), (None, False), ("8", False)]),
    ("p3", "1/2", [("1/2", True), (r"\frac{1}{2}", True), ("0.5", True), ("2", False)]),
]


def rows() -> list[dict]:
    out = [
        {"id": pid, "sample": s, "answer": gold, "extracted": ex, "correct": ok, "finish_reason": "stop"}
        for pid, gold, samples in PROBLEMS
        for s, (ex, ok) in enumerate(samples)
    ]
    out[5]["finish_reason"] = "length"
    random.Random(0).shuffle(out)  # the actors' order is not the problems' order
    return out


def test_summarize_rows_by_hand():
    summary = summarize_rows(rows(), timeout_s=5.0)
    # per problem: correct 2/4, 0/4, 3/4
    # pass@2 = 1 - C(n-c, 2)/C(4, 2): p1 1 - 1/6, p2 0, p3 1 (only one wrong sample)
    # maj@4: p1 "5" (2 votes) right; p2 "7" wrong; p3 1/2 = \frac{1}{2} = 0.5 (3 votes) right
    # interval: Wilson's for p = 5/12 over 3 problems (z = 1.96)
    z, n, p = 1.96, 3, 5 / 12
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert summary == {
        "n_problems": 3,
        "n_samples": 12,
        "k": 4,
        "avg@4": pytest.approx((0.5 + 0 + 0.75) / 3),
        "avg@4_ci95": [pytest.approx(centre - half), pytest.approx(centre + half)],
        "pass@1": pytest.approx((0.5 + 0 + 0.75) / 3),
        "pass@2": pytest.approx((5 / 6 + 0 + 1) / 3),
        "pass@4": pytest.approx(2 / 3),
        "maj@4": pytest.approx(2 / 3),
    }
    assert set_summary(rows(), 5.0)["truncated_frac"] == pytest.approx(1 / 12)


def test_summarize_rows_rejects_uneven_samples():
    uneven = [r for r in rows() if not (r["id"] == "p2" and r["sample"] == 3)]
    with pytest.raises(ValueError, match="same positive number of samples"):
        summarize_rows(uneven, 5.0)


def test_eval_markdown_shows_percentages():
    summary = {
        "model": "tiny",
        "checkpoint": None,
        "protocol": {
            "samples": 4,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "max_new_tokens": 64,
            "thinking": True,
        },
        "sets": {"synthetic": set_summary(rows(), 5.0)},
        "avg": (0.5 + 0 + 0.75) / 3,
    }
    text = eval_markdown(summary)
    header, _, line = text.split("\n\n")[2].splitlines()[:3]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "set", "problems", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "truncated",
    ]  # fmt: skip
    assert [c.strip() for c in line.strip("|").split("|")] == [
        "synthetic", "3", "41.67", "41.67", "61.11", "66.67", "66.67", "8.33",
    ]  # fmt: skip
    assert "Mean avg@4 over sets: 41.67" in text


def _checkpoint(run: Path, step: int) -> Path:
    ckpt = run / "checkpoints" / f"step_{step}"
    (ckpt / "student").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(str(step))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_resolve_model(tmp_path):
    base = make_config("model=tiny")
    assert resolve_model(base) == (base.model, None)

    run = tmp_path / "run"
    _checkpoint(run, 2)
    latest = _checkpoint(run, 4)
    (run / "checkpoints" / ".tmp-step_6").mkdir()  # an unfinished save is not a checkpoint
    assert resolve_model(make_config("model=tiny", f"eval.model={run}")) == (base.model, latest)
    assert resolve_model(make_config("model=tiny", f"eval.model={latest}"))[1] == latest

    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    model, ckpt = resolve_model(make_config("model=qwen3_1_7b", f"eval.model={local}"))
    assert (model.source, model.path, model.name, model.lora.enabled, ckpt) == (
        "path",
        str(local),
        str(local),
        False,
        None,
    )
    assert model.dtype == "bfloat16" and model.teacher_thinking  # the configured model's other settings stay

    model, _ = resolve_model(make_config("model=qwen3_1_7b", "eval.model=Qwen/Qwen3-4B"))
    assert (model.source, model.path, model.gguf_file) == ("hub", "Qwen/Qwen3-4B", None)

    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_model(make_config(f"eval.model={empty_run}"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_model(make_config(f"eval.model={tmp_path / 'missing'}"))
