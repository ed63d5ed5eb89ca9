"""What the live page shows, read from the run directory: ``metrics.jsonl`` (one row per step),
``controller_timeline.jsonl`` (one row per controller decision) and ``config.yaml``.

The page needs nothing from the actors: it shows a run training in this process, one training
elsewhere on shared storage, and a finished run the same way, and it cannot change any of them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml

METRICS_FILE = "metrics.jsonl"
TIMELINE_FILE = "controller_timeline.jsonl"


def _parse(line: str, path: Path, lineno: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not a JSON object ({err})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [_parse(line, path, i) for i, line in enumerate(lines, 1) if line.strip()]


class MetricsTail:
    """The rows of ``metrics.jsonl``, reading only what was appended since the last call.

    A resumed run rewrites the file (it keeps the steps before its checkpoint): a file that
    shrank, or whose bytes at the old end do not start a row, is read again from the start. A row
    of a step already seen replaces the old one.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.offset = 0
        self.lines = 0
        self.rows: dict[int, dict] = {}

    def read(self) -> list[dict]:
        with self.lock:
            if not self.path.is_file():
                return []
            if self.path.stat().st_size < self.offset or not self._read_new():
                self.offset, self.lines, self.rows = 0, 0, {}
                self._read_new()
            return [self.rows[s] for s in sorted(self.rows)]

    def _read_new(self) -> bool:
        """Parse the complete lines after ``offset``; False if they do not start a row there."""
        with open(self.path, "rb") as fh:
            fh.seek(max(0, self.offset - 1))
            chunk = fh.read()
        if self.offset:
            if chunk[:1] != b"\n":
                return False
            chunk = chunk[1:]
        end = chunk.rfind(b"\n") + 1  # a last line without its newline is still being written
        lines = chunk[:end].decode().splitlines()
        if self.offset and lines and not lines[0].startswith("{"):
            return False
        for line in lines:
            self.lines += 1
            if line.strip():
                row = _parse(line, self.path, self.lines)
                self.rows[int(row["step"])] = row
        self.offset += end
        return True


class RunData:
    """The run directory's files, as the page's JSON endpoints serve them."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics = MetricsTail(self.run_dir / METRICS_FILE)

    def metrics_since(self, step: int) -> dict:
        rows = self.metrics.read()
        return {
            "rows": [r for r in rows if r["step"] >= step],
            "last_step": rows[-1]["step"] if rows else None,
        }

    def timeline(self) -> dict:
        return {"decisions": read_jsonl(self.run_dir / TIMELINE_FILE)}

    def run_info(self) -> dict:
        """The few config values the page labels its plots with."""
        path = self.run_dir / "config.yaml"
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
        trainer, controller = cfg.get("trainer", {}), cfg.get("controller", {})
        return {
            "run": self.run_dir.resolve().name,
            "algorithm": cfg.get("algorithm", {}).get("name"),
            "model": cfg.get("model", {}).get("name"),
            "controller": controller.get("kind"),
            "hold": controller.get("hold"),
            "alpha_min": controller.get("alpha_min"),
            "alpha_max": controller.get("alpha_max"),
            "total_steps": trainer.get("total_steps"),
        }
