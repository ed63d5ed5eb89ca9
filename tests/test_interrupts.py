"""Stopping a run from outside, as a user does: Ctrl-C (SIGINT) and ``ray job stop`` / ``timeout``
(SIGTERM) to the driver mid-step. Each ends with one line naming the step, the last complete
checkpoint and how to resume, exit 130 / 143, and no process of the run left behind; the same
command then resumes it, and the interrupted-and-resumed run equals a straight one step for step,
with one TensorBoard point per step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from atesd_ray.soak import differences

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

OVERRIDES = [
    "model=tiny",
    "trainer.total_steps=6",
    "trainer.save_every=1",
    "trainer.prompts_per_step=4",
    "trainer.micro_batch=2",
    "rollout.max_new_tokens=12",
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "data.probe_size=2",
    "trainer.lr=1e-3",
    "dashboard.enabled=false",
    "tracking.backends=[jsonl,tensorboard]",
    "cluster.num_cpus=4",
]


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "atesd_ray.main", *OVERRIDES, f"run_dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _interrupt(run_dir: Path, signum: int, after_steps: int) -> tuple[int, str, list[psutil.Process]]:
    """Start the run, send ``signum`` once ``after_steps`` steps are recorded; its exit code, stderr
    and the processes it had started."""
    proc = _start(run_dir)
    deadline = time.monotonic() + 300
    while len(_steps(run_dir)) < after_steps:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.5)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err, children


def _train(run_dir) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "atesd_ray.main", *OVERRIDES, f"run_dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigint_and_sigterm_stop_with_one_line_and_the_run_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    _train(straight)

    run_dir = tmp_path / "stopped"
    for signum, code, after in ((signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 4)):
        rc, err, children = _interrupt(run_dir, signum, after)
        name = signal.Signals(signum).name
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == code, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert lines[-1].startswith(f"stopped by {name} at step "), lines[-3:]
        assert (
            "the last complete checkpoint is " in lines[-1]
            and "the same command resumes from it" in lines[-1]
        )
        time.sleep(2)
        assert [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert not (run_dir / "run.lock").exists()
    _train(run_dir)  # the same command resumes it
    assert differences(_steps(straight), _steps(run_dir)) == []

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(6))
