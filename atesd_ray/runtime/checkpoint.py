"""Atomic, complete-only checkpoints: ``checkpoints/step_<N>/``.

Actors write their parts into ``checkpoints/.tmp-step_<N>/``; the driver then writes
``trainer_state.json`` and a ``COMPLETE`` marker and renames the directory into place. A directory
named ``step_<N>`` is therefore always complete, and a run killed while saving leaves only a
``.tmp-*`` directory that is ignored (and cleaned up) by the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    def complete(self) -> list[tuple[int, Path]]:
        found = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / MARKER).is_file() and (d / STATE).is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` (auto | never | <dir>) points to, or None to start fresh."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not ((path / MARKER).is_file() and (path / STATE).is_file()):
            raise CheckpointError(f"resume={resume}: not a complete checkpoint (no {MARKER} or {STATE})")
        return path

    def begin(self, step: int) -> Path:
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step_{step}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp: Path, state: dict) -> Path:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        (tmp / MARKER).write_text(str(step))
        final = self.root / f"step_{step}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for _, d in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())
