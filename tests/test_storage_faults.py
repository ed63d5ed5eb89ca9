"""Nothing lost to bad files or a full disk: a corrupt file in the newest checkpoint is refused, naming
the file, and ``resume=auto`` takes the checkpoint before it; a metrics line cut short by a kill is
dropped and its step trained again, so every step is logged once; a checkpoint that does not fit on
the disk fails naming its path, leaves the last complete one loadable, and the run resumes from it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import pytest

from atesd_ray.modes.train import run
from atesd_ray.runtime.checkpoint import CheckpointError, CheckpointManager, verify
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

SAVED = [*TINY, "trainer.save_every=1", "trainer.keep_last=3", "trainer.save_hf=false"]


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def three_checkpoints(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("storage") / "run"
    run(make_config(*SAVED, "trainer.total_steps=3", f"run_dir={out}"), out)
    return out


@pytest.mark.parametrize(
    "damaged, how",
    [
        ("student/student.safetensors", "cut"),
        ("trainer_state.json", "garbled"),
        ("student/optimizer.pt", "garbled"),
    ],
)
def test_a_corrupt_file_is_named_and_auto_resume_takes_the_checkpoint_before(
    three_checkpoints, tmp_path, damaged, how, caplog
):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    newest = run_dir / "checkpoints" / "step_3"
    target = newest / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if how == "cut" else data[:40] + b"\x00garbage" + data[48:])
    with pytest.raises(CheckpointError, match=str(target)):
        verify(newest)
    with caplog.at_level(logging.WARNING, logger="atesd_ray"):
        assert CheckpointManager(run_dir, keep_last=3).resolve("auto") == run_dir / "checkpoints" / "step_2"
    assert any(
        str(target) in r.getMessage() and "checkpoint before" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(CheckpointError, match=str(target)):  # named explicitly, it is refused outright
        CheckpointManager(run_dir, keep_last=3).resolve(str(newest))


def test_training_resumes_past_a_corrupt_checkpoint(three_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    weights = run_dir / "checkpoints" / "step_3" / "student" / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    summary = run(make_config(*SAVED, "trainer.total_steps=4", f"run_dir={run_dir}"), run_dir)
    assert summary["start_step"] == 2
    assert _steps(run_dir) == [0, 1, 2, 3]  # steps 2 and 3 trained again, each line once


def test_a_metrics_line_cut_short_is_dropped_and_its_step_trained_again(three_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_3")  # killed while writing step 2's line: no step_3 yet
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    summary = run(make_config(*SAVED, "trainer.total_steps=3", f"run_dir={run_dir}"), run_dir)
    assert summary["start_step"] == 2
    assert _steps(run_dir) == [0, 1, 2]
    rewritten = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[2])
    assert rewritten["loss"] == pytest.approx(json.loads(lines[2])["loss"], rel=1e-5)  # exact resume


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs of its own (needs the right to mount, as root in CI's container has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _free(path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_a_full_disk_during_a_checkpoint_names_the_path_and_the_run_resumes(ray_cluster, small_disk):
    run_dir = small_disk / "run"
    saved = [*SAVED, "trainer.keep_last=1", f"run_dir={run_dir}"]
    run(make_config(*saved, "trainer.total_steps=2"), run_dir)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as fh:  # the disk fills: 2-3 MiB stay free, a checkpoint needs ~40
        while _free(small_disk) > 3 * 2**20:
            fh.write(b"\1" * 2**20)
            fh.flush()
    with pytest.raises(
        CheckpointError, match=r"checkpoint of step 3 could not be written to .*\.tmp-step_3"
    ) as err:
        run(make_config(*saved, "trainer.total_steps=3"), run_dir)
    assert "No space left on device" in str(err.value) and "step_2" in str(err.value)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial files are gone
    kept = CheckpointManager(run_dir, keep_last=1).resolve("auto")
    assert kept == run_dir / "checkpoints" / "step_2"
    verify(kept)

    ballast.unlink()
    summary = run(make_config(*saved, "trainer.total_steps=3"), run_dir)
    assert summary["start_step"] == 2 and _steps(run_dir) == [0, 1, 2]
