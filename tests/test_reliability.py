"""One run per run directory, a resume that may not change what a run trains, and the small things a
user reads: skipped rows named by file and line, JSON errors at their true column, exported model
files readable like the rest of the folder, TensorBoard rewound with the run."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atesd_ray.data.loaders import load_split
from atesd_ray.job import ResumeRefused, open_run_dir
from atesd_ray.run_lock import LOCK, STALE_S, RunDirLocked, acquire
from atesd_ray.tracking import Tracker
from tests.conftest import TINY, make_config

ROOT = Path(__file__).resolve().parents[1]


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another run's driver holding the directory: a process that took its lock and lives on."""
    code = f"import time; from pathlib import Path; from atesd_ray.run_lock import acquire; acquire(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_run_dir_is_refused_and_touches_nothing(tmp_path):
    """Before, both ran: the second cut the first's metrics.jsonl and rewrote its config.yaml."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    (run_dir / "config.yaml").write_text("the first run's\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    holder = _holder(run_dir)
    try:
        with pytest.raises(
            RunDirLocked, match=rf"in use by a run on host {socket.gethostname()} \(pid {holder.pid}\)"
        ):
            open_run_dir(run_dir, make_config(*TINY))
        after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != LOCK}
        assert after == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (run_dir / LOCK).write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then"})
    )
    with caplog.at_level(logging.WARNING, logger="atesd_ray.run_lock"), acquire(run_dir) as lock:
        assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
        assert lock.holder["pid"] == os.getpid()
    assert f"its process {int(dead.stdout)} is gone" in caplog.text
    assert not (run_dir / LOCK).exists()  # released
    # on another host, a lock whose heartbeat is silent for STALE_S
    (run_dir / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "then"}))
    old = time.time() - STALE_S - 1
    os.utime(run_dir / LOCK, (old, old))
    with acquire(run_dir):
        pass
    (run_dir / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "now"}))
    with pytest.raises(RunDirLocked, match="host elsewhere"):
        acquire(run_dir)


def _finished(tmp_path: Path) -> Path:
    """A run directory as a finished 2-step run leaves it (config and one complete checkpoint)."""
    from atesd_ray.runtime.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    with open_run_dir(run_dir, make_config(*TINY, "algorithm=opsd")):
        pass
    manager = CheckpointManager(run_dir, 2)
    tmp = manager.begin(2)
    (tmp / "student").mkdir()
    manager.commit(2, tmp, {"step": 2, "consumed": 8, "weight_version": 2})
    return run_dir


@pytest.mark.parametrize(
    "change,key", [("algorithm=sft", "algorithm.name"), ("model=smollm2_135m", "model.name")]
)
def test_a_resume_that_would_change_what_the_run_trains_is_refused_before_anything(tmp_path, change, key):
    """Before, algorithm=sft silently continued an opsd run (its loss jumped from 0.001 to 10.79),
    and every attempt rewrote config.yaml first."""
    run_dir = _finished(tmp_path)
    stored = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ResumeRefused) as err:
        open_run_dir(run_dir, make_config(*TINY, change), resumes=True)
    message = str(err.value)
    assert f"{key}:" in message and "resume=never" in message and "another run_dir" in message
    assert (run_dir / "config.yaml").read_bytes() == stored
    assert not (run_dir / LOCK).exists()


def test_a_resume_may_train_longer_and_says_so_in_the_history(tmp_path):
    run_dir = _finished(tmp_path)
    with open_run_dir(
        run_dir, make_config(*TINY, "algorithm=opsd", "trainer.total_steps=5"), resumes=True
    ) as lock:
        assert lock.checkpoint.name == "step_2"
    (entry,) = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert entry["changes"] == {"trainer.total_steps": [2, 5]} and entry["from"] == "step_2"
    assert "total_steps: 5" in (run_dir / "config.yaml").read_text()
    # a change nobody allowed, allowed explicitly
    with open_run_dir(
        run_dir,
        make_config(
            *TINY, "algorithm=opsd", "trainer.total_steps=5", "trainer.lr=1e-6", "resume_allow=[trainer.lr]"
        ),
        resumes=True,
    ):
        pass


def test_skipped_rows_are_named_by_file_and_line_and_a_cut_line_at_its_end(tmp_path, caplog):
    rows = [{"id": str(i), "problem": "p", "reference": "r", "answer": "1"} for i in range(9)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-1]  # cut short: the closing brace lost
    for i in (4, 5, 6, 7, 8):
        lines[i] = json.dumps({"id": str(i)})  # no problem
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="atesd_ray.data.loaders"):
        result = load_split("jsonl", str(path))
    assert len(result.records) == 3 and result.n_skipped == 6
    assert f"{path} line 3: malformed JSON" in caplog.text
    # before: "at column 1" (the line's newline was parsed as a second line)
    n = len(lines[2])
    assert f"(column {n + 1} of {n}; the line ends before the JSON does: cut short?)" in caplog.text
    assert f"{path} line 5:" in caplog.text and f"{path} line 9:" not in caplog.text  # the first five
    assert "1 more rows skipped (6 in all" in caplog.text


def test_an_exported_model_is_readable_like_the_rest_of_its_folder(tmp_path):
    """Before, model.safetensors came out 0600: a server running as another user could not read it."""
    from atesd_ray.model_folders import save_hf_model
    from atesd_ray.models import build_tiny, load_tokenizer

    cfg = make_config(*TINY)
    tokenizer = load_tokenizer(cfg.model)
    model = build_tiny(cfg.model, len(tokenizer))
    out = save_hf_model(
        tmp_path / "hf", {n: p.detach() for n, p in model.named_parameters()}, model, tokenizer
    )
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tensorboard_keeps_one_point_per_step_across_a_resume(tmp_path):
    """Before, a resumed run left steps 2, 3 and 6 twice in TensorBoard; only the JSONL was rewound."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = Tracker(tmp_path, ["tensorboard"], "p", "e", {}, resume_step=0)
    for step in range(4):
        first.log(step, {"loss": float(step)})
    first.close()
    time.sleep(1.1)  # a new event file name (they are per second)
    resumed = Tracker(tmp_path, ["tensorboard"], "p", "e", {}, resume_step=2)
    for step in range(2, 6):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert points == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    assert torch.tensor([p[0] for p in points]).unique().numel() == len(points)


def test_a_lock_left_empty_a_pid_reused_on_this_host_or_held_here_is_judged_right(tmp_path):
    """An empty lock file (a run killed between creating and writing it, or a full disk) went stale
    never; a lock naming this very process (a restarted container reuses pids) was held forever."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / LOCK
    path.write_text("")
    old = time.time() - 60
    os.utime(path, (old, old))
    with acquire(run_dir):
        pass
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "before"}))
    with acquire(run_dir) as lock:  # not this process's lock: the pid is reused
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):  # but this one is held here
            acquire(run_dir)
        assert json.loads(path.read_text())["token"] == lock.holder["token"]
    # a live pid on this host whose heartbeat is silent for STALE_S is another process with its pid
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "token": "t"}))
        with pytest.raises(RunDirLocked):
            acquire(run_dir)
        old = time.time() - STALE_S - 1
        os.utime(path, (old, old))
        with acquire(run_dir):
            pass
    finally:
        alive.kill()
        alive.wait()


def test_taking_over_a_stale_lock_never_moves_a_fresh_one_aside(tmp_path, monkeypatch):
    """Two runs read the same stale holder; the first takes over. The second's rename then moved the
    first's fresh lock away and both ran."""
    import atesd_ray.run_lock as run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / LOCK
    stale = {"host": "elsewhere", "pid": 1, "token": "stale"}
    path.write_text(json.dumps(stale))
    old = time.time() - STALE_S - 1
    os.utime(path, (old, old))
    first = {}
    real_stale = run_lock._stale

    def the_other_run_wins_meanwhile(holder, mtime):
        why = real_stale(holder, mtime)
        if why and not first:  # between our read and our rename, another run takes it over
            path.unlink()
            first["lock"] = acquire(run_dir)
        return why

    monkeypatch.setattr(run_lock, "_stale", the_other_run_wins_meanwhile)
    try:
        with pytest.raises(RunDirLocked, match="in use"):
            acquire(run_dir)
        assert json.loads(path.read_text())["token"] == first["lock"].holder["token"]
    finally:
        first["lock"].release()


def test_resume_never_starts_over_and_keeps_the_earlier_run_aside(tmp_path):
    """Before, the earlier run's checkpoints stayed: the new run's first checkpoint (step 1) was
    pruned at once as the oldest, and a later resume=auto continued the earlier run's step 2."""
    run_dir = _finished(tmp_path)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    with open_run_dir(run_dir, make_config(*TINY, "algorithm=sft", "resume=never"), resumes=True) as lock:
        assert lock.checkpoint is None
    (earlier,) = run_dir.glob("earlier-*")
    assert (earlier / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert (earlier / "metrics.jsonl").read_text().count("\n") == 2
    assert "name: opsd" in (earlier / "config.yaml").read_text()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", earlier.name]
    assert "name: sft" in (run_dir / "config.yaml").read_text()


def test_a_key_the_run_never_had_is_no_change_and_other_modes_keep_the_runs_config(tmp_path):
    """Before, a key added to the schema since the run began read as `None -> value` and refused
    every older run; an eval pointed at a run's directory rewrote its config.yaml."""
    run_dir = _finished(tmp_path)
    stored = OmegaConf.load(run_dir / "config.yaml")
    del stored.algorithm["opsd_clip"]
    OmegaConf.save(stored, run_dir / "config.yaml")
    with open_run_dir(run_dir, make_config(*TINY, "algorithm=opsd"), resumes=True):
        pass
    (entry,) = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert entry["changes"] == {} and entry["gained"] == {"algorithm.opsd_clip": 0.05}
    before = (run_dir / "config.yaml").read_bytes()
    with open_run_dir(run_dir, make_config(*TINY, "mode=eval")):
        pass
    assert (run_dir / "config.yaml").read_bytes() == before
    assert "mode: eval" in (run_dir / "config.eval.yaml").read_text()


def test_a_second_signal_while_stopping_does_not_cut_the_teardown_short(monkeypatch, capsys):
    """Before, a second Ctrl-C (or SIGTERM after it) raised inside the finally blocks that tear the
    actors down and release the run directory."""
    import signal

    from atesd_ray import interrupts

    monkeypatch.setattr(interrupts, "_received", [])
    handlers = {signum: signal.getsignal(signum) for signum in interrupts.EXIT_CODES}
    torn_down = []
    try:
        interrupts.install()
        with pytest.raises(interrupts.Interrupted) as err:
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                signal.raise_signal(signal.SIGINT)  # while tearing down
                torn_down.append(True)
        assert err.value.code == 143 and torn_down == [True]
        assert "SIGINT: already stopping" in capsys.readouterr().err
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_group_no_node_can_place_says_what_it_waits_for_and_ends_in_the_projects_error(
    ray_cluster, monkeypatch, capsys
):
    """Before, a rebuilt actor whose node was gone waited silently, then ended in a bare timeout."""
    from atesd_ray.runtime import cluster

    monkeypatch.setattr(cluster, "WAIT_PROGRESS_S", 0.5)
    with pytest.raises(cluster.ClusterError, match=r"not placed within 2 s .*was a node lost\?.*resumes"):
        cluster.Placement("lost", 1, {"CPU": 1, "node_gone": 1}, "PACK", timeout_s=2)
    assert "waiting for placement group 'lost' (1 x {'CPU': 1, 'node_gone': 1}): " in capsys.readouterr().out


def test_the_wait_for_an_actor_no_node_can_place_says_so_and_names_what_it_needs(
    ray_cluster, monkeypatch, capsys
):
    """Before, the driver stayed silent for the whole placement timeout, then died with a bare
    GetTimeoutError."""
    import ray

    from atesd_ray import faults

    @ray.remote(resources={"node_gone": 1})
    class Stranded:
        pass

    monkeypatch.setattr(faults, "FIRST_WAIT_S", 0.5)
    handle = Stranded.remote()
    try:
        with pytest.raises(
            faults.ActorsLost, match=r"rollout 0 \(needs \{'node_gone': 1\}\) could not be placed"
        ):
            faults._alive(
                {"rollout 0": handle}, {"rollout 0": {"node_gone": 1}}, 3, time.monotonic() + 3, "r"
            )
        assert "waiting for rollout 0 to restart (" in capsys.readouterr().out
    finally:
        ray.kill(handle)


def test_a_file_system_without_hard_links_still_gets_one_run_per_directory(tmp_path, monkeypatch):
    import errno

    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with acquire(run_dir) as lock:
        assert json.loads((run_dir / LOCK).read_text())["token"] == lock.holder["token"]
        with pytest.raises(RunDirLocked, match="in use"):
            acquire(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == []
