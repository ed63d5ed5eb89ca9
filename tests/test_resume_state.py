"""State a resume and a rollback must carry besides the student: the rollouts generated one step
off, an EMA teacher's weights and the LR schedule (linear warm-up, then cosine decay). One run with
all three (``rollout.max_staleness=1``, ``teacher.weights=ema``, ``trainer.lr_schedule=cosine``) is
compared with itself resumed, and with itself rolled back after a student rank and the EMA teacher
die: every step's metrics and lr, and the EMA weights of the final checkpoint.

What "exact" means with staleness 1: the rollouts of step t+1 are generated while the student trains
on step t, on the weights of version t. A run is a function of its seed and config, and a run that is
resumed, or rolled back after an actor died for good, trains on the very rollouts the uninterrupted
run trained on (a checkpoint holds the rollouts generated ahead for the next step, since the weights
that generated them are gone once the student has updated), so it equals that run step for step.
After a rollout or teacher replica is restarted inside a step, the step's rollouts are generated again
on the current weights: the same problems and seeds, none lost or repeated, with staleness 0 at that
step, as logged; its samples then differ from the uninterrupted run's."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file

from atesd_ray.algorithms import build_actors
from atesd_ray.config import ConfigError
from atesd_ray.data.sampler import EpochSampler
from atesd_ray.data.synthetic import generate
from atesd_ray.job import prepare_data
from atesd_ray.modes.train import run
from atesd_ray.runtime.checkpoint import PREFETCHED, load_rollouts, read_state
from atesd_ray.runtime.weight_sync import StaleWeightsError
from atesd_ray.soak import FaultInjector, differences, metrics
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

STATEFUL = [
    *TINY,
    "rollout.max_staleness=1",
    "teacher.weights=ema",
    "teacher.ema_decay=0.5",
    "trainer.lr=1e-3",  # updates that move the metrics, so that other weights or rollouts would show
    "trainer.lr_schedule=cosine",
    "trainer.warmup_steps=2",
    "trainer.min_lr_ratio=0.1",
    "trainer.total_steps=5",
    "trainer.save_every=1",
    "trainer.keep_last=5",
    "trainer.save_hf=false",
]


@pytest.fixture(scope="module")
def straight(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("stateful") / "straight"
    run(make_config(*STATEFUL, f"run_dir={out}"), out)
    return out


def _assert_same_run(reference, other) -> None:
    a, b = metrics(reference), metrics(other)
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    assert [m["lr"] for m in b] == pytest.approx([m["lr"] for m in a], rel=1e-12)
    assert differences(a, b) == []
    ema_a, ema_b = (
        load_file(str(d / "checkpoints" / "step_5" / "teacher_ema.safetensors")) for d in (reference, other)
    )
    assert ema_a.keys() == ema_b.keys()
    for name in ema_a:
        torch.testing.assert_close(ema_a[name], ema_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rollouts_run_one_step_behind_and_the_metrics_say_so(straight):
    logged = metrics(straight)
    assert [m["rollout_version"] for m in logged] == [0, 0, 1, 2, 3]  # step t+1 on the weights of t
    assert [m["staleness"] for m in logged] == [0, 1, 1, 1, 1]
    checkpoints = straight / "checkpoints"
    assert [(checkpoints / f"step_{n}" / PREFETCHED).exists() for n in range(1, 6)] == [True] * 4 + [False]


def test_the_schedule_warms_up_then_decays(straight):
    """Linear warm-up over 2 steps, then cosine from 1e-3 towards 0.1 x 1e-3 over the other 3."""
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    expected = [1e-3 * f for f in (0.5, 1.0, *cosine)]
    assert [m["lr"] for m in metrics(straight)] == pytest.approx(expected, rel=1e-9)


def test_a_checkpoint_holds_the_next_steps_rollouts_for_the_problems_it_gave_back(straight):
    """The batch generated ahead is given back to the sampler at a checkpoint; the rollouts held are
    those of exactly the problems a resume draws next, made by the weights one step old."""
    cfg = make_config(*STATEFUL)
    train = prepare_data(cfg).train
    for n in range(1, 5):
        checkpoint = straight / "checkpoints" / f"step_{n}"
        sampler = EpochSampler(len(train), cfg.trainer.prompts_per_step, cfg.seed, cfg.data.shuffle)
        sampler.consumed = read_state(checkpoint)["consumed"]
        drawn = [train[i]["id"] for i in sampler.next_indices()]
        held = load_rollouts(checkpoint / PREFETCHED)
        assert sorted({u for r in held for u in r.non_tensor_batch["uid"]}) == sorted(drawn)
        assert {r.meta_info["weight_version"] for r in held} == {n - 1}
        assert {r.meta_info["step"] for r in held} == {n}


def test_a_resume_with_rollouts_in_flight_equals_the_uninterrupted_run(straight, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(straight, run_dir)
    for n in (3, 4, 5):  # stopped after the checkpoint of step 2, with step 2's rollouts generated
        shutil.rmtree(run_dir / "checkpoints" / f"step_{n}")
    assert run(make_config(*STATEFUL, f"run_dir={run_dir}"), run_dir)["start_step"] == 2
    _assert_same_run(straight, run_dir)


def test_a_dead_student_and_a_dead_ema_teacher_roll_back_and_equal_the_uninterrupted_run(straight, tmp_path):
    """Neither can come back mid-run (an EMA teacher cannot be rebuilt from the student): each time
    the run rolls back to its last checkpoint, which restores the EMA weights, the schedule and the
    rollouts generated ahead, and goes on as if nothing had happened."""
    out = tmp_path / "rolled-back"
    with FaultInjector(out, [(2, "student", "ray.kill"), (4, "teacher", "sigkill")]) as injector:
        summary = run(make_config(*STATEFUL, f"run_dir={out}"), out)
    assert not injector.errors and [k["role"] for k in injector.killed] == ["student", "teacher"]
    assert summary["rollbacks"] == 2
    _assert_same_run(straight, out)


def test_weights_older_than_allowed_are_refused_with_the_versions_named(ray_cluster):
    """A sync tagged with a version the student does not hold moves nothing, and a rollout asked for
    newer weights than it holds refuses, naming both versions (the step fails with that error)."""
    actors = build_actors(make_config(*TINY), total_steps=2, name="test-stale-weights")
    try:
        rollout = actors.rollouts.actors[0]
        actors.weight_sync.sync(version=0).get()
        actors.weight_sync.sync(version=3).get()  # the student has made 0 updates: refused
        assert ray.get(rollout.get_weight_version.remote()) == 0
        records = [dataclasses.asdict(r) for r in generate(2, seed=3)]
        with pytest.raises(StaleWeightsError, match=r"rollout 0 holds weights v0, step 1 needs >= v1"):
            ray.get(rollout.generate.remote(records, 1, 0, 1))
    finally:
        actors.shutdown()


def test_more_staleness_than_one_step_is_refused_before_any_actor_starts():
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        make_config(*TINY, "rollout.max_staleness=2")
