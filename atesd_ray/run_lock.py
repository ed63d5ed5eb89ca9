"""One run per run directory: ``run_dir/run.lock``, taken before anything is written.

The lock file holds who runs there: host, pid, Ray job submission id and start time. It is created
with ``O_CREAT | O_EXCL``, which holds on shared storage (NFS v3 and later), and kept fresh by a
heartbeat (its modification time, every :data:`HEARTBEAT_S`). A second run on the same directory is
refused, naming the holder. A lock whose holder is gone is taken over, with a warning: on the same
host when its process no longer exists, on another host when its heartbeat has been silent for
:data:`STALE_S`. Taking over renames the stale file away first, so of two runs taking it over at once
only one wins. Everything a run writes in its directory, its checkpoints' ``.tmp-step_*`` included,
is written under its lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "run.lock"
HEARTBEAT_S = 30.0  # how often a holder refreshes its lock
STALE_S = 300.0  # a lock on another host not refreshed for this long belongs to a run that is gone


class RunDirLocked(RuntimeError):
    """Another run holds the run directory."""


def _job_id() -> str | None:
    """The Ray job submission id of this driver (``ray job submit``), if it is one."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict) -> str:
    job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return f"host {holder.get('host')} (pid {holder.get('pid')}{job}) since {holder.get('started_at')}"


class RunLock:
    """The lock this process holds on a run directory, refreshed by a heartbeat until released."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        self.checkpoint: Path | None = None  # the checkpoint a resuming job continues from
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.holder["token"]:
                self.path.unlink()


def _stale(holder: dict, mtime: float) -> str | None:
    """Why the holder is gone, or None while it may still run."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return None if _alive(holder["pid"]) else f"its process {holder['pid']} is gone"
    silent = time.time() - mtime
    return f"its heartbeat has been silent for {silent:.0f} s" if silent > STALE_S else None


def acquire(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock, or refuse naming its holder; take over a stale one with a warning."""
    path = run_dir / LOCK
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ray_job": _job_id(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}",
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                theirs, mtime = json.loads(path.read_text()), path.stat().st_mtime
            except (OSError, ValueError):  # being written, or taken over, this instant
                time.sleep(0.2)
                continue
            why = _stale(theirs, mtime)
            if why is None:
                raise RunDirLocked(
                    f"run_dir '{run_dir}' is in use by a run on {_describe(theirs)}. Use another run_dir, or "
                    f"wait for that run to end (if it is gone, {path} goes stale {STALE_S:.0f} s after its last "
                    "heartbeat, or remove the file)"
                ) from None
            moved = path.with_name(f"{LOCK}.stale-{holder['token']}")
            with contextlib.suppress(FileNotFoundError):  # another run took it over first: try again
                path.rename(moved)
                moved.unlink()
                log.warning(
                    "run_dir %s: taking over the lock of the run on %s: %s", run_dir, _describe(theirs), why
                )
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(holder, fh)
        return RunLock(path, holder)
    raise RunDirLocked(f"run_dir '{run_dir}': could not take {path} (it changed hands while we tried)")
