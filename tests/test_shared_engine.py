"""One engine serves the student and its self-teacher (``teacher.engine=rollout``): the rollout actor
holds the base weights once with the LoRA adapter, a sync moves the adapter alone, and the teacher
scores on that network with the adapter off (frozen) or on (live). Exercised on the real
RolloutWorker and TeacherWorker classes with the tiny model (no Ray), then two steps on a cluster."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from verl import DataProto

from atesd_ray.config import ConfigError
from atesd_ray.data.synthetic import generate
from atesd_ray.runtime.weight_sync import object_store
from atesd_ray.runtime.weights import pack
from tests.conftest import TINY, make_config

LORA = [*TINY, "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16", "teacher.topk=8"]
SHARED = [*LORA, "teacher.engine=rollout"]


def test_the_config_says_when_one_engine_can_serve_both() -> None:
    make_config(*SHARED)
    make_config(*TINY, "teacher.engine=rollout", "teacher.weights=live")  # live needs no adapter
    with pytest.raises(ConfigError, match=r"'teacher.engine': .*needs model.lora.enabled=true"):
        make_config(*TINY, "teacher.engine=rollout")
    with pytest.raises(ConfigError, match=r"'teacher.engine': .*unless rollout.vllm.lora=adapter"):
        make_config(*SHARED, "rollout.engine=vllm")
    with pytest.raises(ConfigError, match=r"'teacher.engine': .*frozen or live \(got ema\)"):
        make_config(*SHARED, "teacher.weights=ema")


def _adapter(worker, seed: int) -> dict[str, torch.Tensor]:
    """A trained-looking adapter: the trainable (LoRA) tensors, every one moved."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
        for n, p in worker.engine.model.named_parameters()
        if p.requires_grad
    }


def _rollout(worker, cfg) -> DataProto:
    records = [dataclasses.asdict(r) for r in generate(3, seed=2)]
    return worker.generate(records, step=0, chunk=0, min_version=0)


@pytest.mark.parametrize("weights", ["frozen", "live"])
def test_the_rollout_engine_scores_as_the_teacher(weights) -> None:
    """After an adapter sync, the rollout's sampled log-probs equal a student network holding the
    same adapter, and the teacher's targets on the same engine equal those of a teacher actor of its
    own: the step-0 network (frozen), or the synced one (live)."""
    from workers.rollout import RolloutWorker
    from workers.teacher import TeacherWorker

    cfg = make_config(
        *SHARED, f"teacher.weights={weights}", "rollout.temperature=1.0", "algorithm.loss.temperature=1.0"
    )
    worker = RolloutWorker(cfg)
    adapter = _adapter(worker, seed=1)
    assert set(adapter) and all("lora_" in n for n in adapter)  # the sync carries the adapter alone
    assert worker.weight_transfer(object_store.receive, pack(adapter), 1) == 1
    rollout = _rollout(worker, cfg)

    own = TeacherWorker(make_config(*LORA, f"teacher.weights={weights}", "algorithm.loss.temperature=1.0"))
    if weights == "live":
        assert own.weight_transfer(object_store.receive, pack(adapter), 1) == 1
    shared, alone = worker.score(rollout, 1.0), own.score(rollout, 1.0)
    valid = rollout.batch["response_mask"].bool()
    for key in ("teacher_logprobs", "teacher_sampled_logprob", "teacher_tail"):
        torch.testing.assert_close(shared.batch[key][valid], alone.batch[key][valid], atol=1e-4, rtol=0)
    assert torch.equal(shared.batch["teacher_ids"][valid], alone.batch["teacher_ids"][valid])

    # the rollout's own log-probs of what it sampled: the student's network with the adapter on
    from atesd_ray.sequences import response_logprobs, rows_to_lists, token_logprobs

    student = TeacherWorker(make_config(*LORA, "teacher.weights=live"))
    student.weight_transfer(object_store.receive, pack(adapter), 1)
    b = rollout.batch
    with torch.no_grad():
        logp, ids, _ = response_logprobs(
            student.model,
            rows_to_lists(b["prompt_ids"], b["prompt_mask"]),
            rows_to_lists(b["response_ids"], b["response_mask"]),
            worker.tokenizer.pad_token_id,
            1.0,
            b["response_ids"].shape[1],
        )
    reference = token_logprobs(logp, ids)
    torch.testing.assert_close(b["rollout_logprobs"][valid], reference[valid], atol=1e-4, rtol=0)
    if weights == "frozen":  # the adapter moved the student away from its frozen teacher
        gap = (shared.batch["teacher_sampled_logprob"] - reference)[valid].abs().max()
        assert gap > 1e-3


@pytest.mark.ray
def test_two_steps_with_one_engine(ray_cluster, tmp_path) -> None:
    """ATESD with the teacher on the rollout engine: no teacher actor of its own, the teacher's
    placement is the rollout's, and the student trains."""
    from atesd_ray.modes.train import run

    cfg = make_config(*SHARED, "algorithm=atesd", f"run_dir={tmp_path}")
    run(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 for m in lines)
    topology = json.loads((tmp_path / "topology.json").read_text())
    assert topology["teacher"] == topology["rollout"]  # the same actors, in the same bundles
