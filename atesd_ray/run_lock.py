"""One run per run directory: ``run_dir/run.lock``, taken before anything is written.

The lock file holds who runs there: host, pid, Ray job submission id and start time. It is written
whole to a file of its own and hard-linked into place, which fails when the lock exists (NFS too;
where a file system refuses hard links, ``O_CREAT | O_EXCL`` instead),
and kept fresh by a heartbeat (its modification time, every :data:`HEARTBEAT_S`). A second run on
the same directory is refused, naming the holder. A lock whose holder is gone is taken over, with a
warning: when its process on this host no longer exists (or the pid now belongs to another process),
and whenever its heartbeat has been silent for :data:`STALE_S`. Taking over renames the stale file
away and checks it was the one judged stale, so of two runs taking it over at once only one wins. Everything a run writes in its directory, its checkpoints' ``.tmp-step_*`` included,
is written under its lock.
"""

from __future__ import annotations

import contextlib
import errno
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
STALE_S = 300.0  # a lock not refreshed for this long belongs to a run that is gone
UNREADABLE_S = 10.0  # a lock file that does not parse for this long was cut while written


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
        _HELD.discard(self.holder["token"])
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.holder["token"]:
                self.path.unlink()


_HELD: set[str] = set()  # the tokens of the locks this process holds


def _stale(holder: dict, mtime: float) -> str | None:
    """Why the holder is gone, or None while it may still run."""
    silent = time.time() - mtime
    if holder.get("unreadable"):  # a holder writes its lock whole: this one was cut while written
        return "the lock file does not parse" if silent > UNREADABLE_S else None
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if holder["pid"] == os.getpid() and holder.get("token") not in _HELD:
            return f"it names this process ({holder['pid']}), which does not hold it: a pid reused"
        if not _alive(holder["pid"]):
            return f"its process {holder['pid']} is gone"
        # a live process with a silent heartbeat is another process that got the pid (a restart)
    return f"its heartbeat has been silent for {silent:.0f} s" if silent > STALE_S else None


def _create(path: Path, holder: dict) -> bool:
    """Create the lock file holding ``holder``, whole or not at all; False if it exists. The holder
    is written to a file of its own and hard-linked into place: a link never replaces a file (on NFS
    too), and a run killed mid-write leaves no empty lock behind."""
    mine = path.with_name(f"{LOCK}.new-{holder['token']}")
    try:
        mine.write_text(json.dumps(holder))
        os.link(mine, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # a file system without hard links (some FUSE and SMB mounts)
        if not mine.exists() or err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return _create_exclusive(path, holder)
    finally:
        mine.unlink(missing_ok=True)


def _create_exclusive(path: Path, holder: dict) -> bool:
    """:func:`_create` where hard links are refused: ``O_CREAT | O_EXCL``, then the holder written;
    a kill in between leaves an unreadable lock, stale after :data:`UNREADABLE_S`."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(holder, fh)
    return True


def _read(path: Path) -> tuple[dict, float] | None:
    """The holder and the heartbeat of the lock file; None when it is gone this instant. A file that
    does not parse (a lock written by a run killed mid-write) is an unknown holder."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return json.loads(text), mtime
    except ValueError:
        return {"host": "unknown", "unreadable": True}, mtime


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
    for _ in range(5):
        if _create(path, holder):
            _HELD.add(holder["token"])
            return RunLock(path, holder)
        found = _read(path)
        if found is None:  # released or taken over this instant
            continue
        theirs, mtime = found
        why = _stale(theirs, mtime)
        if why is None:
            raise RunDirLocked(
                f"run_dir '{run_dir}' is in use by a run on {_describe(theirs)}. Use another run_dir, or "
                f"wait for that run to end (if it is gone, {path} goes stale {STALE_S:.0f} s after its last "
                "heartbeat, or remove the file)"
            ) from None
        # move the stale file aside, then make sure it was the one judged: another run may have
        # taken the lock over in between, and its fresh lock goes back in place
        moved = path.with_name(f"{LOCK}.stale-{holder['token']}")
        try:
            path.rename(moved)
        except FileNotFoundError:
            continue
        if (_read(moved) or ({}, 0))[0] != theirs:
            with contextlib.suppress(FileExistsError):
                os.link(moved, path)
            moved.unlink(missing_ok=True)
            continue
        moved.unlink(missing_ok=True)
        log.warning("run_dir %s: taking over the lock of the run on %s: %s", run_dir, _describe(theirs), why)
    raise RunDirLocked(f"run_dir '{run_dir}': could not take {path} (it changed hands while we tried)")
