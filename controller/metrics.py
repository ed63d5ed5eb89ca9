"""The run's Prometheus series, exported through ``ray.util.metrics``, declared once in ``SERIES``.

Ray's metrics agent serves them for Prometheus with a ``ray_`` prefix (counters also get
``_total``), with Ray's own labels (SessionName, NodeAddress, ...) plus ``run`` and ``model``.
The shipped Grafana dashboard (``controller/dashboard/grafana_atesd.json``) is tested against the
names declared here.

Two exporters feed them: :class:`ControllerMetrics` inside the controller actor, from its decision
timeline after every observed step, and :class:`TrainerMetrics` in the driver, from each step's
metrics. :func:`controller_values` is the pure part: the same values, keyed for tracking
(TensorBoard and ``metrics.jsonl`` log them under ``controller/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RUN_TAGS = ("run", "model")


@dataclass(frozen=True)
class Series:
    """One exported series. ``key`` names its value in the values dict (a counter's value is its
    increment); a series with a ``tag`` takes every value keyed ``<key>/<tag value>``
    (e.g. ``feature/loss`` -> ``feature="loss"``)."""

    name: str
    help: str
    key: str
    kind: str = "gauge"  # gauge | counter
    tag: str | None = None

    @property
    def prometheus(self) -> str:
        """The name Prometheus scrapes from Ray's metrics agent."""
        return "ray_" + self.name + ("_total" if self.kind == "counter" else "")


CONTROLLER_SERIES = (
    Series("atesd_controller_alpha", "Reveal ratio alpha of the current decision", "alpha"),
    Series("atesd_controller_beta_a", "Beta shape a of the current decision's policy", "beta_a"),
    Series("atesd_controller_beta_b", "Beta shape b of the current decision's policy", "beta_b"),
    Series("atesd_controller_beta_mean", "Mean a/(a+b) of the current Beta policy", "beta_mean"),
    Series("atesd_controller_beta_std", "Standard deviation of the current Beta policy", "beta_std"),
    Series(
        "atesd_controller_policy_entropy",
        "Differential entropy (nats) of the current Beta policy",
        "policy_entropy",
    ),
    Series("atesd_controller_decisions", "Exposure decisions taken so far", "decisions"),
    Series("atesd_controller_scored", "Decisions whose delayed reward is known", "scored"),
    Series("atesd_controller_reward", "Reward R of the latest scored decision", "reward"),
    Series(
        "atesd_controller_reward_part",
        "Reward parts (g_lp, g_gt) of the latest scored decision",
        "reward",
        tag="part",
    ),
    Series(
        "atesd_controller_advantage", "Advantage of the latest decision used by a policy update", "advantage"
    ),
    Series("atesd_controller_feature", "Raw state feature at the current decision", "feature", tag="feature"),
)

TRAINER_SERIES = (
    Series("atesd_trainer_step", "Last finished training step (0-based)", "step"),
    Series("atesd_trainer_steps", "Training steps finished by this driver", "steps", kind="counter"),
    Series("atesd_trainer_loss", "Distillation loss", "loss"),
    Series("atesd_trainer_mismatch_kl", "Teacher-student mismatch: token-mean KL", "mismatch_kl"),
    Series("atesd_trainer_top1_disagree", "Teacher-student top-1 disagreement", "top1_disagree"),
    Series("atesd_trainer_accuracy", "Rollout accuracy of the step's batch", "accuracy"),
    Series("atesd_trainer_probe_nll", "Student NLL of the probe set's reference solutions", "probe_nll"),
    Series("atesd_trainer_grad_norm", "Gradient norm before clipping", "grad_norm"),
    Series(
        "atesd_trainer_rollout_logprob_gap_mean",
        "Train-inference gap: token mean of |rollout log-prob - student log-prob|",
        "rollout_logprob_gap_mean",
    ),
    Series(
        "atesd_trainer_rollout_logprob_gap_max",
        "Train-inference gap: largest |rollout log-prob - student log-prob| of the step",
        "rollout_logprob_gap_max",
    ),
    Series(
        "atesd_trainer_sync_logprob_gap",
        "Weight-sync check: largest receiver's mean |log-prob - student log-prob| on the check sequence",
        "sync_logprob_gap",
    ),
    Series("atesd_trainer_weight_version", "Student weight version after the step's sync", "weight_version"),
    Series(
        "atesd_trainer_staleness", "Steps between the rollout weights and the trained weights", "staleness"
    ),
    Series("atesd_trainer_tokens_per_second", "Response tokens trained per second", "tokens_per_s"),
    Series("atesd_trainer_phase_seconds", "Seconds per phase of the step", "phase", tag="phase"),
)

SERIES = CONTROLLER_SERIES + TRAINER_SERIES


def _latest(timeline: list[dict], key: str) -> dict | None:
    return next((d for d in reversed(timeline) if d.get(key) is not None), None)


def beta_stats(a: float, b: float) -> dict[str, float]:
    """Mean, standard deviation and differential entropy of Beta(a, b)."""
    dist = torch.distributions.Beta(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    return {
        "beta_mean": a / (a + b),
        "beta_std": math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))),
        "policy_entropy": float(dist.entropy()),
    }


def controller_values(timeline: list[dict]) -> dict[str, float]:
    """The controller series' values from its decision timeline: the current decision's α, policy
    and state features, and the reward (parts) and advantage of the latest decisions that have one."""
    if not timeline:
        return {}
    current = timeline[-1]
    out = {"alpha": current["alpha"], "decisions": len(timeline)}
    out["scored"] = sum(d.get("reward") is not None for d in timeline)
    if current.get("a") is not None and current.get("b") is not None:
        out |= {"beta_a": current["a"], "beta_b": current["b"]} | beta_stats(current["a"], current["b"])
    out |= {f"feature/{k}": v for k, v in (current.get("features") or {}).items() if v is not None}
    scored = _latest(timeline, "reward")
    if scored is not None:
        out |= {
            "reward": scored["reward"],
            "reward/g_lp": scored.get("g_lp"),
            "reward/g_gt": scored.get("g_gt"),
        }
    used = _latest(timeline, "advantage")
    if used is not None:
        out["advantage"] = used["advantage"]
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}


def trainer_values(step: int, metrics: dict) -> dict[str, float]:
    """The trainer series' values from one step's metrics (``time_<phase>_s`` -> ``phase/<phase>``);
    ``steps`` is the counter's increment."""
    keys = {s.key for s in TRAINER_SERIES}
    out: dict[str, float] = {"step": step, "steps": 1}
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if key.startswith("time_") and key.endswith("_s"):
            out[f"phase/{key[5:-2]}"] = value
        elif key == "step_time_s":
            out["phase/step"] = value
        elif key in keys:
            out[key] = value
    return out


class RayExporter:
    """The ``ray.util.metrics`` objects of a group of series, tagged with the run and model."""

    def __init__(self, series: tuple[Series, ...], run: str, model: str):
        from ray.util.metrics import Counter, Gauge

        self.series = series
        self.tags = {"run": run, "model": model}
        self.metrics = {}
        for s in series:
            kind = Counter if s.kind == "counter" else Gauge
            self.metrics[s.name] = kind(
                s.name, description=s.help, tag_keys=RUN_TAGS + ((s.tag,) if s.tag else ())
            )

    def record(self, values: dict[str, float]) -> None:
        for s in self.series:
            if s.tag is None:
                if s.key in values:
                    self._set(s, values[s.key], self.tags)
                continue
            prefix = s.key + "/"
            for key, value in values.items():
                if key.startswith(prefix):
                    self._set(s, value, self.tags | {s.tag: key[len(prefix) :]})

    def _set(self, s: Series, value: float, tags: dict[str, str]) -> None:
        if s.kind == "counter":
            self.metrics[s.name].inc(value, tags=tags)
        else:
            self.metrics[s.name].set(value, tags=tags)


class ControllerMetrics:
    """Called by the controller actor after each observed step."""

    def __init__(self, run: str, model: str):
        self.exporter = RayExporter(CONTROLLER_SERIES, run, model)

    def record(self, timeline: list[dict]) -> dict[str, float]:
        """Export the series; returns them keyed ``controller/<key>`` for tracking."""
        values = controller_values(timeline)
        self.exporter.record(values)
        return {f"controller/{k}": v for k, v in values.items()}


class TrainerMetrics:
    """Called by the driver after each logged step."""

    def __init__(self, run: str, model: str):
        self.exporter = RayExporter(TRAINER_SERIES, run, model)

    def record(self, step: int, metrics: dict) -> None:
        self.exporter.record(trainer_values(step, metrics))
