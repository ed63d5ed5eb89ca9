"""The exposure controller actor: one per run, named ``{run}-controller``, reachable with
``ray.get_actor``. It wraps :class:`controller.core.Controller` (policy, decision buffer, features)
with what touches files: checkpoints and the live ``controller_timeline.jsonl``.

The timeline file is rewritten (write to a temporary file, then rename) whenever a decision is
taken, scored or used by an update, so a dashboard tailing it always reads a whole file with the
latest rewards and advantages. It lives in the run directory, which, like the checkpoints written
by other actors, must be on storage shared by the nodes.

Checkpoints load without executing code: ``controller.json`` (features, decisions, RNG state) and
``controller_policy.pt`` (policy and Adam tensors, read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from atesd_ray.config import Config
from atesd_ray.runtime.checkpoint import load_tensors
from atesd_ray.runtime.once import once_per_step
from controller.core import Controller
from controller.metrics import ControllerMetrics

STATE_FILE = "controller.json"
TENSOR_FILE = "controller_policy.pt"


def needed_signals(cfg: Config) -> frozenset[str]:
    """What the controller reads from a step besides the student's loss statistics, declared once
    when the run's actors are built: the teacher's grounding signal g and the probe NLL (a state
    feature, and the default progress signal) every step when it scores its decisions, the probe
    KL when it is the progress signal, and per-problem statistics from the student when it acts
    per problem."""
    c = cfg.controller
    signals = {"grounding", "probe_nll"} if c.scores_decisions else set()
    if c.scores_decisions and c.progress_signal == "probe_kl":
        signals.add("probe_kl")
    if c.granularity == "example":
        signals.add("per_example")
    return frozenset(signals)


class ExposureController:
    def __init__(self, cfg: Config, total_steps: int, timeline_path: str | None = None, run: str = ""):
        """``timeline_path``: where to keep the decision timeline (kinds that take no decisions, a
        fixed exposure, keep none)."""
        self.controller = Controller(cfg, total_steps)
        self.timeline_path = Path(timeline_path) if timeline_path and self.controller.tracks else None
        self.metrics = ControllerMetrics(run, cfg.model.name)

    def exposure(self, step: int, uids: list[str] | None = None) -> float | dict[str, float]:
        """α for ``step``: a float (granularity=batch) or ``{uid: α}`` for ``uids`` (example)."""
        before = len(self.controller.decisions)
        alpha = self.controller.exposure(step, uids)
        if len(self.controller.decisions) != before:
            self._write_timeline()
        return alpha

    def baseline(self, step: int, probes: dict[str, float]) -> bool:
        """The probe measurements before the run's first update (ℓ_{t0} of the first decision)."""
        self.controller.baseline(step, probes)
        return True

    @once_per_step
    def observe(self, step: int, stats: dict, probes: dict[str, float] | None) -> dict[str, float]:
        """Step ``step``'s statistics and the probe measurements after its update; returns the
        controller's metrics for tracking (its series are also exported to Prometheus)."""
        metrics = self.controller.observe(step, stats, probes or {})
        self._write_timeline()
        return metrics | self.metrics.record(self.controller.timeline())

    def timeline(self) -> list[dict]:
        return self.controller.timeline()

    def _write_timeline(self) -> None:
        if self.timeline_path is None:
            return
        tmp = self.timeline_path.with_name(self.timeline_path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(entry) + "\n" for entry in self.controller.timeline())
        os.replace(tmp, self.timeline_path)

    def save(self, directory: str) -> bool:
        out = Path(directory)
        (out / STATE_FILE).write_text(json.dumps(self.controller.state_dict()))
        tensors = self.controller.strategy.tensors()
        if tensors:
            torch.save(tensors, out / TENSOR_FILE)
        return True

    def load(self, directory: str) -> bool:
        """Restore from a checkpoint written by :meth:`save` (one without controller files is
        left as is: a run may resume from a checkpoint of a fixed-exposure run)."""
        d = Path(directory)
        if not (d / STATE_FILE).is_file():
            return False
        self.controller.load_state_dict(json.loads((d / STATE_FILE).read_text()))
        if self.controller.strategy.learns:
            if not (d / TENSOR_FILE).is_file():
                raise FileNotFoundError(
                    f"checkpoint {d} has {STATE_FILE} but no {TENSOR_FILE} for the controller policy"
                )
            self.controller.strategy.load_tensors(load_tensors(d / TENSOR_FILE))
        self._write_timeline()
        return True
