"""Delta syncs (``trainer.delta_sync``): a sync carries only the elements that changed since the last
one sent, and every receiver ends up with the same bits as after a full sync.

The encoding against hand-made tensors (bit patterns a float comparison would miss, a pair split
across two chunks, a receiver on another base); then real syncs on a real Ray cluster, over the object
store and the collective transport, into the HF rollout and a live teacher (parameters compared bit
for bit with the student's) and into a vLLM rollout (its record of the sync compared bit for bit, its
log-probs against the student's to 1e-4).
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray
import torch

from atesd_ray.config import ConfigError
from atesd_ray.runtime.weight_delta import BASE, INDEX, VALUES, DeltaEncoder, DeltaReader
from atesd_ray.runtime.weights import patch
from tests.conftest import TINY, make_config


def _apply(held: dict[str, torch.Tensor], chunks: list[dict[str, torch.Tensor]], version: int) -> None:
    """A receiver's side: whole tensors replace, pairs patch."""
    reader = DeltaReader(version)
    for chunk in chunks:
        whole, parts = reader.split(chunk)
        held.update({n: t.clone() for n, t in whole.items()})
        for name, (index, values) in parts.items():
            patch(held[name], index, values)
    reader.finish()


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a
    )


def test_a_delta_carries_the_changed_elements_and_lands_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    weights = {
        "embed": torch.randn(1000, 8, generator=g),
        "norm": torch.zeros(8),
        "proj": torch.randn(8, 8, generator=g),
    }
    encoder = DeltaEncoder()
    first = dict(encoder.encode(iter(weights.items()), version=1, full=False))  # nothing behind it: whole
    assert first.keys() == weights.keys()
    held = {n: t.clone() for n, t in first.items()}

    new = {n: t.clone() for n, t in weights.items()}
    new["embed"][3, 1] += 1.0
    new["embed"][999, 7] = float("nan")
    new["norm"][2] = -0.0  # equal as a float, another bit pattern: it must travel
    new["proj"] += 0.5  # every element changed: a delta would be larger than the tensor
    delta = dict(encoder.encode(iter(new.items()), version=2, full=False))
    assert list(delta) == [BASE, "embed" + INDEX, "embed" + VALUES, "norm" + INDEX, "norm" + VALUES, "proj"]
    assert delta["embed" + INDEX].tolist() == [25, 7999] and delta["embed" + INDEX].dtype == torch.int32
    _apply(held, [delta], version=1)
    assert _same_bits(held, new)

    # a pair cut by a chunk boundary (a bucket ends between positions and values)
    newer = {n: t.clone() for n, t in new.items()}
    newer["embed"][500] = 2.0
    delta = list(encoder.encode(iter(newer.items()), version=3, full=False))
    assert [n for n, _ in delta] == [BASE, "embed" + INDEX, "embed" + VALUES]
    _apply(held, [dict(delta[:2]), dict(delta[2:])], version=2)
    assert _same_bits(held, newer)

    # nothing changed: only the base travels; a full sync sends everything again
    assert [n for n, _ in encoder.encode(iter(newer.items()), version=4, full=False)] == [BASE]
    assert list(dict(encoder.encode(iter(newer.items()), version=5, full=True))) == list(newer)


def test_a_delta_against_other_weights_applies_nothing_and_an_interrupted_one_leaves_no_base():
    encoder = DeltaEncoder()
    weights = {"w": torch.zeros(100)}
    dict(encoder.encode(iter(weights.items()), version=1, full=True))
    weights["w"][0] = 1.0
    delta = dict(encoder.encode(iter(weights.items()), version=2, full=False))
    behind = DeltaReader(0)  # a receiver on other weights applies nothing of it and waits for a full sync
    assert behind.split(delta) == ({}, {}) and behind.behind
    assert behind.split({"w" + VALUES: delta["w" + VALUES]}) == ({}, {})
    behind.finish()
    reader = DeltaReader(1)
    reader.split({BASE: delta[BASE], "w" + INDEX: delta["w" + INDEX]})
    with pytest.raises(RuntimeError, match="positions of 'w' and no values"):
        reader.finish()

    stream = encoder.encode(iter(weights.items()), version=3, full=False)
    next(stream)  # the sender stops mid-sync (its actor died, the sync failed)
    assert encoder.version is None
    assert BASE not in dict(encoder.encode(iter(weights.items()), version=4, full=False))  # whole again


def test_the_config_refuses_delta_syncs_where_they_cannot_apply():
    with pytest.raises(ConfigError, match="trainer.delta_sync.*EMA teacher"):
        make_config(*TINY, "trainer.delta_sync=true", "teacher.weights=ema")
    with pytest.raises(ConfigError, match="trainer.delta_sync.*cuda_ipc"):
        make_config(
            *TINY,
            "trainer.delta_sync=true",
            "trainer.weight_transport=cuda_ipc",
            "cluster.colocate_rollout=true",
            "cluster.student.gpus=0.5",
            "cluster.rollout.gpus=0.5",
        )


def _student_weights(sender, fmt):
    return {n: t.clone() for n, t in sender.weight_stream(fmt, torch.device("cpu"))}


def _rollout_weights(worker):
    return {n: p.detach().clone() for n, p in worker.engine.model.named_parameters()}


def _teacher_weights(worker):
    return {n: p.detach().clone() for n, p in worker.model.named_parameters() if p.requires_grad}


def _last_sync(sender):
    return sender.delta.last


def _vllm_record(worker):
    return {n: t.clone() for n, t in worker.engine.synced.items()}


def _vllm_loads(worker) -> int:
    return worker.engine.loads


def _train(actors, records, step: int, poisoned: bool = False) -> None:
    """One step; ``poisoned``: a NaN in the teacher's targets, so the numeric guard skips the update
    (the weights stay, the version advances)."""
    from atesd_ray.algorithms.base import launch_rollouts

    rollouts = launch_rollouts(actors, records, step, min_version=step)
    scored = [actors.teachers.actors[0].score.remote(r, 1.0) for r in rollouts]
    if poisoned:
        batches = ray.get(scored)
        for batch in batches:
            batch.batch["teacher_logprobs"][0, 0] = float("nan")
        scored = [ray.put(batch) for batch in batches]
    stats = actors.students.train_step(step, rollouts, scored).get()
    assert stats["update_skipped"] == int(poisoned)


@pytest.mark.ray
def test_delta_syncs_leave_the_hf_rollout_and_a_live_teacher_bit_for_bit_the_student(ray_cluster):
    """bf16 syncs 0-5 over the object store with ``full_sync_every=3`` (full, delta, delta, full,
    delta; a sync of v2 and one of v3 before the student holds them are refused: the delta is not
    sent again whole, and the full sync planned comes with v3 itself), the teacher then killed and
    restarted by Ray (it holds v0) so that v5's delta does not fit it and v5 goes again whole; then a new collective transport in 64 KiB buckets (full after its
    setup, then a delta). After each sync the rollout's and the teacher's parameters equal the
    student's bit for bit, and each delta carries under half of the bytes (13-22% in the runs here)."""
    from atesd_ray.algorithms import build_actors
    from atesd_ray.data.synthetic import generate
    from atesd_ray.runtime.weight_sync.collective import CollectiveSync

    cfg = make_config(
        *TINY,
        "model.dtype=bfloat16",
        "teacher.weights=live",
        "trainer.delta_sync=true",
        "trainer.full_sync_every=3",
    )
    actors = build_actors(cfg, total_steps=8, name="test-delta-hf")
    try:
        records = [dataclasses.asdict(r) for r in generate(2, seed=5)]
        collective = CollectiveSync(
            actors.students,
            actors.rollouts.actors + actors.teachers.actors,
            "gloo",
            1 << 16,
            full_sync_every=3,
        )
        syncs = [actors.weight_sync] * 6 + [collective] * 2
        sent = [_sync_and_compare(actors, actors.weight_sync, 0)]
        for version, sync in enumerate(syncs[1:], start=1):
            if version in (2, 3):  # rank 0 holds the version before: refused, nothing moves
                assert actors.weight_sync.sync(version).get() == [version - 1] * 2
            _train(actors, records, version - 1)
            if version == 5:
                teacher = actors.teachers.actors[0]
                ray.kill(teacher, no_restart=False)
                _wait_for_restart(teacher)
            if sync is collective and collective.full_at is None:
                collective.setup()
            sent.append(_sync_and_compare(actors, sync, version))
        collective.teardown()
        modes = ["full", "delta", "delta", "full", "delta", "full", "full", "delta"]
        assert [s["mode"] for s in sent] == modes
        whole = sent[0]["whole"]
        assert all(s["whole"] == whole and (s["sent"] == whole) == (s["mode"] == "full") for s in sent), sent
        assert max(s["sent"] for s in sent if s["mode"] == "delta") < 0.5 * whole, sent
    finally:
        actors.shutdown()


def _wait_for_restart(actor, seconds: float = 120.0) -> None:
    """Until Ray has restarted ``actor`` and it answers, holding v0 (``ray.kill`` returns before
    the old process is gone, so a call may still reach it, or fail as the actor restarts)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ray.get(actor.get_weight_version.remote(), timeout=10) == 0:
                return
        except ray.exceptions.RayError:
            pass
        assert time.monotonic() < deadline, "the killed actor was not restarted"
        time.sleep(1)


def _sync_and_compare(actors, sync, version) -> dict:
    """Sync ``version``; the receivers must hold the student's weights bit for bit. What was sent."""
    student = actors.students.actors[0]
    sync.sync(version).get()
    want = ray.get(student.weight_transfer.remote(_student_weights, "trainable"))
    rollout, teacher = actors.rollouts.actors[0], actors.teachers.actors[0]
    assert _same_bits(ray.get(rollout.weight_transfer.remote(_rollout_weights)), want), version
    assert _same_bits(ray.get(teacher.weight_transfer.remote(_teacher_weights)), want), version
    assert all(g is not None and g < 1e-6 for g in ray.get(sync.verify()))
    return ray.get(student.weight_transfer.remote(_last_sync))


PROMPTS, RESPONSES = [[1, 2, 3, 4, 5, 6], [7, 8, 9]], [[10, 11, 12, 13], [14, 15]]


def _delta_then_full(actors, sync, version: int) -> tuple[list, list]:
    """The rollout's scores of fixed responses after a delta sync of ``version``, then after the same
    version sent whole; its record of the sync must equal the student's merged weights bit for bit."""
    student, rollout = actors.students.actors[0], actors.rollouts.actors[0]
    sync.sync(version).get()
    assert ray.get(student.weight_transfer.remote(_last_sync))["mode"] == "delta"
    want = ray.get(student.weight_transfer.remote(_student_weights, "merged"))
    assert _same_bits(ray.get(rollout.weight_transfer.remote(_vllm_record)), want)
    after_delta = ray.get(rollout.score_responses.remote(PROMPTS, RESPONSES))
    ray.get(rollout.rewind_version.remote(version - 1))
    sync.send(version, student.holds_version.remote(version), "full").get()
    return after_delta, ray.get(rollout.score_responses.remote(PROMPTS, RESPONSES))


@pytest.mark.ray
@pytest.mark.vllm
def test_a_delta_sync_leaves_vllm_as_a_full_sync_would(ray_cluster):
    """bf16 weights into a vLLM rollout: a delta over the object store, and one over the collective
    transport one tensor per bucket (every pair of positions and values split by a boundary). After
    each, the engine's record of the sync is the student's merged weights bit for bit, and its
    log-probs equal those after the same version sent whole, exactly. Between them, an update the
    numeric guard skipped: its delta changes nothing, and nothing is loaded into vLLM."""
    from atesd_ray.algorithms import build_actors
    from atesd_ray.data.synthetic import generate
    from atesd_ray.runtime.weight_sync.collective import CollectiveSync

    cfg = make_config(
        *TINY, "model.dtype=bfloat16", "rollout.engine=vllm", "trainer.delta_sync=true", "trainer.lr=1e-3"
    )
    actors = build_actors(cfg, total_steps=6, name="test-delta-vllm")
    try:
        records = [dataclasses.asdict(r) for r in generate(2, seed=5)]
        actors.weight_sync.sync(0).get()
        _train(actors, records, 0)
        after_delta, after_full = _delta_then_full(actors, actors.weight_sync, 1)
        assert after_delta == after_full

        student, rollout = actors.students.actors[0], actors.rollouts.actors[0]
        loads = ray.get(rollout.weight_transfer.remote(_vllm_loads))
        _train(actors, records, 1, poisoned=True)
        assert actors.weight_sync.sync(2).get() == [2]
        assert ray.get(student.weight_transfer.remote(_last_sync))["changed"] == 0
        assert ray.get(rollout.weight_transfer.remote(_vllm_loads)) == loads
        assert ray.get(rollout.score_responses.remote(PROMPTS, RESPONSES)) == after_full

        collective = CollectiveSync(actors.students, actors.rollouts.actors, "gloo", 1, full_sync_every=10)
        collective.setup()
        try:
            _train(actors, records, 2)
            collective.sync(3).get()  # the first after setup: full
            _train(actors, records, 3)
            after_delta, after_full = _delta_then_full(actors, collective, 4)
            assert after_delta == after_full
        finally:
            collective.teardown()
    finally:
        actors.shutdown()
