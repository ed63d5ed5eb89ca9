"""Through real actors on a real local Ray cluster (tiny model): mode=eval, SFT, GRPO."""

from __future__ import annotations

import dataclasses
import json

import pytest
import ray
import torch

from atesd_ray import algorithms
from atesd_ray.algorithms import build_actors
from atesd_ray.algorithms.base import run_step
from atesd_ray.data.synthetic import generate
from atesd_ray.main import run_mode
from atesd_ray.models import load_model, load_tokenizer
from atesd_ray.runtime.checkpoint import fingerprint, read_student_weights
from atesd_ray.sequences import rows_to_lists
from tests.conftest import make_config

pytestmark = pytest.mark.ray

SMALL = (
    "model=tiny",
    "data.synthetic.n_train=4",
    "data.synthetic.n_eval=4",
    "data.probe_size=2",
    "tracking.backends=[jsonl]",
    "dashboard.enabled=false",
)


def test_eval_writes_samples_and_summary(ray_cluster, tmp_path):
    cfg = make_config(
        *SMALL, "mode=eval", "eval.samples=3", "eval.temperature=1.0", "eval.max_new_tokens=6",
        "eval.max_problems=3", "rollout.replicas=2", f"run_dir={tmp_path}",
    )  # fmt: skip
    summary = run_mode(cfg, tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "eval" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    assert {(r["id"], r["sample"]) for r in rows} == {
        (f"synth-1234-{i}", s) for i in range(3) for s in range(3)
    }
    assert all({"answer", "extracted", "correct", "response", "finish_reason", "set"} <= set(r) for r in rows)
    assert all(0 < len(r["response"]) and r["set"] == "synthetic" for r in rows)

    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    s = saved["sets"]["synthetic"]
    assert (s["n_problems"], s["n_samples"], s["k"]) == (3, 9, 3)
    assert s["avg@3"] == pytest.approx(sum(r["correct"] for r in rows) / 9)
    assert s["truncated_frac"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / 9)
    assert saved["checkpoint"] is None and saved["trained_by"] is None
    assert "avg@3" in (tmp_path / "eval" / "summary.md").read_text()


def test_sft_lowers_the_nll_and_its_checkpoint_serves_eval(ray_cluster, tmp_path):
    from workers.rollout import RolloutWorker

    run_dir = tmp_path / "sft"
    cfg = make_config(
        *SMALL, "algorithm=sft", "trainer.total_steps=4", "trainer.prompts_per_step=4", "trainer.micro_batch=2",
        "trainer.lr=3e-3", "trainer.grad_clip=1.0", "eval.every_n_steps=2", "eval.max_new_tokens=4",
        "eval.max_problems=2", f"run_dir={run_dir}",
    )  # fmt: skip
    run_mode(cfg, run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    probes = [m["probe_nll"] for m in metrics]
    # the same 4 problems every step: the NLL of their references falls step after step
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.3
    assert all(b < a for a, b in zip(probes, probes[1:], strict=False))
    assert [("eval/avg@1" in m) for m in metrics] == [False, True, False, True]  # periodic eval, logged

    # the checkpoint's tensors reach a rollout actor: the trained references become likelier
    records = [dataclasses.asdict(r) for r in generate(4, cfg.data.synthetic.seed, cfg.data.synthetic.levels)]
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, 0)
    prompts = ray.get(worker.prompt_ids.remote([r["problem"] for r in records]))
    tokenizer = load_tokenizer(cfg.model)
    ref_ids = [tokenizer(r["reference"], add_special_tokens=False)["input_ids"] for r in records]
    before = ray.get(worker.score_responses.remote(prompts, ref_ids))
    assert ray.get(worker.load_checkpoint.remote(str(run_dir / "checkpoints" / "step_4"))) == 4
    after = ray.get(worker.score_responses.remote(prompts, ref_ids))
    ray.kill(worker)
    assert _mean(after) > _mean(before) + 0.3

    # the check load_checkpoint runs: a checkpoint of another shape is refused, naming the tensors
    wider = dataclasses.replace(cfg.model, tiny=dataclasses.replace(cfg.model.tiny, hidden_size=32))
    trainable = dict(load_model(wider, vocab_size=len(tokenizer)).named_parameters())
    with pytest.raises(
        ValueError, match=r"shapes that differ: \['model.embed_tokens.weight: checkpoint \[\d+, 64\]"
    ):
        read_student_weights(run_dir / "checkpoints" / "step_4", fingerprint("tiny", False, trainable))

    eval_dir = tmp_path / "sft-eval"
    eval_cfg = make_config(
        *SMALL,
        "mode=eval",
        f"eval.model={run_dir}",
        "eval.max_new_tokens=4",
        "eval.max_problems=2",
        f"run_dir={eval_dir}",
    )
    summary = run_mode(eval_cfg, eval_dir)
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "step_4")
    assert summary["weight_version"] == 4
    assert summary["trained_by"] | {"run_dir": None} == {
        "step": 4, "algorithm": "sft", "alpha": 1.0, "controller": "fixed", "model": "tiny", "run_dir": None,
    }  # fmt: skip


def _mean(rows: list[list[float]]) -> float:
    return sum(map(sum, rows)) / sum(map(len, rows))


def test_grpo_moves_probability_to_the_rewarded_response(ray_cluster, tmp_path):
    cfg = make_config(
        *SMALL, "algorithm=grpo", "algorithm.grpo.n_samples=4", "algorithm.grpo.kl_coef=0.1",
        "rollout.max_new_tokens=6", "rollout.temperature=1.0", "trainer.prompts_per_step=1", "trainer.micro_batch=2",
        "trainer.lr=1e-2", "trainer.grad_clip=100", f"run_dir={tmp_path}",
    )  # fmt: skip
    records = [dataclasses.asdict(r) for r in generate(2, 7, [1])]
    actors = build_actors(cfg, 2, name="test-grpo")
    try:
        rollout = ray.get(actors.rollouts.actors[0].generate.remote(records[:1], 0, 0, 0))
        assert len(rollout) == 4 and len(set(rollout.non_tensor_batch["uid"])) == 1
        rollout.batch["reward"] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a hand-graded group
        rollout_ref = ray.put(rollout)
        reference = actors.teachers.actors[0].reference_logprobs.remote(rollout_ref, cfg.rollout.temperature)
        prompts = rows_to_lists(rollout.batch["prompt_ids"], rollout.batch["prompt_mask"])
        responses = rows_to_lists(rollout.batch["response_ids"], rollout.batch["response_mask"])
        student = actors.students.actors[0]
        before = [sum(lp) for lp in ray.get(student.score.remote(prompts, responses))]
        stats = actors.students.train_step(0, [rollout_ref], [reference]).get()
        after = [sum(lp) for lp in ray.get(student.score.remote(prompts, responses))]

        assert stats["zero_adv_frac"] == 0 and stats["accuracy"] == 0.25
        assert stats["kl_ref"] == pytest.approx(0, abs=1e-5)  # the student is still the step-0 model
        assert stats["clip_frac"] == 0 and stats["grad_norm"] > 0
        assert after[0] > before[0]  # advantage +1.5
        assert sum(after[1:]) < sum(before[1:])  # advantages -0.5 each

        # the driver's step: rollouts on the synced weights, reference pass, update, sync
        actors.weight_sync.sync(version=1).get()
        metrics, ahead = run_step(algorithms.get("grpo"), cfg, actors, 1, records[1:], None, None)
        assert ahead is None and metrics["weight_version"] == 2 and metrics["rollout_version"] == 1
        assert metrics["tokens"] > 0 and metrics["kl_ref"] > 0  # the student has moved off the reference
    finally:
        actors.shutdown()
