"""mode=train end to end on local Ray with the tiny model: resume equals an uninterrupted run;
bad inputs are skipped and counted or fail naming the row; an unwritable run dir fails at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atesd_ray.data.records import DataError
from atesd_ray.job import RunDirError, open_run_dir, prepare_data
from atesd_ray.modes.train import run
from atesd_ray.soak import COMPARED, metrics
from tests.conftest import TINY, make_config


@pytest.mark.ray
def test_resume_continues_exactly_like_an_uninterrupted_run(ray_cluster, tmp_path):
    straight = tmp_path / "straight"
    run(make_config(*TINY, "trainer.total_steps=3", "trainer.save_every=1", f"run_dir={straight}"), straight)
    stopped = tmp_path / "stopped"
    first = run(
        make_config(*TINY, "trainer.total_steps=2", "trainer.save_every=2", f"run_dir={stopped}"), stopped
    )
    assert first["start_step"] == 0 and (stopped / "checkpoints" / "step_2" / "COMPLETE").is_file()
    resumed = run(
        make_config(*TINY, "trainer.total_steps=3", "trainer.save_every=2", f"run_dir={stopped}"), stopped
    )
    assert resumed["start_step"] == 2

    a, b = metrics(straight), metrics(stopped)
    assert [m["step"] for m in b] == [0, 1, 2]  # no step lost, none done twice
    assert not any("grounding" in m for m in a + b)  # OPSD's fixed exposure skips the grounding pass
    for key in COMPARED:
        # same seed and data order; float tolerance for summation-order noise only
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    # keep_last=3 and save_every=1: every step of the straight run has a complete checkpoint
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]

    again = run(make_config(*TINY, "trainer.total_steps=3", f"run_dir={stopped}"), stopped)
    assert again["start_step"] == 3 and "final_metrics" not in again  # complete: says so, trains nothing


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "problem": "Ann has 3 apples and buys 4 more. How many apples does she have?",
    "reference": "She starts with 3 apples.\n\nShe buys 4 more, so 3 + 4 = 7.\n\nThe final answer is \\boxed{7}.",
    "answer": "7",
}


def test_bad_rows_are_skipped_and_counted_or_fail_naming_the_row(tmp_path):
    rows = [dict(GOOD, id=f"p{i}", problem=GOOD["problem"] + f" (case {i})") for i in range(6)]
    rows.insert(2, {"id": "no-answer", "problem": "What is 1 + 1?", "reference": "1 + 1 = 2."})
    rows.insert(4, "{this is not json")
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    base = [*TINY, "data=jsonl", f"data.path={data}", "data.eval_fraction=0.2"]

    prepared = prepare_data(make_config(*base, "data.on_bad_row=skip"))
    assert len(prepared.train) + len(prepared.evals) == 6
    assert "skipped" in prepared.summary

    with pytest.raises(DataError) as err:
        prepare_data(make_config(*base, "data.on_bad_row=fail"))
    assert "train.jsonl" in str(err.value) and "line 3" in str(err.value) and "answer" in str(err.value)


def test_prompts_over_the_limit_are_skipped_and_counted_never_cut():
    cfg = make_config(*TINY, "model.max_prompt_tokens=280")
    prepared = prepare_data(cfg)
    assert prepared.too_long > 0
    assert len(prepared.train) + prepared.too_long == cfg.data.synthetic.n_train
    assert f"{prepared.too_long} train prompts over 280 tokens skipped" in prepared.summary


def test_an_unwritable_run_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="not writable"):
        open_run_dir(blocker / "run", make_config(*TINY))


@pytest.mark.ray
def test_lora_run_trains_and_checkpoints_only_the_adapter(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    summary = run(
        make_config(
            *TINY,
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lora.alpha=8",
            "trainer.lr=1e-3",
            f"run_dir={out}",
        ),
        out,
    )
    assert summary["final_metrics"]["grad_norm"] > 0
    saved = load_file(str(out / "checkpoints" / "step_2" / "student" / "student.safetensors"))
    assert saved and all("lora_" in name for name in saved)


@pytest.mark.ray
def test_the_probe_runs_at_its_cadence_unless_the_controller_learns_from_it(ray_cluster, tmp_path):
    """``tracking.probe_every=2``: OPSD logs the probe NLL after steps 2 and 3 (the last) only; an
    ATESD controller declares that it reads it every step, so every step measures it."""
    cadence = ["trainer.total_steps=3", "tracking.probe_every=2"]
    opsd = tmp_path / "opsd"
    run(make_config(*TINY, *cadence, f"run_dir={opsd}"), opsd)
    assert [("probe_nll" in m) for m in metrics(opsd)] == [False, True, True]
    atesd = tmp_path / "atesd"
    learned = [
        "algorithm=atesd",
        "controller.hold=1",
        "controller.lookahead=1",
        "controller.batch_decisions=2",
    ]
    run(make_config(*TINY, *cadence, *learned, f"run_dir={atesd}"), atesd)
    assert [("probe_nll" in m) for m in metrics(atesd)] == [True, True, True]
