"""How a decision's α is drawn: fixed, uniformly random, a linear curriculum, or the learned
Beta policy (ATESD). All share one interface, so the controller actor, its hold window, its
rewards and its timeline are the same for every baseline; only the learned one updates itself.
"""

from __future__ import annotations

import numpy as np
import torch

from atesd_ray.config import Config
from controller.policy import BetaPolicy, reinforce_loss


class Draw:
    """α for each of n policy inputs; ``x`` is what REINFORCE needs (the raw Beta sample)."""

    def __init__(
        self, alpha: np.ndarray, x: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None
    ):
        self.alpha, self.x, self.a, self.b = alpha, x, a, b


class Strategy:
    learns = False

    def draw(self, step: int, inputs: np.ndarray, rng: np.random.Generator) -> Draw:
        raise NotImplementedError

    def learn(self, inputs: np.ndarray, x: np.ndarray, advantages: np.ndarray) -> dict[str, float]:
        return {}

    def tensors(self) -> dict:
        return {}

    def load_tensors(self, state: dict) -> None:
        return None


class FixedExposure(Strategy):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def draw(self, step, inputs, rng):
        alpha = np.full(len(inputs), self.alpha)
        return Draw(alpha, alpha)


class RandomExposure(Strategy):
    """The uncontrolled baseline: α uniform on [α_min, α_max], independent of the state."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def draw(self, step, inputs, rng):
        x = rng.uniform(size=len(inputs))
        return Draw(self.lo + x * (self.hi - self.lo), x)


class LinearExposure(Strategy):
    """A curriculum: α goes linearly from ``start`` at step 0 to ``end`` at the last step."""

    def __init__(self, start: float, end: float, total_steps: int):
        self.start, self.end, self.total = start, end, total_steps

    def draw(self, step, inputs, rng):
        alpha = self.start + (self.end - self.start) * step / max(1, self.total - 1)
        alpha = np.full(len(inputs), alpha)
        return Draw(alpha, alpha)


class BetaPolicyExposure(Strategy):
    """ATESD: α ~ Beta(a(s), b(s)) clipped to [α_min, α_max]; REINFORCE with Adam."""

    learns = True

    def __init__(self, cfg: Config, n_inputs: int, seed: int):
        c = cfg.controller
        self.c = c
        self.policy = BetaPolicy(n_inputs, c.hidden, torch.Generator().manual_seed(seed))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=c.lr)

    @torch.no_grad()
    def draw(self, step, inputs, rng):
        a, b = (t.numpy() for t in self.policy(torch.from_numpy(inputs)))
        x = rng.beta(a, b)
        return Draw(np.clip(x, self.c.alpha_min, self.c.alpha_max), x, a, b)

    def learn(self, inputs, x, advantages):
        loss, info = reinforce_loss(
            self.policy,
            torch.from_numpy(inputs),
            torch.from_numpy(x),
            torch.from_numpy(advantages),
            self.c.entropy_coef,
            self.c.entropy_target,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return info

    def tensors(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_tensors(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])


def make_strategy(cfg: Config, total_steps: int, n_inputs: int, seed: int) -> Strategy:
    c = cfg.controller
    if c.kind == "fixed":
        return FixedExposure(cfg.algorithm.alpha)
    if c.kind == "random":
        return RandomExposure(c.alpha_min, c.alpha_max)
    if c.kind == "linear":
        return LinearExposure(c.linear_start, c.linear_end, total_steps)
    return BetaPolicyExposure(cfg, n_inputs, seed)
