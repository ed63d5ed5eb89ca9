"""``algorithm.loss.topk_tail=bucket`` end to end: config -> teacher actor (top-k log-probs
normalized over the whole vocabulary) -> student loss, in real one-step runs of the tiny model.

With forward KL (beta 0), no clipping and T = 1, the bucket loss is KL between the teacher's and the
student's distributions over {the teacher's top-k ids, everything else}. So, on the same step-0
rollouts (same seed, same weights):
- it equals the step's logged mismatch KL, which is that quantity by definition; a renormalized top-k
  loss does not;
- merging vocabulary entries can only lower a KL (data processing), and the top-k partition refines
  as k grows: bucket loss at k=4 <= at k=32 <= the full-vocabulary loss (teacher.topk=0). A teacher
  whose top-k log-probs were renormalized over the k ids would give the bucket no mass and break this.
"""

from __future__ import annotations

import json

import pytest

from atesd_ray.modes.train import run
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

FORWARD_KL = [
    *TINY,
    "algorithm=opsd",
    "algorithm.loss.temperature=1.0",
    "algorithm.loss.clip=null",
    "trainer.total_steps=1",
    "trainer.save_hf=false",
    "eval.at_start=false",
    "eval.at_end=false",
]


def _first_step(tmp_path, name: str, *overrides: str) -> dict:
    out = tmp_path / name
    run(make_config(*FORWARD_KL, *overrides, f"run_dir={out}"), out)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_bucket_tail_trains_on_the_partition_kl_bounded_by_the_full_distribution(ray_cluster, tmp_path):
    full = _first_step(tmp_path, "full", "teacher.topk=0")
    bucket4 = _first_step(tmp_path, "bucket4", "teacher.topk=4", "algorithm.loss.topk_tail=bucket")
    bucket32 = _first_step(tmp_path, "bucket32", "teacher.topk=32", "algorithm.loss.topk_tail=bucket")
    renorm4 = _first_step(tmp_path, "renorm4", "teacher.topk=4", "algorithm.loss.topk_tail=renormalize")

    assert len({m["tokens"] for m in (full, bucket4, bucket32, renorm4)}) == 1  # the same rollouts
    for m in (bucket4, bucket32):
        assert m["loss"] == pytest.approx(m["mismatch_kl"], rel=1e-6)
    assert renorm4["mismatch_kl"] == pytest.approx(bucket4["mismatch_kl"], rel=1e-6)
    assert abs(renorm4["loss"] - renorm4["mismatch_kl"]) > 1e-3 * renorm4["mismatch_kl"]
    assert 0 < bucket4["loss"] < bucket32["loss"] < full["loss"]
    assert full["loss"] == pytest.approx(full["mismatch_kl"], rel=1e-6)
