"""Teacher weight modes, exercised on the real TeacherWorker class with the tiny model (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from atesd_ray.runtime.weight_sync import object_store
from atesd_ray.runtime.weights import pack
from tests.conftest import TINY, make_config
from workers.teacher import TeacherWorker


def _shifted(teacher: TeacherWorker, delta: float) -> dict[str, torch.Tensor]:
    return {n: p.detach() + delta for n, p in teacher._synced_parameters().items()}


@pytest.mark.parametrize("mode", ["frozen", "live", "ema"])
def test_teacher_weight_modes(mode):
    teacher = TeacherWorker(make_config(*TINY, f"teacher.weights={mode}", "teacher.ema_decay=0.9"))
    before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    student = _shifted(teacher, 1.0)
    # a frozen teacher is never made a sync receiver; handed weights anyway, it keeps its own
    assert teacher.weight_transfer(object_store.receive, pack(student), 1) == 1
    name = next(iter(student))
    now = dict(teacher.model.named_parameters())[name].detach()
    expected = {
        "frozen": before[name],
        "live": student[name],
        "ema": 0.9 * before[name] + 0.1 * student[name],
    }[mode]
    assert torch.allclose(now, expected, atol=1e-6)
    # an older or equal version is ignored (a resumed EMA teacher is not blended twice)
    assert teacher.weight_transfer(object_store.receive, pack(_shifted(teacher, 5.0)), 1) == 1
    assert torch.allclose(dict(teacher.model.named_parameters())[name].detach(), expected, atol=1e-6)
