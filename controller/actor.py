"""The exposure controller actor: one per run, named, reachable with ``ray.get_actor``.

It answers "which reveal ratio α for step t?" and observes every step's statistics. This module
holds the actor and the schedule-style strategies; the learned ATESD policy plugs in through the
same ``Strategy`` interface.
"""

from __future__ import annotations

import json
from pathlib import Path

from atesd_ray.config import Config


class Strategy:
    """Decides α; ``observe`` sees each finished step's statistics."""

    def exposure(self, step: int) -> float:
        raise NotImplementedError

    def observe(self, step: int, stats: dict) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class FixedExposure(Strategy):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def exposure(self, step: int) -> float:
        return self.alpha


def make_strategy(cfg: Config, total_steps: int) -> Strategy:
    kind = cfg.controller.kind
    if kind == "fixed":
        return FixedExposure(cfg.algorithm.alpha)
    raise ValueError(f"controller.kind={kind} is not available in this build")


class ExposureController:
    def __init__(self, cfg: Config, total_steps: int):
        self.cfg = cfg
        self.strategy = make_strategy(cfg, total_steps)
        self.decisions: list[dict] = []

    def exposure(self, step: int) -> float:
        alpha = self.strategy.exposure(step)
        if not self.decisions or self.decisions[-1]["alpha"] != alpha:
            self.decisions.append({"step": step, "alpha": alpha})
        return alpha

    def observe(self, step: int, stats: dict, probe_nll: float) -> None:
        self.strategy.observe(step, {**stats, "probe_nll": probe_nll})

    def timeline(self) -> list[dict]:
        return list(self.decisions)

    def save(self, directory: str) -> bool:
        state = {"strategy": self.strategy.state_dict(), "decisions": self.decisions}
        (Path(directory) / "controller.json").write_text(json.dumps(state))
        return True

    def load(self, directory: str) -> bool:
        path = Path(directory) / "controller.json"
        if path.is_file():
            state = json.loads(path.read_text())
            self.strategy.load_state_dict(state["strategy"])
            self.decisions = state["decisions"]
        return True
