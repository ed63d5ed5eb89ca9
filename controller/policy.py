"""The Beta exposure policy and its REINFORCE update (DESIGN §4).

DESIGN's MLP is 6→64→64→2; ours takes 7 inputs because the mismatch feature is two numbers
(token-mean KL and top-1 disagreement), and 10 with ``granularity=example`` (plus the problem's
seen flag, pass rate and mismatch; see ``controller/features.py``). The width is ``controller.hidden``.

(a, b) = 1 + softplus(MLP(s)) keeps both shape parameters above 1, so the density is unimodal
and finite on [0, 1]. REINFORCE uses the log-density of the raw Beta sample x; clipping x to
[α_min, α_max] is part of the environment. The entropy penalty is one-sided: only entropy above
the target is penalized, c · mean_i max(0, H[Beta(a_i, b_i)] - H_target)², averaged over the
states of the update batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributions import Beta

EPS = 1e-6


class BetaPolicy(nn.Module):
    """MLP n_in -> hidden -> hidden -> 2 (tanh) giving the Beta shape parameters, in float64.

    Weights start uniform in ±1/sqrt(fan_in) drawn from ``generator``, biases at 0, so that a
    standardized (zero) state starts at a = b = 1 + softplus(0) ≈ 1.69, i.e. mean α = 0.5.
    """

    def __init__(self, n_in: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2)
        ).double()
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = layer.in_features**-0.5
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.zero_()

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (1.0 + nn.functional.softplus(self.net(states))).unbind(-1)
        return a, b


def zscore(rewards: np.ndarray) -> np.ndarray:
    """Rewards -> advantages with mean 0 and std 1 (all 0 when the rewards are all equal)."""
    std = rewards.std()
    return (rewards - rewards.mean()) / std if std > 1e-12 else np.zeros_like(rewards)


def entropy_penalty(entropy: torch.Tensor, coef: float, target: float) -> torch.Tensor:
    return coef * (entropy - target).clamp(min=0.0).pow(2).mean()


def reinforce_loss(
    policy: BetaPolicy,
    states: torch.Tensor,
    samples: torch.Tensor,
    advantages: torch.Tensor,
    entropy_coef: float,
    entropy_target: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-mean(A · log π(x | s)) + the entropy penalty, over one batch of finished decisions."""
    a, b = policy(states)
    dist = Beta(a, b)
    log_prob = dist.log_prob(samples.clamp(EPS, 1.0 - EPS))
    entropy = dist.entropy()
    pg = -(advantages * log_prob).mean()
    penalty = entropy_penalty(entropy, entropy_coef, entropy_target)
    info = {
        "pg_loss": float(pg.detach()),
        "entropy": float(entropy.detach().mean()),
        "entropy_penalty": float(penalty.detach()),
        "beta_mean": float((a / (a + b)).detach().mean()),
    }
    return pg + penalty, info
