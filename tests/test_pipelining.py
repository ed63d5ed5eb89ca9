"""One-step-off pipelining (``rollout.max_staleness=1``): the rollouts of step t+1 are generated while
the student trains on step t, on the weights of version t.

What "exact" means with staleness 1: a run is a function of its seed and config, and a run that is
resumed, or rolled back after an actor died for good, trains on the very rollouts the uninterrupted
run trained on (a checkpoint holds the rollouts generated ahead for the next step, since the weights
that generated them are gone once the student has updated), so it equals that run step for step.
After a rollout or teacher replica is restarted inside a step, the step's rollouts are generated again
on the current weights: the same problems and seeds, none lost or repeated, with staleness 0 at that
step, as logged; its samples then differ from the uninterrupted run's."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import ray
import torch

from atesd_ray.data.sampler import EpochSampler
from atesd_ray.data.synthetic import generate
from atesd_ray.runtime.actors import build_actors
from atesd_ray.runtime.checkpoint import PREFETCHED, read_state
from atesd_ray.soak import FaultInjector, differences, metrics
from atesd_ray.train import prepare_data, run
from tests.conftest import TINY, make_config
from workers.common import StaleWeightsError

pytestmark = pytest.mark.ray

PIPELINED = [
    *TINY,
    "rollout.max_staleness=1",
    "trainer.total_steps=4",
    "trainer.save_every=1",
    "trainer.keep_last=4",
    "trainer.save_hf=false",
    "trainer.lr=1e-3",  # updates that move the metrics, so that rollouts on other weights would show
]


@pytest.fixture(scope="module")
def pipelined(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipelined") / "run"
    run(make_config(*PIPELINED, f"run_dir={out}"), out)
    return out


def test_rollouts_run_one_step_behind_and_the_metrics_say_so(pipelined):
    logged = metrics(pipelined)
    assert [m["step"] for m in logged] == [0, 1, 2, 3]
    assert [m["rollout_version"] for m in logged] == [0, 0, 1, 2]  # step t+1 on the weights of t
    assert [m["staleness"] for m in logged] == [0, 1, 1, 1]
    checkpoints = pipelined / "checkpoints"
    assert [(checkpoints / f"step_{n}" / PREFETCHED).exists() for n in (1, 2, 3, 4)] == [True] * 3 + [False]


def test_a_checkpoint_holds_the_next_steps_rollouts_for_the_problems_it_gave_back(pipelined):
    """The batch generated ahead is given back to the sampler at a checkpoint; the rollouts held are
    those of exactly the problems a resume draws next."""
    cfg = make_config(*PIPELINED)
    train = prepare_data(cfg).train
    for n in (1, 2, 3):
        checkpoint = pipelined / "checkpoints" / f"step_{n}"
        sampler = EpochSampler(len(train), cfg.trainer.prompts_per_step, cfg.seed, cfg.data.shuffle)
        sampler.consumed = read_state(checkpoint)["consumed"]
        drawn = [train[i]["id"] for i in sampler.next_indices()]
        held = torch.load(checkpoint / PREFETCHED, weights_only=False)
        assert sorted({u for r in held for u in r.non_tensor_batch["uid"]}) == sorted(drawn)
        assert {r.meta_info["weight_version"] for r in held} == {n - 1} and {
            r.meta_info["step"] for r in held
        } == {n}


def test_a_resume_with_rollouts_in_flight_equals_the_uninterrupted_run(pipelined, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(pipelined, run_dir)
    for n in (3, 4):  # killed after the checkpoint of step 2, with step 2's rollouts generated
        shutil.rmtree(run_dir / "checkpoints" / f"step_{n}")
    summary = run(make_config(*PIPELINED, f"run_dir={run_dir}"), run_dir)
    assert summary["start_step"] == 2
    resumed = metrics(run_dir)
    assert [m["staleness"] for m in resumed] == [0, 1, 1, 1]
    assert differences(metrics(pipelined), resumed) == []


def test_a_dead_student_rolls_back_to_the_held_rollouts_and_equals_the_uninterrupted_run(pipelined, tmp_path):
    out = tmp_path / "rolled-back"
    with FaultInjector(out, [(2, "student", "ray.kill")]) as injector:
        summary = run(make_config(*PIPELINED, f"run_dir={out}"), out)
    assert not injector.errors and [k["role"] for k in injector.killed] == ["student"]
    assert summary["rollbacks"] == 1
    assert differences(metrics(pipelined), metrics(out)) == []


def test_weights_older_than_allowed_are_refused_with_the_versions_named(ray_cluster):
    """A sync tagged with a version the student does not hold moves nothing, and a rollout asked for
    newer weights than it holds refuses, naming both versions (the step fails with that error)."""
    cfg = make_config(*TINY)
    actors = build_actors(cfg, total_steps=2, name="test-stale-weights")
    try:
        rollout = actors.rollouts.actors[0]
        ray.get(actors.weight_sync.sync(version=0))
        ray.get(actors.weight_sync.sync(version=3))  # the student has made 0 updates: refused
        assert ray.get(rollout.get_weight_version.remote()) == 0
        records = [dataclasses.asdict(r) for r in generate(2, seed=3)]
        with pytest.raises(StaleWeightsError, match=r"rollout 0 holds weights v0, step 1 needs >= v1"):
            ray.get(rollout.generate.remote(records, 1, 0, 1))
    finally:
        actors.shutdown()


def test_staleness_is_checked_before_any_actor_starts():
    from atesd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        make_config(*TINY, "rollout.max_staleness=2")
