"""algorithm=atesd end to end on local Ray with the tiny model: the controller actor's decisions,
rewards and updates reach controller_timeline.jsonl, the metrics and the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atesd_ray.modes.train import run
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

ATESD = [
    *TINY,
    "algorithm=atesd",
    "trainer.total_steps=6",
    "trainer.save_every=3",
    "controller.hold=1",
    "controller.lookahead=1",
    "controller.batch_decisions=2",
]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_atesd_run_records_scored_decisions(ray_cluster, tmp_path):
    run(make_config(*ATESD, f"run_dir={tmp_path}"), tmp_path)
    timeline = _jsonl(tmp_path / "controller_timeline.jsonl")
    metrics = _jsonl(tmp_path / "metrics.jsonl")
    for d in timeline:
        print(
            f"decision {d['decision']} steps {d['first_step']}-{d['last_step']}: alpha={d['alpha']:.3f} "
            f"a={d['a']:.3f} b={d['b']:.3f} G_lp={d['g_lp']} G_gt={d['g_gt']:.4f} R={d['reward']:.4f} "
            f"A={d['advantage']} probe_nll_ema={d['features']['probe_nll']:.4f}"
        )
    scored = [d for d in timeline if d["reward"] is not None]
    assert len(scored) >= 3
    assert [d["first_step"] for d in timeline] == list(range(6))  # hold 1: one decision per step
    for d, m in zip(timeline, metrics, strict=True):
        assert 0.1 <= d["alpha"] <= 1.0 and d["a"] > 1.0 and d["b"] > 1.0
        assert m["alpha"] == pytest.approx(d["alpha"])  # the teacher scored at the decision's α
        assert m["grounding"] < 0.0  # measured because the controller scores its decisions
        assert d["g_lp"] >= 0.0 and d["g_gt"] < 0.0  # progress is clipped at 0; g is a log-prob
        assert d["reward"] == pytest.approx(d["g_lp"] + 0.2 * d["g_gt"])
        assert d["advantage"] in (pytest.approx(-1.0), pytest.approx(1.0))  # z-scores of pairs
    assert metrics[-1]["controller/updates"] == 3
    # the policy moved: later decisions see other (a, b) than the initial 1 + softplus(0)
    assert timeline[-1]["a"] != pytest.approx(timeline[0]["a"])
    ckpt = tmp_path / "checkpoints" / "step_6"
    state = json.loads((ckpt / "controller.json").read_text())
    assert len(state["decisions"]) == 6
    tensors = torch.load(ckpt / "controller_policy.pt", weights_only=True)
    assert set(tensors) == {"policy", "optimizer"}


def test_per_example_exposure_run(ray_cluster, tmp_path):
    run(
        make_config(*ATESD, "trainer.total_steps=2", "controller.granularity=example", f"run_dir={tmp_path}"),
        tmp_path,
    )
    timeline = _jsonl(tmp_path / "controller_timeline.jsonl")
    metrics = _jsonl(tmp_path / "metrics.jsonl")
    assert len(timeline) == 2 and all(d["reward"] is not None for d in timeline)
    assert metrics[-1]["controller/updates"] == 1
    for d, m in zip(timeline, metrics, strict=True):
        examples = d["examples"]
        assert len(examples) == 4 and len({e["alpha"] for e in examples}) == 4  # one α per problem
        assert m["alpha"] == pytest.approx(sum(e["alpha"] for e in examples) / 4)
        for e in examples:
            assert e["grounding"] < 0.0
            assert e["reward"] == pytest.approx(d["g_lp"] + 0.2 * e["grounding"])
