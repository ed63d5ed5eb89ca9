"""The exposure controller itself, without Ray: hold window, decision buffer, rewards, learning.

A decision is taken at the first step t0 that no earlier decision covers and holds for the next
``hold`` steps (t0 .. t0+H-1). With ``granularity=batch`` it is one α for every problem of those
steps; with ``granularity=example`` each problem gets its own α, drawn when it first appears in
the window from the policy given the decision's state and that problem's own features (one
"action" per problem). Once the hold window is over and the values its reward needs are known
(``controller/reward.py`` has the index convention), the decision is scored; every
``batch_decisions`` scored decisions make one REINFORCE update with z-scored advantages over
their actions. With per-example actions and the full reward, an action's reward is
G_lp + λ_gt · g_u: the decision's learning progress plus the grounding of that problem at its
own α (the problem is usually seen once per window, so its g cannot be discounted over L steps).

A fixed exposure has nothing to learn and no decisions worth a timeline: its controller answers
``exposure`` and ignores the statistics. Every other kind (random, linear, atesd) is scored the
same way, so the baselines' timelines carry rewards too.

All randomness (the Beta or uniform draws) comes from one numpy Generator owned here and the
policy's initialization from a seeded torch Generator; :meth:`Controller.state_dict` holds
everything needed to continue bit for bit (policy and optimizer tensors separately).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from atesd_ray.config import Config
from controller.features import EXAMPLE_FEATURES, GLOBAL_FEATURES, ExampleHistory, TrainingState
from controller.policy import zscore
from controller.reward import decision_reward, reward_span
from controller.strategies import make_strategy


@dataclass
class Action:
    """One α draw: the whole batch's (``uid`` None) or one problem's (granularity=example)."""

    step: int
    uid: str | None
    inputs: list[float]  # the policy input it was drawn from
    x: float  # the raw sample (α is x clipped to [alpha_min, alpha_max])
    alpha: float
    a: float | None = None
    b: float | None = None
    grounding: float | None = None  # per-example: g of this problem at its α
    reward: float | None = None
    advantage: float | None = None


@dataclass
class Decision:
    index: int
    start: int  # t0
    hold: int
    features: dict[str, float]  # raw state features at t0
    state: list[float]  # their standardized values, the policy input
    actions: list[Action] = field(default_factory=list)
    g_lp: float | None = None
    g_gt: float | None = None
    reward: float | None = None
    status: str = "open"  # open -> scored -> used (by a policy update)

    def covers(self, step: int) -> bool:
        return self.start <= step < self.start + self.hold


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


class Controller:
    def __init__(self, cfg: Config, total_steps: int):
        c = cfg.controller
        self.c = c
        self.total_steps = total_steps
        self.tracks = c.scores_decisions
        self.per_example = c.granularity == "example"
        seed = cfg.seed if c.seed is None else c.seed
        self.rng = np.random.default_rng(seed)
        self.state = TrainingState(total_steps, c.feature_ema, c.feature_clip)
        self.history = ExampleHistory(c.feature_ema, c.feature_clip)
        n_inputs = len(GLOBAL_FEATURES) + (len(EXAMPLE_FEATURES) if self.per_example else 0)
        self.strategy = make_strategy(cfg, total_steps, n_inputs, seed)
        self.decisions: list[Decision] = []
        self.signal: dict[int, float] = {}  # ℓ after n student updates
        self.grounding: dict[int, float] = {}  # batch-mean g of the n-th update
        self.updates = 0
        self.last_update: dict[str, float] = {}

    # -- acting ----------------------------------------------------------------------------------
    def exposure(self, step: int, uids: list[str] | None = None) -> float | dict[str, float]:
        """α for ``step``: a float, or ``{uid: α}`` for the problems ``uids`` (granularity=example)."""
        if self.decisions and step < self.decisions[-1].start:
            raise ValueError(
                f"controller: exposure for step {step} after a decision at step {self.decisions[-1].start}"
            )
        decision = (
            self.decisions[-1] if self.decisions and self.decisions[-1].covers(step) else self._decide(step)
        )
        if not self.per_example:
            return decision.actions[0].alpha
        if uids is None:
            raise ValueError(
                "controller.granularity=example: exposure() needs the problem ids of the step's batch"
            )
        drawn = {a.uid for a in decision.actions}
        new = [u for u in dict.fromkeys(uids) if u not in drawn]
        if new:
            self._draw(decision, step, new)
        alphas = {a.uid: a.alpha for a in decision.actions}
        return {u: alphas[u] for u in uids}

    def _decide(self, step: int) -> Decision:
        features, state = self.state.features(step)
        decision = Decision(len(self.decisions), step, self.c.hold, features, state.tolist())
        if not self.per_example:
            self._draw(decision, step, [None])
        self.decisions.append(decision)
        return decision

    def _draw(self, decision: Decision, step: int, uids: list) -> None:
        state = np.array(decision.state)
        inputs = np.stack(
            [state if u is None else np.concatenate([state, self.history.features(u)]) for u in uids]
        )
        draw = self.strategy.draw(step, inputs, self.rng)
        for i, uid in enumerate(uids):
            a = None if draw.a is None else float(draw.a[i])
            b = None if draw.b is None else float(draw.b[i])
            decision.actions.append(
                Action(step, uid, inputs[i].tolist(), float(draw.x[i]), float(draw.alpha[i]), a, b)
            )

    # -- observing -------------------------------------------------------------------------------
    def baseline(self, step: int, probes: dict[str, float]) -> None:
        """ℓ before the first update of this run (a probe measurement after ``step`` updates)."""
        if self.c.progress_signal != "loss":
            self.signal[step] = float(probes[self.c.progress_signal])

    def observe(self, step: int, stats: dict, probes: dict[str, float]) -> dict[str, float]:
        """Fold in step ``step``'s statistics; score finished decisions; learn from full batches."""
        if not self.tracks:
            return {}
        decision = next((d for d in reversed(self.decisions) if d.covers(step)), None)
        if decision is None:
            raise ValueError(f"controller: statistics for step {step}, for which no exposure was given")
        if self.c.progress_signal != "loss" and step not in self.signal:
            raise ValueError(
                f"controller: no {self.c.progress_signal} before step {step}; call baseline() before the first step"
            )
        used = [a for a in decision.actions if a.step == step or not self.per_example]
        probe_nll = probes.get("probe_nll", float("nan"))
        self.state.observe(step, {**stats, "probe_nll": probe_nll, "alpha": _mean([a.alpha for a in used])})
        if self.per_example:
            self._observe_examples(step, stats, used)
        if self.c.progress_signal != "loss":
            self.signal[step + 1] = float(probes[self.c.progress_signal])  # measured after the update
        else:
            self.signal[step] = float(stats["loss"])  # computed on the weights before it
        self.grounding[step + 1] = float(stats["grounding"])
        self._score(done=step + 1)
        self._learn()
        self._forget()
        return self.metrics()

    def _observe_examples(self, step: int, stats: dict, actions: list[Action]) -> None:
        per_example = stats.get("per_example")
        if per_example is None:
            raise KeyError(
                f"controller.granularity=example: the statistics of step {step} lack 'per_example'"
            )
        for a in actions:
            if a.uid not in per_example:
                raise KeyError(f"controller: step {step}'s per_example statistics lack problem {a.uid!r}")
            a.grounding = float(per_example[a.uid]["grounding"])
        self.history.observe(per_example)

    def _score(self, done: int) -> None:
        """Score every open decision whose hold window is over and whose reward values are known."""
        span = reward_span(self.c)
        for d in self.decisions:
            last = d.start + span
            if d.status != "open" or done < d.start + d.hold:
                continue
            signal = [self.signal.get(i) for i in range(d.start, last + 1)]
            grounding = [self.grounding.get(i) for i in range(d.start + 1, last + 1)]
            if None in signal or None in grounding:
                continue
            parts = decision_reward(self.c, signal, grounding)
            d.g_lp, d.g_gt, d.reward = parts.g_lp, parts.g_gt, parts.reward
            for a in d.actions:
                per_problem = self.per_example and self.c.reward == "full"
                a.reward = parts.g_lp + self.c.lambda_gt * a.grounding if per_problem else parts.reward
            d.status = "scored"

    def _learn(self) -> None:
        """One REINFORCE update once ``batch_decisions`` decisions are scored."""
        ready = [d for d in self.decisions if d.status == "scored"]
        if len(ready) < self.c.batch_decisions:
            return
        actions = [a for d in ready for a in d.actions]
        advantages = zscore(np.array([a.reward for a in actions]))
        for a, adv in zip(actions, advantages, strict=True):
            a.advantage = float(adv)
        inputs = np.array([a.inputs for a in actions])
        self.last_update = self.strategy.learn(inputs, np.array([a.x for a in actions]), advantages)
        self.updates += 1
        for d in ready:
            d.status = "used"

    def _forget(self) -> None:
        """Drop signal values that no open decision can need any more."""
        open_starts = [d.start for d in self.decisions if d.status == "open"]
        keep_from = min(open_starts, default=max(self.signal, default=0))
        self.signal = {k: v for k, v in self.signal.items() if k >= keep_from}
        self.grounding = {k: v for k, v in self.grounding.items() if k > keep_from}

    # -- reporting and state ---------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        scored = sum(d.status != "open" for d in self.decisions)
        out = {
            "controller/decisions": len(self.decisions),
            "controller/scored": scored,
            "controller/updates": self.updates,
        }
        return out | {f"controller/{k}": v for k, v in self.last_update.items()}

    def timeline(self) -> list[dict]:
        """One entry per decision: steps covered, α, Beta (a, b), state, reward parts, advantage."""
        out = []
        for d in self.decisions:
            entry = {
                "decision": d.index,
                "first_step": d.start,
                "last_step": min(d.start + d.hold, self.total_steps) - 1,
                "alpha": _mean([a.alpha for a in d.actions]),
                "a": _mean([a.a for a in d.actions]),
                "b": _mean([a.b for a in d.actions]),
                "features": d.features,
                "g_lp": d.g_lp,
                "g_gt": d.g_gt,
                "reward": d.reward,
                "advantage": _mean([a.advantage for a in d.actions]),
                "status": d.status,
            }
            if self.per_example:
                entry["examples"] = [
                    {k: getattr(a, k) for k in ("uid", "step", "alpha", "grounding", "reward", "advantage")}
                    for a in d.actions
                ]
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        """Everything but the policy's tensors (see ``strategy.tensors()``), JSON-serializable."""
        return {
            "rng": self.rng.bit_generator.state,
            "state": self.state.state_dict(),
            "history": self.history.state_dict(),
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "signal": sorted(self.signal.items()),
            "grounding": sorted(self.grounding.items()),
            "updates": self.updates,
            "last_update": self.last_update,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.state.load_state_dict(state["state"])
        self.history.load_state_dict(state["history"])
        self.decisions = [
            Decision(**{**d, "actions": [Action(**a) for a in d["actions"]]}) for d in state["decisions"]
        ]
        self.signal = {int(k): v for k, v in state["signal"]}
        self.grounding = {int(k): v for k, v in state["grounding"]}
        self.updates = state["updates"]
        self.last_update = state["last_update"]
