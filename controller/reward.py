"""The delayed reward of one exposure decision (DESIGN §4) and the paper's ablations of it.

Index convention (our reading of DESIGN §4). A decision taken at step t0 sets α for the H student
updates t0 .. t0+H-1 (the hold window). A subscript t0+i names a value known once i updates of
the decision have been done:

- ℓ_{t0+i}: the progress signal of the student after i updates; ℓ_{t0} is its value when the
  decision is taken. With the default signal (the probe NLL, measured after every update) ℓ_{t0+i}
  is the probe NLL measured after step t0+i-1; with ``progress_signal=loss`` it is the
  distillation loss of step t0+i, which is computed on the weights after i updates.
- g_{t0+i}: the teacher-grounded signal measured during the decision's i-th update (step t0+i-1),
  so g_{t0+1} .. g_{t0+H} are the decision's own exposures.

The reward then follows the formulas literally:

    G_lp = Σ_{i=1..L} γ^(i-1) · max(0, ℓ_{t0+i-1} - ℓ_{t0+i})
    G_gt = Σ_{i=1..L} γ^(i-1) · g_{t0+i} / Σ_{i=1..L} γ^(i-1)
    R    = G_lp + λ_gt · G_gt

With L > H the sum covers the hold window and then L - H updates of look-ahead beyond it (at
discounted weight). A decision is scored once its hold window is over and the values its reward
needs are known, i.e. after update t0 + max(H, span) - 1 (one more for ``progress_signal=loss``).

Kinds (``controller.reward``), the ablations of the paper:

- ``immediate``: the one-step reward, max(0, ℓ_{t0} - ℓ_{t0+1});
- ``short``: short delayed credit without discount: the progress over the hold window, γ = 1;
- ``lp_only``: G_lp (discounted look-ahead);
- ``full``: G_lp + λ_gt · G_gt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from atesd_ray.config import ControllerConfig


@dataclass
class RewardParts:
    g_lp: float
    g_gt: float | None  # only the full reward has the grounded term
    reward: float


def learning_progress(signal: Sequence[float], gamma: float) -> float:
    """Σ_i γ^(i-1) max(0, ℓ_{i-1} - ℓ_i) over ``signal`` = [ℓ_{t0}, ℓ_{t0+1}, ..., ℓ_{t0+n}]."""
    return sum(gamma**i * max(0.0, signal[i] - signal[i + 1]) for i in range(len(signal) - 1))


def grounded(values: Sequence[float], gamma: float) -> float:
    """The γ-discounted mean Σ_i γ^(i-1) g_{t0+i} / Σ_i γ^(i-1) over ``values`` = [g_{t0+1}, ...]."""
    weights = [gamma**i for i in range(len(values))]
    return sum(w * g for w, g in zip(weights, values, strict=True)) / sum(weights)


def reward_span(cfg: ControllerConfig) -> int:
    """How many updates after the decision its reward looks at."""
    return {"immediate": 1, "short": cfg.hold, "lp_only": cfg.lookahead, "full": cfg.lookahead}[cfg.reward]


def decision_reward(
    cfg: ControllerConfig, signal: Sequence[float], grounding: Sequence[float]
) -> RewardParts:
    """The reward of one decision from ``signal`` = [ℓ_{t0} .. ℓ_{t0+span}] and
    ``grounding`` = [g_{t0+1} .. g_{t0+span}] (``span`` = :func:`reward_span`)."""
    span = reward_span(cfg)
    if len(signal) != span + 1 or len(grounding) != span:
        raise ValueError(
            f"reward={cfg.reward} needs {span + 1} signal values and {span} grounding values, "
            f"got {len(signal)} and {len(grounding)}"
        )
    gamma = 1.0 if cfg.reward in ("immediate", "short") else cfg.gamma
    g_lp = learning_progress(signal, gamma)
    if cfg.reward != "full":
        return RewardParts(g_lp, None, g_lp)
    g_gt = grounded(grounding, cfg.gamma)
    return RewardParts(g_lp, g_gt, g_lp + cfg.lambda_gt * g_gt)
