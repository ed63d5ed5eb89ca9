"""The controller's state: EMAs of the training statistics, standardized with running mean/std.

Global features (DESIGN §4), in policy-input order: training progress (step / total), EMAs of the
recent α, of the distillation loss, of the teacher-student mismatch (token-mean KL and top-1
disagreement) and of the probe NLL, and the latest batch's student confidence. An EMA starts at
its first value; a non-finite value (e.g. the probe NLL of a run without a probe set) leaves it as is. Each step's feature vector also updates a running mean/variance (Welford), and
the policy sees the standardized vector, clipped to ±``feature_clip``.

Per-example features (``granularity=example``), per problem id: whether the student has seen the
problem, and EMAs of its pass rate and of its sampled-token mismatch, the last two standardized
over all problems' observations (an unseen problem gets 0, i.e. the average).
"""

from __future__ import annotations

import math

import numpy as np

GLOBAL_FEATURES = ("progress", "alpha", "loss", "mismatch_kl", "top1_disagree", "probe_nll", "confidence")
# the step-statistics keys the EMAs follow (progress is computed; confidence is the latest value)
EMA_KEYS = ("alpha", "loss", "mismatch_kl", "top1_disagree", "probe_nll")
EXAMPLE_FEATURES = ("seen", "pass_rate", "mismatch")


class RunningStandardizer:
    """Running per-feature mean and variance (Welford); ``standardize`` maps to ~N(0, 1)."""

    def __init__(self, size: int, clip: float):
        self.clip = clip
        self.count = 0
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def update(self, x: np.ndarray) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (x - self.mean)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        std = np.sqrt(self.m2 / self.count) if self.count > 1 else np.ones_like(self.mean)
        return np.clip((x - self.mean) / np.maximum(std, 1e-6), -self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.m2 = np.array(state["m2"], dtype=np.float64)


def ema(old: float | None, new: float, decay: float) -> float:
    return new if old is None else decay * old + (1.0 - decay) * new


class TrainingState:
    """The global features, updated once per observed step."""

    def __init__(self, total_steps: int, decay: float, clip: float):
        self.total_steps = total_steps
        self.decay = decay
        self.emas: dict[str, float | None] = dict.fromkeys(EMA_KEYS)
        self.confidence = 0.0
        self.standardizer = RunningStandardizer(len(GLOBAL_FEATURES), clip)

    def raw(self, step: int) -> np.ndarray:
        emas = [self.emas[k] if self.emas[k] is not None else 0.0 for k in EMA_KEYS]
        return np.array([step / self.total_steps, *emas, self.confidence], dtype=np.float64)

    def observe(self, step: int, stats: dict) -> None:
        """Fold in step ``step``'s statistics (with keys ``EMA_KEYS`` and ``confidence``)."""
        missing = [k for k in (*EMA_KEYS, "confidence") if k not in stats]
        if missing:
            raise KeyError(f"controller: the statistics of step {step} lack {missing} (got {sorted(stats)})")
        for k in EMA_KEYS:
            if math.isfinite(float(stats[k])):
                self.emas[k] = ema(self.emas[k], float(stats[k]), self.decay)
        self.confidence = float(stats["confidence"])
        self.standardizer.update(self.raw(step + 1))

    def features(self, step: int) -> tuple[dict[str, float], np.ndarray]:
        """The named raw features at ``step`` and the standardized policy input."""
        raw = self.raw(step)
        return dict(zip(GLOBAL_FEATURES, raw.tolist(), strict=True)), self.standardizer.standardize(raw)

    def state_dict(self) -> dict:
        return {
            "emas": self.emas,
            "confidence": self.confidence,
            "standardizer": self.standardizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.emas = dict(state["emas"])
        self.confidence = state["confidence"]
        self.standardizer.load_state_dict(state["standardizer"])


class ExampleHistory:
    """What the controller knows about each problem (by record id) from its earlier visits."""

    def __init__(self, decay: float, clip: float):
        self.decay = decay
        self.seen: dict[str, list[float]] = {}  # uid -> [pass-rate EMA, mismatch EMA]
        self.standardizer = RunningStandardizer(2, clip)

    def observe(self, per_example: dict[str, dict]) -> None:
        """Fold in one step's per-problem statistics ``{uid: {"reward": .., "mismatch": ..}}``."""
        for uid, stats in per_example.items():
            old = self.seen.get(uid, [None, None])
            new = [
                ema(old[0], float(stats["reward"]), self.decay),
                ema(old[1], float(stats["mismatch"]), self.decay),
            ]
            self.seen[uid] = new
            self.standardizer.update(np.array(new))

    def features(self, uid: str) -> np.ndarray:
        if uid not in self.seen:
            return np.zeros(len(EXAMPLE_FEATURES))
        return np.concatenate([[1.0], self.standardizer.standardize(np.array(self.seen[uid]))])

    def state_dict(self) -> dict:
        return {"seen": self.seen, "standardizer": self.standardizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {k: list(v) for k, v in state["seen"].items()}
        self.standardizer.load_state_dict(state["standardizer"])
