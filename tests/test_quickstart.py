"""The README's "Quick start on a local cluster", command for command, on a one-node cluster of its
own (4 CPUs, as the README's `ray start --num-cpus 4`): ``ray job submit --no-wait``, ``ray job logs
--follow``, ``ray job status``, then the run directory.

The cluster is this module's alone: on the two-node cluster of test_cluster.py, whose 6 CPUs the
earlier tests there share, the job's actors could wait for CPUs with no deadline."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.local_cluster import LocalCluster

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))

# the README's job, word for word after `python -m atesd_ray.main` (its run_dir aside)
QUICK_START = [
    "model=tiny",
    "trainer.total_steps=2",
    "trainer.prompts_per_step=4",
    "rollout.max_new_tokens=64",
    "data.synthetic.n_eval=8",
]


@pytest.fixture(scope="module")
def head():
    nodes = LocalCluster({"node_a": 1}, cpus_per_node=4)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def test_the_readme_quick_start_submits_follows_and_finds_the_run(head, tmp_path):
    run_dir = tmp_path / "atesd-quickstart"
    job = f"quickstart-{os.getpid()}-{int(time.time())}"
    address = f"--address={head.dashboard_url}"
    submitted = head.run(
        RAY_CLI, "job", "submit", address, f"--submission-id={job}", "--no-wait",
        "--working-dir", ".", "--runtime-env", "runtime_env.yaml", "--",
        "python", "-m", "atesd_ray.main", *QUICK_START, f"run_dir={run_dir}",
        cwd=ROOT,
    )  # fmt: skip
    assert submitted.returncode == 0 and job in submitted.stdout + submitted.stderr, submitted.stderr[-3000:]

    logs = head.run(RAY_CLI, "job", "logs", address, "--follow", job, timeout_s=540)
    status = head.run(RAY_CLI, "job", "status", address, job)
    said = status.stdout + status.stderr
    assert logs.returncode == 0 and "succeeded" in said.lower(), (
        said + logs.stdout[-4000:] + logs.stderr[-2000:]
    )
    assert "step 2/2" in logs.stdout and f"run directory: {run_dir}" in logs.stdout, logs.stdout[-4000:]

    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()
    }
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1] and (run_dir / "checkpoints" / "step_2" / "COMPLETE").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["final_metrics"]["weight_version"] == 2
