"""MOTAB and SKD end to end on a real local Ray cluster: offline synthesis with SmolLM2 and its
privileged self-teacher (every recorded decision re-checked against the rules), the synthesized
file read back as ``data=jsonl``, SKD's accept rule on the tiny Qwen3, and on-policy
``algorithm=motab`` for 3 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atesd_ray.job import prepare_data
from atesd_ray.modes.motab_synthesize import OUTPUT
from atesd_ray.modes.motab_synthesize import run as synthesize
from atesd_ray.modes.train import run as train
from atesd_ray.trajectories import root_cause, safety_boundary, skd_accept, stitch
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

SMALL = [
    "data.synthetic.n_train=2",
    "data.synthetic.n_eval=2",
    "data.probe_size=1",
    "algorithm.motab.n_trajectories=2",
    "algorithm.motab.max_steps=2",
    "algorithm.motab.max_step_tokens=16",
    "rollout.max_new_tokens=24",
    "cluster.torch_threads=1",
    "tracking.backends=[jsonl]",
    "dashboard.enabled=false",
]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / OUTPUT).read_text().splitlines()]


def test_motab_synthesis_with_smollm2_and_its_privileged_self_teacher(ray_cluster, tmp_path, capsys):
    # eps0 = 5: SmolLM2's top-20 entropies (~2.7 nats) put the paper's eps0 = 0.2 gate near 0.013,
    # which its own steps (V ~ 0.2-0.5) never breach in two steps; this gate (~0.3) does
    cfg = make_config(
        "mode=motab_synthesize", "algorithm=motab", "algorithm.motab.eps0=5.0", *SMALL, f"run_dir={tmp_path}"
    )
    summary = synthesize(cfg, tmp_path)
    printed = capsys.readouterr().out
    assert "breach rate" in printed and "mean t*" in printed and "lengths" in printed

    rows = _rows(tmp_path)
    assert len(rows) == 4 == summary["trajectories"]
    assert summary["breach_rate"] == sum(r["trajectory"]["breach_step"] is not None for r in rows) / 4 > 0
    m = cfg.algorithm.motab
    for row in rows:
        traj, steps = row["trajectory"], row["trajectory"]["steps"]
        assert 1 <= len(steps) <= m.max_steps and all(s["author"] == "student" for s in steps)
        for s in steps:
            assert s["boundary"] == pytest.approx(safety_boundary(s["entropy"], m.eps0, m.theta))
            assert 0 < s["value"] < 1 and 0 < s["tokens"] <= m.max_step_tokens
        breach = traj["breach_step"]
        if breach is None:  # every step passed the gate: the target is the student's own solution
            assert all(s["value"] >= s["boundary"] for s in steps)
            assert row["reference"] == "".join(s["text"] for s in steps)
            continue
        # the gate stopped the student at the first unsafe step; one intervention, from t*
        assert breach == len(steps) - 1 and steps[breach]["value"] < steps[breach]["boundary"]
        assert all(s["value"] >= s["boundary"] for s in steps[:breach])
        assert traj["t_star"] == root_cause([s["value"] for s in steps], [s["boundary"] for s in steps])
        assert traj["end"] == "takeover" and traj["suffix_tokens"] > 0
        suffix = row["reference"][len(stitch([s["text"] for s in steps], cfg.prompts.revise_phrase, "")) :]
        assert (
            row["reference"] == stitch([s["text"] for s in steps], cfg.prompts.revise_phrase, suffix)
            and suffix.strip()
        )

    # the file is a dataset: data=jsonl reads every record
    data = prepare_data(make_config("data=jsonl", f"data.path={tmp_path / OUTPUT}", "data.eval_fraction=0"))
    assert sorted(r["id"] for r in data.train) == sorted(r["id"] for r in rows)
    assert {r["reference"] for r in data.train} == {r["reference"] for r in rows}

    # ... and the paper's MOTAB pipeline ends in SFT on it: one step over every synthesized row
    sft_dir = tmp_path / "sft"
    sft = train(
        make_config(
            *TINY,
            "algorithm=sft",
            "data=jsonl",
            f"data.path={tmp_path / OUTPUT}",
            "data.eval_fraction=0",
            "data.probe_size=1",
            "trainer.total_steps=1",
            f"trainer.prompts_per_step={len(rows)}",
            "eval.at_start=false",
            "eval.at_end=false",
            f"run_dir={sft_dir}",
        ),
        sft_dir,
    )
    final = sft["final_metrics"]
    assert sft["algorithm"] == "sft" and final["weight_version"] == 1 and final["tokens"] > 0
    assert 0 < final["loss"] < 20 and final["grad_norm"] > 0


def test_skd_synthesis_keeps_student_steps_the_teacher_likes_and_rewrites_the_others(ray_cluster, tmp_path):
    # gamma = 0.97: the tiny random Qwen3 gives teacher values 94-98% of the student's (measured)
    cfg = make_config(
        "mode=motab_synthesize",
        "algorithm=skd",
        "model=tiny",
        "algorithm.motab.skd_gamma=0.97",
        "algorithm.motab.max_step_tokens=6",
        *SMALL,
        f"run_dir={tmp_path}",
    )
    synthesize(cfg, tmp_path)
    steps = [s for row in _rows(tmp_path) for s in row["trajectory"]["steps"]]
    assert {s["author"] for s in steps} == {"student", "teacher"}
    for s in steps:
        kept = skd_accept(s["value"], s["student_value"], cfg.algorithm.motab.skd_gamma)
        assert (s["author"] == "student") == kept
        assert ("rejected" in s) == (not kept)
    for row in _rows(tmp_path):
        assert row["trajectory"]["breach_step"] is None
        assert row["reference"] == "".join(s["text"] for s in row["trajectory"]["steps"])


def test_motab_on_policy_trains_three_steps_with_the_atesd_controller_choosing_the_exposure(
    ray_cluster, tmp_path
):
    # The random tiny Qwen3 teaches its student with V ~ 3.5e-5..3.9e-5 per step and H ~ 2.98 nats;
    # eps0 = 7.3e-4 puts the gate (~3.7e-5) among those values, so some steps pass (distillation) and
    # some breach (the teacher's suffix, NLL); the paper's eps0 = 0.2 would breach every first step.
    # The self-teacher's exposure comes from the ATESD controller actor, one decision per step.
    atesd = [
        "controller.kind=atesd",
        "controller.hold=1",
        "controller.lookahead=1",
        "controller.batch_decisions=2",
    ]
    motab = [
        "algorithm.motab.eps0=7.3e-4",
        "algorithm.motab.n_trajectories=2",
        "algorithm.motab.max_steps=2",
        "algorithm.motab.max_step_tokens=6",
    ]
    cfg = make_config(
        *TINY,
        "algorithm=motab",
        *motab,
        *atesd,
        "trainer.total_steps=3",
        "trainer.prompts_per_step=2",
        "rollout.max_new_tokens=12",
        "cluster.torch_threads=1",
        f"run_dir={tmp_path}",
    )
    summary = train(cfg, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2] and summary["final_metrics"]["weight_version"] == 3
    for m in metrics:
        assert m["tokens"] == m["distill_tokens"] + m["nll_tokens"] > 0
        combined = (
            m["distill_loss"] * m["distill_tokens"] + m["teacher_nll"] * m["nll_tokens"]
        )  # weights 1, 1
        assert m["loss"] == pytest.approx(combined / m["tokens"], rel=1e-6)
        assert m["grad_norm"] > 0 and m["update_skipped"] == 0
        assert m["breach_rate"] == 0 or m["nll_tokens"] > 0  # a breach always hands the rest to the teacher
    assert sum(m["distill_tokens"] for m in metrics) > 0 and sum(m["nll_tokens"] for m in metrics) > 0
    assert 8.0 < max(m["teacher_nll"] for m in metrics) < 13.0  # ~ log(vocab) for a random model
    assert (tmp_path / "checkpoints" / "step_3" / "COMPLETE").is_file()
    timeline = [
        json.loads(line) for line in (tmp_path / "controller_timeline.jsonl").read_text().splitlines()
    ]
    assert [d["first_step"] for d in timeline] == [0, 1, 2]
    for d, m in zip(timeline, metrics, strict=True):
        assert 0.1 <= d["alpha"] <= 1.0 and m["alpha"] == pytest.approx(d["alpha"])
    assert any(d["reward"] is not None for d in timeline) and metrics[-1]["controller/updates"] >= 1
