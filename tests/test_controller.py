"""The exposure controller without Ray: reward arithmetic, learning in a bandit, entropy penalty,
hold window, and bit-exact save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atesd_ray.config import AlgorithmConfig, Config, ConfigError, ControllerConfig, DataConfig
from controller.actor import ExposureController
from controller.core import Controller
from controller.policy import BetaPolicy, entropy_penalty, reinforce_loss
from controller.reward import decision_reward, grounded, learning_progress

# ℓ_{t0} .. ℓ_{t0+4} and g_{t0+1} .. g_{t0+4}; drops of ℓ: 1.0, 0.5, -0.25 (counts 0), 1.0
SIGNAL = [5.0, 4.0, 3.5, 3.75, 2.75]
GROUNDING = [-1.0, -2.0, -0.5, -1.5]
# by hand, with H = 2, L = 4, γ = 0.5, λ_gt = 0.2
G_LP = 1.0 + 0.5 * 0.5 + 0.25 * 0.0 + 0.125 * 1.0  # 1.375
G_GT = (-1.0 - 0.5 * 2.0 - 0.25 * 0.5 - 0.125 * 1.5) / (1 + 0.5 + 0.25 + 0.125)  # -1.2333...
EXPECTED = {
    "immediate": (1.0, None, 1.0),
    "short": (1.5, None, 1.5),
    "lp_only": (G_LP, None, G_LP),
    "full": (G_LP, G_GT, G_LP + 0.2 * G_GT),
}

ATESD = AlgorithmConfig(name="atesd")  # the algorithm whose exposure the controller chooses


def controller_config(**overrides) -> ControllerConfig:
    base = dict(kind="atesd", hold=2, lookahead=4, gamma=0.5, lambda_gt=0.2, batch_decisions=2)
    return ControllerConfig(**(base | overrides))


def step_stats(alpha: float, grounding: float = -1.0, loss: float = 0.1) -> dict:
    return {
        "loss": loss,
        "mismatch_kl": 0.1 * alpha,
        "top1_disagree": 0.2,
        "confidence": 0.6,
        "grounding": grounding,
    }


def test_reward_helpers_by_hand():
    assert learning_progress([3.0, 1.0], 0.9) == pytest.approx(2.0)
    assert learning_progress([1.0, 3.0, 2.0], 0.9) == pytest.approx(0.9)  # a rise earns nothing
    assert grounded([-1.0, -3.0], 0.5) == pytest.approx((-1.0 - 1.5) / 1.5)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_reward_kinds_by_hand(kind):
    cfg = controller_config(reward=kind)
    span = {"immediate": 1, "short": 2, "lp_only": 4, "full": 4}[kind]
    parts = decision_reward(cfg, SIGNAL[: span + 1], GROUNDING[:span])
    g_lp, g_gt, reward = EXPECTED[kind]
    assert parts.g_lp == pytest.approx(g_lp)
    assert parts.g_gt == (None if g_gt is None else pytest.approx(g_gt))
    assert parts.reward == pytest.approx(reward)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_controller_scores_with_the_documented_indices(kind):
    """ℓ_{t0} is the baseline probe NLL, ℓ_{t0+i} the probe after step t0+i-1, g_{t0+i} the
    grounding of step t0+i-1; the decision is scored once its hold window and span are done."""
    ctl = Controller(Config(algorithm=ATESD, controller=controller_config(reward=kind)), total_steps=10)
    span = {"immediate": 1, "short": 2, "lp_only": 4, "full": 4}[kind]
    ctl.baseline(0, {"probe_nll": SIGNAL[0]})
    for step in range(5):
        alpha = ctl.exposure(step)
        ctl.observe(
            step, step_stats(alpha, GROUNDING[step % 4]), {"probe_nll": SIGNAL[step + 1] if step < 4 else 2.0}
        )
        first = ctl.timeline()[0]
        assert (first["reward"] is not None) == (step + 1 >= max(2, span)), step
    g_lp, g_gt, reward = EXPECTED[kind]
    assert first["g_lp"] == pytest.approx(g_lp)
    assert first["reward"] == pytest.approx(reward)


def test_loss_signal_indices():
    """progress_signal=loss: ℓ_{t0+i} is the loss of step t0+i (on the weights after i updates)."""
    ctl = Controller(
        Config(algorithm=ATESD, controller=controller_config(reward="lp_only", progress_signal="loss")),
        total_steps=10,
    )
    for step in range(5):
        ctl.observe(step, step_stats(ctl.exposure(step), loss=SIGNAL[step]), {})
    assert ctl.timeline()[0]["reward"] == pytest.approx(G_LP)


def run_bandit(peak: float, steps: int, seed: int = 0) -> tuple[Controller, list[dict]]:
    """Each step's probe NLL falls by a learning progress that peaks at α = ``peak``."""
    cfg = Config(
        algorithm=ATESD,
        seed=seed,
        controller=ControllerConfig(kind="atesd", hold=1, lookahead=1, batch_decisions=4, reward="lp_only"),
    )
    ctl = Controller(cfg, total_steps=steps)
    noise = np.random.default_rng(seed + 1)
    nll = 10.0
    ctl.baseline(0, {"probe_nll": nll})
    for step in range(steps):
        alpha = ctl.exposure(step)
        nll -= max(0.0, 1.0 - ((alpha - peak) / 0.5) ** 2) + 0.05 * noise.standard_normal()
        ctl.observe(step, step_stats(alpha), {"probe_nll": nll})
    return ctl, ctl.timeline()


@pytest.mark.parametrize("peak", [0.5, 0.8])
def test_bandit_policy_finds_the_peak(peak):
    ctl, timeline = run_bandit(peak, steps=400)
    assert ctl.updates == 100
    a = np.array([d["a"] for d in timeline[-8:]])
    b = np.array([d["b"] for d in timeline[-8:]])
    mean = float((a / (a + b)).mean())
    std = float(np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))).mean())
    first_std = math.sqrt(1 / (4 * (2 * timeline[0]["a"] + 1)))  # Beta(a, a)
    print(
        f"bandit peak={peak}: {ctl.updates} updates, Beta mean {mean:.3f}, std {std:.3f} (from {first_std:.3f})"
    )
    assert abs(mean - peak) < 0.1
    assert std < first_std - 0.05  # it also concentrated


def test_entropy_penalty_is_one_sided():
    assert float(entropy_penalty(torch.tensor([-1.5, -3.0]), 0.01, -1.0)) == 0.0
    assert float(entropy_penalty(torch.tensor([-0.5, -3.0]), 0.01, -1.0)) == pytest.approx(0.01 * 0.25 / 2)
    policy = BetaPolicy(3, 8, torch.Generator().manual_seed(0))
    states, x = torch.randn(5, 3, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    adv = torch.zeros(5, dtype=torch.float64)
    loss, info = reinforce_loss(policy, states, x, adv, 0.01, entropy_target=10.0)  # entropy below target
    assert info["entropy"] < 10.0 and float(loss.detach()) == 0.0
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in policy.parameters())
    loss, info = reinforce_loss(policy, states, x, adv, 0.01, entropy_target=-10.0)
    assert float(loss.detach()) == pytest.approx(0.01 * (info["entropy"] + 10.0) ** 2, rel=0.05)


@pytest.mark.parametrize("kind", ["atesd", "random"])
def test_hold_window(kind):
    ctl = Controller(Config(algorithm=ATESD, controller=controller_config(kind=kind, hold=3)), total_steps=8)
    ctl.baseline(0, {"probe_nll": 5.0})
    alphas = []
    for step in range(8):
        alphas.append(ctl.exposure(step))
        assert ctl.exposure(step) == alphas[-1]  # asking again changes nothing
        ctl.observe(step, step_stats(alphas[-1]), {"probe_nll": 5.0 - 0.1 * step})
    assert (
        alphas[0] == alphas[1] == alphas[2] != alphas[3] == alphas[4] == alphas[5] != alphas[6] == alphas[7]
    )
    assert [(d["first_step"], d["last_step"]) for d in ctl.timeline()] == [(0, 2), (3, 5), (6, 7)]


def test_per_example_exposure_is_held_per_problem():
    ctl = Controller(
        Config(algorithm=ATESD, controller=controller_config(hold=2, granularity="example")), total_steps=4
    )
    first = ctl.exposure(0, ["p1", "p2"])
    second = ctl.exposure(1, ["p3", "p1"])
    assert second["p1"] == first["p1"] and len({first["p1"], first["p2"], second["p3"]}) == 3
    assert len(ctl.exposure(2, ["p1"])) == 1 and ctl.exposure(2, ["p1"])["p1"] != first["p1"]  # a new window
    with pytest.raises(ValueError, match="problem ids"):
        ctl.exposure(2)


def drive(controller: ExposureController, steps: range, per_example: bool) -> list:
    """Feed deterministic synthetic statistics; returns the exposures given."""
    out = []
    for step in steps:
        uids = [f"p{(step * 3 + i) % 7}" for i in range(3)]
        alpha = controller.exposure(step, uids)
        out.append(alpha)
        mean = float(np.mean(list(alpha.values()))) if per_example else alpha
        stats = step_stats(mean, grounding=-1.0 - mean)
        if per_example:
            stats["per_example"] = {
                u: {"reward": float(i % 2), "mismatch": 0.1 * i, "grounding": -a}
                for i, (u, a) in enumerate(alpha.items())
            }
        controller.observe(step, stats, {"probe_nll": 5.0 - 0.3 * step + 0.2 * math.sin(step * mean)})
    return out


@pytest.mark.parametrize("granularity", ["batch", "example"])
def test_save_mid_window_and_load_continue_identically(tmp_path, granularity):
    cfg = Config(
        algorithm=ATESD, seed=3, controller=controller_config(hold=3, lookahead=2, granularity=granularity)
    )
    per_example = granularity == "example"
    original = ExposureController(cfg, total_steps=30)
    original.baseline(0, {"probe_nll": 5.0})
    drive(original, range(0, 13), per_example)  # decisions at 0, 3, 6, 9, 12: mid-window at 13
    assert original.controller.updates >= 1
    original.save(str(tmp_path))
    restored = ExposureController(cfg, total_steps=30)
    assert restored.load(str(tmp_path))
    assert drive(restored, range(13, 30), per_example) == drive(original, range(13, 30), per_example)
    assert restored.timeline() == original.timeline()
    for p, q in zip(
        original.controller.strategy.policy.parameters(),
        restored.controller.strategy.policy.parameters(),
        strict=True,
    ):
        assert torch.equal(p, q)


def test_timeline_file_follows_the_decisions(tmp_path):
    path = tmp_path / "controller_timeline.jsonl"
    ctl = ExposureController(
        Config(algorithm=ATESD, controller=controller_config(hold=1, lookahead=1, reward="full")),
        6,
        str(path),
    )
    ctl.baseline(0, {"probe_nll": 5.0})
    ctl.exposure(0)
    assert len(path.read_text().splitlines()) == 1
    drive(ctl, range(0, 4), per_example=False)
    assert path.read_text().splitlines() == [__import__("json").dumps(e) for e in ctl.timeline()]
    assert sum(e["reward"] is not None for e in ctl.timeline()) == 4


def test_config_checks():
    with pytest.raises(ConfigError, match="granularity=example"):
        Config(algorithm=ATESD, controller=ControllerConfig(kind="linear", granularity="example"))
    with pytest.raises(ConfigError, match="data.probe_size"):
        Config(algorithm=ATESD, controller=ControllerConfig(kind="atesd"), data=DataConfig(probe_size=0))
    Config(
        algorithm=ATESD,
        controller=ControllerConfig(kind="atesd", progress_signal="loss"),
        data=DataConfig(probe_size=0),
    )
