"""``controller.progress_signal=probe_kl``: the controller's learning progress is the full-exposure
teacher's KL to the student on fixed rollouts of the probe problems, sampled once by the step-0
student. It is measured after every update, kept in every checkpoint with its rollouts, and a run
resumed from a checkpoint measures it on the same rollouts as the run it continues."""

from __future__ import annotations

import json
import math

import pytest

from atesd_ray.modes.train import run
from atesd_ray.runtime.checkpoint import PROBE_ROLLOUTS, PROBE_TARGETS
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

PROBE_KL = [
    *TINY,
    "algorithm=atesd",
    "controller.progress_signal=probe_kl",
    "controller.hold=1",
    "controller.lookahead=1",
    "controller.batch_decisions=2",
    "trainer.lr=1e-3",
    "trainer.total_steps=4",
    "trainer.save_every=2",
    "trainer.save_hf=false",
]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_probe_kl_is_the_progress_signal_and_a_resume_measures_the_same_rollouts(ray_cluster, tmp_path):
    """With a live teacher, whose targets at the resumed step differ from its step-0 ones: before,
    a resume scored the probe rollouts again and its probe_kl jumped (a frozen teacher is the
    simpler case of the same path)."""
    teacher = "live"
    straight = tmp_path / "straight"
    run(make_config(*PROBE_KL, f"teacher.weights={teacher}", f"run_dir={straight}"), straight)
    whole = _metrics(straight)
    assert [m["step"] for m in whole] == [0, 1, 2, 3]
    assert all(math.isfinite(m["probe_kl"]) and m["probe_kl"] > 0 for m in whole)
    assert (straight / "checkpoints" / "step_2" / PROBE_ROLLOUTS).is_file()
    assert (straight / "checkpoints" / "step_2" / PROBE_TARGETS).is_file()
    decisions = [
        json.loads(line) for line in (straight / "controller_timeline.jsonl").read_text().splitlines()
    ]
    scored = [d for d in decisions if d.get("g_lp") is not None]
    assert scored, "no decision was scored"

    resumed = tmp_path / "resumed"
    run(
        make_config(*PROBE_KL, f"teacher.weights={teacher}", "trainer.total_steps=2", f"run_dir={resumed}"),
        resumed,
    )
    run(
        make_config(*PROBE_KL, f"teacher.weights={teacher}", f"run_dir={resumed}"), resumed
    )  # from step_2, on its probe rollouts
    again = _metrics(resumed)
    for a, b in zip(whole[2:], again[2:], strict=True):
        assert b["probe_kl"] == pytest.approx(a["probe_kl"], rel=1e-5), (
            a["step"],
            a["probe_kl"],
            b["probe_kl"],
        )
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
