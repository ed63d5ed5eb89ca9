"""Multi-teacher OPD (``teacher.routes``): each problem scored by the teacher model its record's
``teacher.route_key`` field names, one teacher group per model, rows merged per chunk; teachers of
another tokenizer refused by the config."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from verl import DataProto

from atesd_ray.config import ConfigError
from atesd_ray.objective import merge_routed
from tests.conftest import TINY, make_config

OPD = [*TINY, "model.tiny.num_hidden_layers=1", "algorithm=opd", "teacher.model=tiny", "teacher.topk=8"]
ROUTED = [*OPD, "teacher.route_key=difficulty", "+teacher.routes.1=smollm2_135m"]


def test_the_config_routes_and_refuses() -> None:
    cfg = make_config(*ROUTED)
    assert cfg.teacher.models() == ["tiny", "smollm2_135m"]
    assert cfg.teacher.route(1) == "smollm2_135m" and cfg.teacher.route(2) == "tiny"
    with pytest.raises(
        ConfigError, match=r"'teacher\.routes': teacher model qwen3_8b has the qwen3 tokenizer"
    ):
        make_config(*OPD, "+teacher.routes.1=qwen3_8b")
    with pytest.raises(ConfigError, match=r"'teacher\.model': teacher model qwen3_8b has the qwen3"):
        make_config(*TINY, "algorithm=opd", "teacher.model=qwen3_8b")
    with pytest.raises(ConfigError, match=r"'teacher\.topk'"):
        make_config(*ROUTED, "teacher.topk=0")
    with pytest.raises(ConfigError, match=r"'teacher\.routes\.1': got 'nope'"):
        make_config(*OPD, "+teacher.routes.1=nope")
    with pytest.raises(ConfigError, match=r"'teacher\.routes': algorithm=sft does not route"):
        make_config(
            *TINY, "algorithm=sft", "teacher.model=smollm2_135m", "teacher.topk=8", "+teacher.routes.1=tiny"
        )


def _part(rows: list[bool], value: float) -> DataProto:
    owned = torch.tensor(rows)
    logp = torch.full((len(rows), 3, 2), value) * owned[:, None, None]
    return DataProto.from_dict(
        tensors={"teacher_rows": owned.float(), "teacher_logprobs": logp}, meta_info={"time_s": value}
    )


def test_merge_takes_each_row_from_its_teacher() -> None:
    merged = merge_routed([_part([True, False, True], 1.0), _part([False, True, False], 2.0)])
    assert merged.batch["teacher_logprobs"][:, 0, 0].tolist() == [1.0, 2.0, 1.0]
    assert "teacher_rows" not in merged.batch.keys() and merged.meta_info["time_s"] == 2.0
    with pytest.raises(ValueError, match=r"rows \[1\] were routed to no teacher"):
        merge_routed([_part([True, False, True], 1.0), _part([False, False, False], 2.0)])


def test_each_row_has_its_own_teachers_targets() -> None:
    """Two teacher workers (two models), one mixed chunk: the merged targets of each row equal its
    own teacher's scoring of it alone."""
    from atesd_ray.data.synthetic import generate
    from atesd_ray.prompts import encode_chat, student_messages
    from atesd_ray.sequences import left_pad, right_pad
    from workers.teacher import TeacherWorker

    cfg = make_config(*ROUTED, "algorithm.loss.temperature=1.0")
    tiny, smol = TeacherWorker(cfg, 0, model="tiny"), TeacherWorker(cfg, 0, model="smollm2_135m")
    records = [dataclasses.asdict(r) for r in generate(12, seed=1)]
    records = [r for r in records if r["difficulty"] == 1][:2] + [r for r in records if r["difficulty"] != 1][
        :2
    ]
    tok = tiny.tokenizer
    prompts = [encode_chat(tok, student_messages(r["problem"], cfg.prompts), False) for r in records]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    r_ids, r_mask = right_pad([[11, 12, 13], [21, 22], [31], [41, 42, 43]], tok.pad_token_id)
    rollout = DataProto.from_dict(
        tensors={"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask},
        non_tensors={
            k: np.array([r[k] for r in records], dtype=object)
            for k in ("problem", "reference", "answer", "difficulty")
        }
        | {"uid": np.array([r["id"] for r in records], dtype=object)},
    )
    merged = merge_routed([tiny.score(rollout, 1.0), smol.score(rollout, 1.0)])
    for worker, rows in ((smol, [0, 1]), (tiny, [2, 3])):
        alone = worker._targets(rollout.select_idxs(rows), 1.0)
        for key in ("teacher_logprobs", "teacher_ids", "teacher_sampled_logprob", "teacher_tail"):
            torch.testing.assert_close(merged.batch[key][rows], alone.batch[key])


@pytest.mark.ray
def test_routed_opd_trains(ray_cluster, tmp_path) -> None:
    """Two steps of OPD with two teacher groups: both score, and the student trains."""
    from atesd_ray.modes.train import run

    cfg = make_config(*ROUTED, f"run_dir={tmp_path}")
    run(cfg, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    assert all(math.isfinite(m["loss"]) and m["tokens"] > 0 for m in lines)
    topology = json.loads((tmp_path / "topology.json").read_text())
    assert len(topology["teacher"]) == len(topology["teacher smollm2_135m"]) == 1
