"""The loss and the gradient do not depend on how a step's rows are cut: micro-batches of 1 or 4
rows on one student rank, or two ranks, give one step the same loss and the same gradient norm,
for the distillation, SFT, GRPO and MOTAB objectives. (verl shipped a bug where micro-batch 1 gave an
8x larger loss: a mean of per-micro-batch means is not the batch's mean when rows differ in length.)

The rows differ in length on purpose: responses are cut to 3..12 tokens, so a normalizer taken per
micro-batch instead of over the whole batch would show."""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from atesd_ray import algorithms
from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import launch_rollouts
from atesd_ray.data.synthetic import generate
from atesd_ray.runtime.cluster import ActorGroup
from atesd_ray.sampling import SamplingParams
from tests.conftest import TINY, make_config
from workers.student import StudentRank

pytestmark = pytest.mark.ray

RECORDS = [dataclasses.asdict(r) for r in generate(4, seed=5)]
# (student ranks, micro-batch rows); the first is the reference. The extremes: a normalizer taken
# per micro-batch or per rank is off at micro-batch 1 and at two ranks if it is off at all
CUTS = [(1, 4), (1, 1), (2, 1)]
BASE = [*TINY, "trainer.prompts_per_step=4", "trainer.grad_clip=1e6"]


def _vary_lengths(batch, seed: int):
    """Cut each response to its own length (3..12 tokens), as the rows of a real batch differ."""
    g = torch.Generator().manual_seed(seed)
    mask = batch.batch["response_mask"]
    for i in range(mask.shape[0]):
        keep = int(torch.randint(3, mask.shape[1] + 1, (1,), generator=g))
        mask[i, keep:] = 0
    return batch


@pytest.fixture(scope="module")
def inputs(ray_cluster):
    """One step's inputs for each objective, from the tiny model's real rollout and teacher actors."""
    cfg = make_config(*BASE)
    actors = build_actors(cfg, total_steps=2, name="test-invariance")
    try:
        plain = ray.get(launch_rollouts(actors, RECORDS, step=0, min_version=0))
        plain = [_vary_lengths(b, seed=i) for i, b in enumerate(plain)]
        rollouts = [ray.put(b) for b in plain]
        scored = actors.teachers.score(rollouts, 1.0)
        # GRPO: two samples a prompt, rewards that differ within each group
        grouped = ray.get(actors.rollouts.generate(0, RECORDS, 1, 0, SamplingParams(1.0, 1.0, 0, 12, n=2)))
        grouped = _vary_lengths(grouped, seed=9)
        grouped.batch["reward"] = torch.tensor([1.0, 0.0] * len(RECORDS))
        # MOTAB: the distillation rows split into a student prefix (distilled) and a teacher suffix (NLL)
        motab = []
        for b in plain:
            valid = b.batch["response_mask"].bool()
            first = torch.zeros_like(valid)
            first[:, :3] = True
            b.batch["distill_mask"] = (valid & first).long()
            b.batch["nll_mask"] = (valid & ~first).long()
            motab.append(ray.put(b))
        yield {
            "opsd": (rollouts, scored),
            "sft": (ray.put(RECORDS),),
            "grpo": ([ray.put(grouped)], None),
            "motab": (motab, actors.teachers.score(motab, 1.0)),
        }
    finally:
        actors.shutdown()


def _step(name: str, ranks: int, micro_batch: int, inputs: tuple) -> dict:
    extra = {"grpo": ["algorithm=grpo", "algorithm.grpo.n_samples=2", "rollout.n_samples=2"]}.get(
        name, [f"algorithm={name}"]
    )
    cfg = make_config(*BASE, *extra, f"trainer.ranks={ranks}", f"trainer.micro_batch={micro_batch}")
    objective = algorithms.get(name).objective(cfg, frozenset())
    group = ActorGroup(
        StudentRank,
        ranks,
        cfg.cluster.student,
        "PACK",
        f"test-cut-{name}-{ranks}-{micro_batch}",
        lambda i: ((cfg, i, ranks, objective), {}),
    )
    try:
        address, port = ray.get(group.actors[0].master_address.remote())
        ray.get(group.call("init_distributed", address, port))
        return group.together("train_step", 0, *inputs).get()
    finally:
        group.shutdown()


@pytest.mark.parametrize("name", ["opsd", "sft", "grpo", "motab"])
def test_loss_and_gradient_are_the_same_however_the_rows_are_cut(inputs, name):
    seen = {cut: _step(name, *cut, inputs[name]) for cut in CUTS}
    reference = seen[CUTS[0]]
    assert reference["loss"] != 0 and reference["grad_norm"] > 0
    for cut, metrics in seen.items():
        # float32 noise from other padding and summation orders is ~1e-5 relative at most here; a
        # normalizer taken per micro-batch or per rank would be off by a factor
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-7), (name, cut)
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), (name, cut)
