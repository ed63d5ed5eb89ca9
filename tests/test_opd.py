"""OPD (``algorithm=opd``, added as one module and one YAML file): on-policy distillation from a
separate teacher model. The tiny Qwen3 student has one layer; its teacher is the tiny preset, two
layers, another network of the same tokenizer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from verl import DataProto

from atesd_ray.config import ConfigError, model_preset
from atesd_ray.data.synthetic import generate
from atesd_ray.models import load_model
from atesd_ray.modes.train import run
from atesd_ray.prompts import encode_chat, student_messages
from atesd_ray.sequences import join, left_pad, response_slice, right_pad
from tests.conftest import TINY, make_config

OPD = [*TINY, "model.tiny.num_hidden_layers=1", "algorithm=opd", "teacher.model=tiny", "teacher.topk=16"]


def test_the_config_names_what_opd_needs():
    cfg = make_config(*OPD)
    assert cfg.algorithm.name == "opd" and cfg.teacher.model == "tiny" and cfg.controller.kind == "fixed"
    with pytest.raises(ConfigError, match="^config error at 'teacher.model': algorithm=opd distills"):
        make_config(*TINY, "algorithm=opd")
    with pytest.raises(ConfigError, match="'teacher.model': tiny is the student"):
        make_config(*TINY, "algorithm=opd", "teacher.model=tiny")
    with pytest.raises(ConfigError, match="'controller.kind'"):
        make_config(*OPD, "algorithm.alpha=0.5", "controller.kind=atesd")
    with pytest.raises(ConfigError, match="'teacher.weights'"):
        make_config(*OPD, "teacher.weights=live")


def test_the_teacher_is_the_separate_model_reading_the_students_prompt():
    """The teacher's top-k equal a direct forward of the teacher preset over the student's own
    problem-only prompt and response: no reference, no exposure."""
    from workers.teacher import TeacherWorker

    cfg = make_config(*OPD, "algorithm.loss.temperature=1.0")
    teacher = TeacherWorker(cfg, 0)
    assert not teacher.privileged and teacher.model.config.num_hidden_layers == 2
    tok = teacher.tokenizer
    records = [dataclasses.asdict(r) for r in generate(2, seed=3)]
    prompts = [encode_chat(tok, student_messages(r["problem"], cfg.prompts), False) for r in records]
    responses = [[11, 12, 13, 14], [21, 22]]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    r_ids, r_mask = right_pad(responses, tok.pad_token_id)
    rollout = DataProto.from_dict(
        tensors={"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask},
        non_tensors={
            k: np.array([r[k] for r in records], dtype=object) for k in ("problem", "reference", "answer")
        }
        | {"uid": np.array([r["id"] for r in records], dtype=object)},
    )
    scored = teacher.score(rollout, 1.0)

    reference = load_model(model_preset("tiny"), vocab_size=len(tok)).eval()
    ids, mask, pos, start = join(p_ids, p_mask, r_ids, r_mask)
    with torch.no_grad():
        logits = response_slice(
            reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits, start, 4
        )
    top = torch.log_softmax(logits.float(), -1).topk(16)
    valid = r_mask.bool()
    assert torch.equal(scored.batch["teacher_ids"][valid].long(), top.indices[valid])
    torch.testing.assert_close(scored.batch["teacher_logprobs"][valid], top.values[valid], atol=1e-5, rtol=0)


@pytest.mark.ray
@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["forward_kl", "reverse_kl"])
def test_opd_trains_the_student_toward_its_teacher(ray_cluster, tmp_path, beta):
    """Four steps at a large learning rate: the divergence from the separate teacher the student
    trains on (top-16, renormalized) falls. Two random tiny networks are both close to uniform, so
    the mismatch statistic (a lower bound of the full KL, ~1e-4 here) is too small to rank steps by."""
    cfg = make_config(
        *OPD,
        f"algorithm.loss.beta={beta}",
        "trainer.total_steps=4",
        "trainer.lr=1e-2",
        "trainer.grad_clip=10",
        f"run_dir={tmp_path}",
    )
    summary = run(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["algorithm"] == "opd" and [m["step"] for m in lines] == [0, 1, 2, 3]
    assert all(m["tokens"] > 0 and m["loss"] > 0 and "alpha" not in m for m in lines)
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"]
    assert (tmp_path / "checkpoints" / "step_4" / "COMPLETE").exists()
