"""Fault injection on short ATESD runs of the tiny model: actors killed from outside while the run
trains (``ray.kill`` and SIGKILL, by name, see ``atesd_ray/soak.py``), and the driver killed with
SIGKILL. Every run must log each step once, with the metrics of the same run left alone
(``atesd_ray.soak.differences``: relative 1e-5, absolute 1e-7, for summation-order noise only).

The learned controller draws a new exposure every step (``controller.hold=1``) and learns after two
finished decisions, so a controller restored without its pending decisions, its policy or its RNG
would change the α sequence and every metric after it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atesd_ray.modes.train import run
from atesd_ray.soak import FaultInjector, differences, metrics
from tests.conftest import TINY, make_config

ROOT = Path(__file__).resolve().parents[1]
FAULTY = [
    *TINY,
    "algorithm=atesd",
    "controller.hold=1",
    "controller.lookahead=1",
    "controller.batch_decisions=2",
    "trainer.total_steps=3",
    "trainer.save_every=1",
    "rollout.max_new_tokens=16",
    "trainer.lr=1e-3",  # updates that move the metrics: a step applied twice would show
]

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> list[dict]:
    """The same run, left alone."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run(make_config(*FAULTY, f"run_dir={out}"), out)
    return metrics(out)


def test_killed_rollout_and_teacher_are_restarted_and_their_steps_retried(reference, tmp_path, capsys):
    out = tmp_path / "restarted"
    plan = [(1, "rollout", "ray.kill"), (2, "teacher", "sigkill")]
    with FaultInjector(out, plan) as injector:
        summary = run(make_config(*FAULTY, f"run_dir={out}"), out)
    assert not injector.errors
    assert [(k["role"], k["how"]) for k in injector.killed] == [
        ("rollout", "ray.kill"),
        ("teacher", "sigkill"),
    ]
    assert "rollbacks" not in summary  # restarted in place, not rolled back
    assert capsys.readouterr().out.count("an actor died") >= 2  # one failed step per kill, retried
    assert differences(reference, metrics(out)) == []


def test_dead_student_rank_and_controller_roll_back_to_the_last_checkpoint(reference, tmp_path, capsys):
    out = tmp_path / "rolled-back"
    # back to back (one rollback, mostly), while step 2's checkpoint is written or step 3 runs
    plan = [(2, "student", "ray.kill"), (2, "controller", "sigkill")]
    with FaultInjector(out, plan) as injector:
        summary = run(make_config(*FAULTY, f"run_dir={out}"), out)
    assert not injector.errors and [k["role"] for k in injector.killed] == ["student", "controller"]
    assert summary["rollbacks"] in (1, 2)  # two when the driver saw one death before the other
    rolled = [line for line in capsys.readouterr().out.splitlines() if "rolling back to" in line]
    assert "student 0" in "".join(rolled) and "controller" in "".join(rolled)
    assert all(re.search(r"checkpoints/step_[12]$", line) for line in rolled), rolled
    assert differences(reference, metrics(out)) == []


def test_driver_killed_mid_step_resumes_from_the_last_complete_checkpoint(ray_cluster, reference, tmp_path):
    out = tmp_path / "driver-killed"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [
        sys.executable, "-m", "atesd_ray.main", *FAULTY, f"run_dir={out}", f"cluster.address={address}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        first = out / "checkpoints" / "step_1" / "COMPLETE"
        deadline = time.monotonic() + 400
        while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.kill()  # SIGKILL, in step 1 (the second), with checkpoint step_1 written
        driver.wait()
    assert first.exists(), log.read_text()[-3000:]
    assert not (out / "checkpoints" / "step_2").exists()
    # what a kill while writing step 2 leaves: parts of it, never named step_2
    partial = out / "checkpoints" / ".tmp-step_2"
    (partial / "student").mkdir(parents=True, exist_ok=True)
    (partial / "student" / "student.safetensors").write_bytes(b"\x00" * 64)

    resumed = run(make_config(*FAULTY, f"run_dir={out}"), out)  # the same command: resume=auto
    assert resumed["start_step"] == 1
    assert not partial.exists()
    assert differences(reference, metrics(out)) == []  # steps 0..2 once each, as if never killed


VLLM = [*FAULTY, "rollout.engine=vllm"]


@pytest.mark.vllm
def test_a_killed_vllm_rollout_is_restarted_resynced_and_its_step_retried(ray_cluster, tmp_path, capsys):
    """The rollout on vLLM, SIGKILLed in step 1: it comes back with a new engine, takes the
    student's weights again, the step is retried, and every step equals the unkilled run's."""
    reference = tmp_path / "reference"
    run(make_config(*VLLM, f"run_dir={reference}"), reference)
    out = tmp_path / "restarted"
    with FaultInjector(out, [(1, "rollout", "sigkill")]) as injector:
        summary = run(make_config(*VLLM, f"run_dir={out}"), out)
    assert not injector.errors and [(k["role"], k["how"]) for k in injector.killed] == [
        ("rollout", "sigkill")
    ]
    assert "rollbacks" not in summary
    assert capsys.readouterr().out.count("an actor died") >= 1
    assert differences(metrics(reference), metrics(out)) == []
