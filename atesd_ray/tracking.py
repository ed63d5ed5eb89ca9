"""Per-step metrics: one progress line on the console, ``metrics.jsonl``, TensorBoard, W&B.

A resumed (or rolled-back) run must keep the steps before its checkpoint and drop those after it,
in every record: the JSONL file is rewritten up to that step (verl's file logger would truncate it
whole), and TensorBoard's writer is opened with ``purge_step`` at that step, so its readers hide the
older run's later points (verl's ``Tracking`` opens it without). W&B goes through verl's ``Tracking``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from atesd_ray.console import quiet

CONSOLE_KEYS = (
    "loss",
    "mismatch_kl",
    "alpha",
    "accuracy",
    "probe_nll",
    "grad_norm",
    "response_len",
    "step_time_s",
)
# with --verbose (logging.level=debug) the step line also shows these
VERBOSE_KEYS = ("rollout_logprob_gap_mean", "rollout_logprob_gap_max", "staleness", "time_to_sync_s")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        backends: list[str],
        project: str,
        experiment: str,
        config: dict,
        resume_step: int = 0,
    ):
        self.run_dir = Path(run_dir)
        self.console = "console" in backends
        self.last_log, self.intervals = None, []
        self.jsonl = self.run_dir / "metrics.jsonl" if "jsonl" in backends else None
        if self.jsonl is not None:
            self._truncate_after(resume_step)
        self.tensorboard = None
        if "tensorboard" in backends:
            self._open_tensorboard(resume_step)
        self.verl = None
        if "wandb" in backends:
            from verl.utils.tracking import Tracking

            # verl prints where each backend writes; the summary names the run directory instead
            with contextlib.redirect_stdout(io.StringIO()) if quiet() else contextlib.nullcontext():
                self.verl = Tracking(
                    project_name=project, experiment_name=experiment, default_backend=["wandb"], config=config
                )

    def _open_tensorboard(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step)

    def rewind(self, step: int) -> None:
        """Forget the steps from ``step`` on (the run went back to the checkpoint of ``step``)."""
        if self.jsonl is not None:
            self._truncate_after(step)
        if self.tensorboard is not None:
            self.tensorboard.close()
            self._open_tensorboard(step)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines of steps before ``step`` (a resumed run rewrites the rest). A last line cut
        short (the run was killed while writing it) is dropped: its step is after the checkpoint."""
        if not self.jsonl.exists():
            return
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append((line, json.loads(line)))
            except json.JSONDecodeError as err:
                if i < len(lines) - 1:
                    raise ValueError(
                        f"{self.jsonl}: line {i + 1} is not JSON ({err}); only a last line may be cut"
                    ) from err
        kept = [line for line, row in rows if row.get("step", 0) < step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.jsonl is not None:
            with open(self.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.verl is not None:
            self.verl.log(numeric, step)
        now = time.monotonic()
        # seconds per step: between progress lines (periodic evals and checkpoints included), the
        # first step's own time until there are two lines
        self.intervals.append(now - self.last_log if self.last_log else metrics.get("step_time_s", 0.0))
        self.last_log = now
        if self.console:
            per_step = sum(self.intervals[-5:]) / len(self.intervals[-5:])
            remaining = metrics.get("total_steps", step + 1) - step - 1
            print(progress_line(step, metrics, per_step * remaining), flush=True)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.verl is not None:
            self.verl.finish()


def progress_line(step: int, metrics: dict[str, Any], eta_s: float | None = None) -> str:
    total = metrics.get("total_steps")
    head = f"step {step + 1}/{total}" if total else f"step {step + 1}"
    parts = [head]
    for key in CONSOLE_KEYS + (() if quiet() else VERBOSE_KEYS):
        v = metrics.get(key)
        if isinstance(v, int | float):
            parts.append(f"{key}={v:.4g}")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
