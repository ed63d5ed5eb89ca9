"""Bad inputs the other test files do not cover: a huge problem text, a config typo, exposure bounds
out of range, a checkpoint of another model, a checkpoint file carrying pickled code, a half-written
checkpoint; and the servers' defaults (loopback only).

Covered elsewhere: malformed JSONL lines, missing columns, empty references, non-string answers and
control characters (test_data.py), grader inputs that would keep sympy busy (test_grading.py), an
unwritable run dir and bad rows through mode=train (test_training.py), a read-only dashboard
(test_dashboard.py)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atesd_ray.config import ConfigError, DashboardConfig, check_override_keys
from atesd_ray.job import prepare_data
from atesd_ray.runtime.checkpoint import (
    MARKER,
    STATE,
    CheckpointError,
    CheckpointManager,
    fingerprint,
    load_rollouts,
    load_tensors,
    read_student_weights,
    save_rollouts,
)
from tests.conftest import TINY, make_config

GOOD = {
    "problem": "Ann has 3 apples and buys 4 more. How many apples does she have?",
    "reference": "She starts with 3 apples.\n\nShe buys 4 more, so 3 + 4 = 7.\n\nThe final answer is \\boxed{7}.",
    "answer": "7",
}


def test_a_huge_problem_text_is_skipped_and_counted_never_cut(tmp_path):
    rows = [dict(GOOD, id=f"p{i}", problem=f"{GOOD['problem']} (case {i})") for i in range(5)]
    rows.append(dict(GOOD, id="huge", problem="How many apples? " * 60_000))  # ~1 MB of text
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_data(make_config(*TINY, "data=jsonl", f"data.path={path}", "data.eval_fraction=0"))
    assert prepared.too_long == 1
    assert sorted(r["id"] for r in prepared.train) == [f"p{i}" for i in range(5)]
    assert "1 train prompts over" in prepared.summary


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("trainer.totl_steps=3", "trainer.total_steps"),
        ("controler.hold=2", "controller.hold"),
        ("rollout.max_new_token=8", "rollout.max_new_tokens"),
    ],
)
def test_a_config_typo_names_the_key_and_the_closest_valid_one(override, suggestion):
    with pytest.raises(ConfigError) as err:
        check_override_keys([override])
    key = override.split("=")[0]
    assert f"'{key}'" in str(err.value) and f"did you mean '{suggestion}'" in str(err.value)


def test_a_config_typo_on_the_command_line_fails_before_anything_starts():
    out = subprocess.run(
        [sys.executable, "-m", "atesd_ray.main", "model=tiny", "trainer.totl_steps=3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode != 0
    assert (
        "trainer.totl_steps" in out.stderr + out.stdout and "trainer.total_steps" in out.stderr + out.stdout
    )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("algorithm=atesd", "controller.alpha_min=-0.1"), "controller.alpha_min"),
        (("algorithm=atesd", "controller.alpha_max=1.5"), "controller.alpha_max"),
        (("algorithm=atesd", "controller.alpha_min=0.8", "controller.alpha_max=0.5"), "controller.alpha_min"),
        (("algorithm=fixed_exposure", "algorithm.alpha=2.0"), "algorithm.alpha"),
        (("mode=sweep_exposure", "sweep.alphas=[0.5,1.2]"), "sweep.alphas"),
    ],
)
def test_exposure_bounds_out_of_range_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^config error at '{re.escape(key)}': ") as err:
        make_config(*TINY, *overrides)
    assert "must be in [0.0, 1.0]" in str(err.value) or "exceeds alpha_max" in str(err.value)


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    (d / "student").mkdir()
    if complete:
        (d / STATE).write_text(json.dumps({"step": step}))
        (d / MARKER).write_text(str(step))
    return d


def test_a_half_written_checkpoint_is_never_loaded(tmp_path):
    _checkpoint(tmp_path, 2)
    half = _checkpoint(tmp_path, 4, complete=False)  # named like a checkpoint, no marker: killed mid-rename
    (half / "student" / "student.safetensors").write_bytes(b"\x00" * 100)
    tmp = tmp_path / "checkpoints" / ".tmp-step_6"  # killed while the actors wrote their parts
    (tmp / "student").mkdir(parents=True)
    (tmp / STATE).write_text('{"step": 6')

    ckpts = CheckpointManager(tmp_path, keep_last=3)
    assert ckpts.latest() == tmp_path / "checkpoints" / "step_2"
    assert ckpts.resolve("auto") == tmp_path / "checkpoints" / "step_2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpts.resolve(str(half))
    ckpts.begin(8)
    assert not tmp.exists()  # the next save clears what the killed one left


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path):
    from safetensors.torch import save_file

    from atesd_ray.models import load_model

    ckpt = _checkpoint(tmp_path, 3)
    theirs = load_model(make_config(*TINY, "model.tiny.hidden_size=32").model)
    trainable = {n: p.detach() for n, p in theirs.named_parameters()}
    save_file(
        {n: t.contiguous() for n, t in trainable.items()}, str(ckpt / "student" / "student.safetensors")
    )
    state = {"fingerprint": fingerprint("tiny", False, trainable)}
    (ckpt / "student" / "student_state.json").write_text(json.dumps(state))

    mine = load_model(make_config(*TINY).model)
    with pytest.raises(ValueError, match="holds a different model") as err:
        read_student_weights(ckpt, fingerprint("tiny", False, dict(mine.named_parameters())))
    assert "shapes that differ" in str(err.value) and ", 64]" in str(err.value) and ", 32]" in str(err.value)


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: code run by loading, as a hostile checkpoint would."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _hostile_optimizer_file(path: Path, marker: Path) -> Path:
    torch.save({"optimizer": {"state": {}, "param_groups": [_CreatesFile(marker)]}, "rng": []}, path)
    return path


def test_a_checkpoint_file_carrying_pickled_code_is_refused_without_running_it(tmp_path):
    proof = tmp_path / "proof-the-payload-works"
    control = _hostile_optimizer_file(tmp_path / "control.pt", proof)
    torch.load(control, weights_only=False)  # what an unsafe loader would do
    assert proof.exists()

    marker = tmp_path / "created-by-the-checkpoint"
    hostile = _hostile_optimizer_file(tmp_path / "optimizer.pt", marker)
    with pytest.raises(CheckpointError, match="optimizer.pt holds more than tensors") as err:
        load_tensors(hostile)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_held_rollouts_round_trip_as_tensors_and_json_and_a_pickle_in_their_place_is_refused(tmp_path):
    """The rollouts a checkpoint holds for the next step are read back equal, without unpickling:
    a torch.save file put in their place is refused, naming it, and its code never runs."""
    import numpy as np
    from verl import DataProto

    rollouts = [
        DataProto.from_dict(
            tensors={"response_ids": torch.arange(6).view(2, 3), "reward": torch.tensor([0.0, 1.0])},
            non_tensors={
                "uid": np.array(["a", "b"], dtype=object),
                "difficulty": np.array([2, None], dtype=object),
                "problem": np.array(["x \\boxed{1}", "naïve ∑"], dtype=object),
            },
            meta_info={"weight_version": 3, "step": 4, "time_s": 0.5},
        )
        for _ in range(2)
    ]
    save_rollouts(rollouts, tmp_path / "held.safetensors")
    back = load_rollouts(tmp_path / "held.safetensors")
    assert len(back) == 2
    for a, b in zip(rollouts, back, strict=True):
        assert set(a.batch.keys()) == set(b.batch.keys())
        for key in a.batch.keys():
            assert torch.equal(a.batch[key], b.batch[key]) and a.batch[key].dtype == b.batch[key].dtype
        assert {k: v.tolist() for k, v in a.non_tensor_batch.items()} == {
            k: v.tolist() for k, v in b.non_tensor_batch.items()
        }
        assert a.meta_info == b.meta_info

    marker = tmp_path / "created-by-the-checkpoint"
    hostile = _hostile_optimizer_file(tmp_path / "prefetched_rollouts.safetensors", marker)
    with pytest.raises(CheckpointError, match="prefetched_rollouts.safetensors is not a rollouts file"):
        load_rollouts(hostile)
    assert not marker.exists()


def test_the_controller_refuses_a_policy_file_carrying_pickled_code(tmp_path):
    from controller.actor import STATE_FILE, TENSOR_FILE, ExposureController

    cfg = make_config(*TINY, "algorithm=atesd")
    saved = ExposureController(cfg, 4)
    saved.exposure(0)
    saved.save(str(tmp_path))
    marker = tmp_path / "created-by-the-checkpoint"
    _hostile_optimizer_file(tmp_path / TENSOR_FILE, marker)
    assert (tmp_path / STATE_FILE).is_file()
    with pytest.raises(CheckpointError, match=TENSOR_FILE):
        ExposureController(cfg, 4).load(str(tmp_path))
    assert not marker.exists()


def test_servers_bind_loopback_by_default(tmp_path):
    from controller.dashboard.server import DashboardServer

    assert DashboardConfig().host == "127.0.0.1" and make_config(*TINY).dashboard.host == "127.0.0.1"
    server = DashboardServer(tmp_path).start()
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


RAY_DASHBOARD_PROBE = """
import psutil, ray
from atesd_ray.config import ClusterConfig
from atesd_ray.runtime.cluster import connect
from ray._private.worker import global_worker
connect(ClusterConfig(num_cpus=1))
url = global_worker.node.address_info["webui_url"]
port = int(url.rsplit(":", 1)[1])
hosts = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}
print("DASHBOARD", url, sorted(hosts))
ray.shutdown()
"""


@pytest.mark.ray
def test_the_ray_dashboard_of_a_local_cluster_answers_on_loopback_only():
    out = subprocess.run(
        [sys.executable, "-c", RAY_DASHBOARD_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("DASHBOARD"))
    _, url, hosts = line.split(" ", 2)
    assert url.startswith("127.0.0.1:") and hosts == "['127.0.0.1']", out.stdout + out.stderr[-2000:]


def _model_folder(tmp_path: Path, name: str) -> Path:
    """A copy of the tiny model's folder (config, safetensors, tokenizer), to damage."""
    from atesd_ray.models import ensure_tiny

    folder = tmp_path / name
    shutil.copytree(ensure_tiny(make_config(*TINY).model), folder)
    return folder


def test_a_model_folder_without_a_tokenizer_or_with_a_bad_config_is_named_before_any_actor(tmp_path):
    bare = _model_folder(tmp_path, "no-tokenizer")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    on_it = [*TINY, "model.source=path", f"model.path={bare}", "model.tokenizer=null"]
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(bare))}: no tokenizer \(tokenizer.json"):
        prepare_data(make_config(*on_it))
    assert prepare_data(make_config(*on_it[:-1], "model.tokenizer=bundled")).train  # one named instead

    wrong = _model_folder(tmp_path, "wrong-config")
    config = wrong / "config.json"
    config.write_text(config.read_text().replace('"model_type": "qwen3"', '"model_type": "qwen77"'))
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not a model config .*qwen77"):
        prepare_data(make_config(*TINY, "model.source=path", f"model.path={wrong}"))
    config.write_text("{ not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not a model config"):
        prepare_data(make_config(*TINY, "model.source=path", f"model.path={wrong}"))

    (wrong / "config.json").write_text((bare / "config.json").read_text())
    (wrong / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(wrong))}: no weights"):
        prepare_data(make_config(*TINY, "model.source=path", f"model.path={wrong}"))


def test_a_data_file_with_a_duplicate_id_names_the_row(tmp_path):
    rows = [GOOD | {"id": "a"}, GOOD | {"id": "b", "problem": "Bo has 2 pens."}, GOOD | {"id": "a"}]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(*TINY, "data.source=jsonl", f"data.path={path}", "data.on_bad_row=fail")
    with pytest.raises(Exception, match=rf"{re.escape(str(path))}.*line 3.*duplicate id 'a'"):
        prepare_data(cfg)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["eval=paper", "eval.sets.1.name=aime24"], "eval.sets"),
        (
            ["algorithm=opd", "teacher.model=tiny", "algorithm.loss.topk_tail=none", "teacher.topk=0"],
            "algorithm.loss.topk_tail",
        ),
    ],
)
def test_settings_that_would_be_refused_or_ignored_late_are_config_errors(overrides, key):
    """Before, duplicate eval set names stopped mode=eval with a traceback after the run dir was
    taken, and topk_tail=none with full-vocabulary targets ran without its clamps."""
    with pytest.raises(ConfigError, match=f"at '{key}'"):
        make_config(*TINY, *overrides)
