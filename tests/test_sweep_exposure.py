"""The fixed-exposure sweep: its statistics by hand, and mode=sweep_exposure end to end with SmolLM2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atesd_ray.modes.sweep_exposure import plot, rises_with_alpha, summarize_alpha, sweep_table

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def row(kl: list[float], disagree: list[float], level: int | None, g: float = -1.0) -> dict:
    return {
        "kl": kl,
        "disagree": disagree,
        "confidence": [0.5] * len(kl),
        "difficulty": level,
        "grounding": g,
    }


def test_summarize_alpha_by_hand():
    rows = [
        row([0.1, 0.3], [0, 1], 1, g=-2.0),
        row([0.2, 0.0, 1.4], [0, 0, 1], 2, g=-1.0),
        row([], [], 2, g=-3.0),
    ]
    s = summarize_alpha(0.5, rows)
    tokens = [0.1, 0.3, 0.2, 0.0, 1.4]
    assert (s["alpha"], s["responses"], s["tokens"]) == (0.5, 3, 5)
    assert s["kl_mean"] == pytest.approx(0.4)
    assert s["kl_p95"] == pytest.approx(np.percentile(tokens, 95)) and 0.3 < s["kl_p95"] < 1.4
    assert s["kl_max"] == pytest.approx(1.4)
    assert s["top1_disagree"] == pytest.approx(2 / 5)
    assert s["grounding"] == pytest.approx(-2.0)  # per response
    assert s["levels"]["1"]["kl_mean"] == pytest.approx(0.2)
    assert s["levels"]["2"]["kl_mean"] == pytest.approx(1.6 / 3) and s["levels"]["2"]["responses"] == 2
    assert math.isnan(summarize_alpha(0.0, [row([], [], None)])["kl_mean"])


def test_table_and_plot(tmp_path):
    results = [
        summarize_alpha(a, [row([0.1 + a, 0.2 + a], [0, a > 0.4], 1), row([0.3], [1], 3)]) for a in ALPHAS
    ]
    assert rises_with_alpha(results)
    assert not rises_with_alpha(results[:2] + results[:1])
    lines = sweep_table(results).splitlines()
    assert lines[0].split("|")[1:-1][:3] == [" α    ", " tokens ", " mean KL "]
    assert "mean KL L1" in lines[0] and "mean KL L3" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    plot(results, tmp_path / "sweep.png", "test")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sweep_exposure_with_smollm2(tmp_path):
    """4 synthetic problems, 48 new tokens, the bundled SmolLM2, the five exposures of the paper's sweep."""
    cmd = [sys.executable, "-m", "atesd_ray.main", "mode=sweep_exposure", "sweep.problems=4",
           "rollout.max_new_tokens=48", "cluster.num_cpus=3", f"run_dir={tmp_path}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert done.returncode == 0, done.stderr[-3000:]

    printed = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in printed[1:]] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    out = json.loads((tmp_path / "sweep_exposure.json").read_text())
    assert (out["model"], out["problems"], out["max_new_tokens"]) == ("smollm2_135m", 4, 48)
    results = out["results"]
    assert [r["alpha"] for r in results] == ALPHAS
    for r in results:
        assert 0 < r["tokens"] <= 4 * 48 and 0 < r["kl_mean"] <= r["kl_p95"] <= r["kl_max"]
        assert (
            set(r["levels"]) <= {"1", "2", "3"}
            and sum(v["tokens"] for v in r["levels"].values()) == r["tokens"]
        )
    # the same rollouts at every alpha: the student's own confidence does not depend on the teacher
    assert max(r["confidence"] for r in results) - min(r["confidence"] for r in results) < 1e-6
    # the paper's finding, at its ends: revealing the whole reference widens the mismatch
    assert results[-1]["kl_mean"] > 1.2 * results[0]["kl_mean"]
    assert results[-1]["top1_disagree"] > results[0]["top1_disagree"]
    assert (tmp_path / "sweep_exposure.png").stat().st_size > 10_000
    assert "Mean token KL rises monotonically" in (tmp_path / "sweep_exposure.md").read_text()
