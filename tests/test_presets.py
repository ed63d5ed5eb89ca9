"""The paper presets: every experiment x model size composes (in process and through the CLI's
``--cfg job``), validates, and carries the OPSD profile of DESIGN §3 with the per-size keys of the
model preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from atesd_ray.config import Config, to_config
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("paper_opsd", "paper_atesd")
# per size: hub id, point-wise clip, optimizer steps, teacher thinking (DESIGN §3)
SIZES = {
    "qwen3_1_7b": ("Qwen/Qwen3-1.7B", 0.05, 100, True),
    "qwen3_4b": ("Qwen/Qwen3-4B", 1e-6, 100, False),
    "qwen3_8b": ("Qwen/Qwen3-8B", 1e-7, 50, False),
}
PER_SIZE_KEYS = {("trainer", "total_steps"), ("algorithm", "loss", "clip")}


def _check_profile(cfg: Config, experiment: str, model: str) -> None:
    path, clip, steps, teacher_thinking = SIZES[model]
    assert cfg.model.name == model and cfg.model.path == path
    assert cfg.algorithm.name == experiment.removeprefix("paper_")
    assert cfg.algorithm.loss.clip == clip and cfg.trainer.total_steps == steps
    assert cfg.model.student_thinking is False and cfg.model.teacher_thinking is teacher_thinking
    lora = cfg.model.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 64, 128, 0.05)
    assert set(lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg.trainer.lr == 5e-6 and cfg.trainer.grad_clip == 0.1 and cfg.seed == 42
    assert cfg.trainer.prompts_per_step * cfg.rollout.n_samples == 32  # effective batch
    r = cfg.rollout
    assert (r.temperature, r.top_p, r.top_k, r.max_new_tokens) == (1.1, 0.95, 20, 1024)
    assert cfg.algorithm.loss.temperature == 1.1 and cfg.algorithm.loss.beta == 0.0
    e = cfg.eval
    assert (e.samples, e.temperature, e.top_p, e.top_k, e.max_new_tokens, e.thinking) == (
        12,
        1.0,
        1.0,
        0,
        38912,
        True,
    )
    assert [s.name for s in e.sets] == ["aime24", "aime25", "hmmt25"]
    assert cfg.data.path == "siyanzhao/Openthoughts_math_30k_opsd"
    assert cfg.cluster.name == "multinode" and cfg.rollout.engine == "vllm"
    if experiment == "paper_atesd":
        c = cfg.controller
        assert (c.kind, c.alpha_min, c.alpha_max, c.hold, c.lookahead, c.gamma, c.lambda_gt) == (
            "atesd",
            0.1,
            1.0,
            4,
            8,
            0.9,
            0.2,
        )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("model", list(SIZES))
def test_preset_composes_in_process(experiment: str, model: str) -> None:
    _check_profile(make_config(f"experiment={experiment}", f"model={model}"), experiment, model)


def test_presets_compose_through_the_cli() -> None:
    """`atesd-ray experiment=... model=... --cfg job`, run as a user would, validates too."""
    combos = [(e, m) for e in EXPERIMENTS for m in SIZES]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "atesd_ray.main", f"experiment={e}", f"model={m}", "--cfg", "job"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for e, m in combos
    ]
    for (experiment, model), proc in zip(combos, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        composed = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(out))
        _check_profile(to_config(composed), experiment, model)


def test_default_model_of_the_paper_experiments_is_qwen3_1_7b() -> None:
    for experiment in EXPERIMENTS:
        _check_profile(make_config(f"experiment={experiment}"), experiment, "qwen3_1_7b")


def test_paper_experiments_leave_per_size_keys_to_the_model_presets() -> None:
    """conf/config.yaml composes experiments last: a per-size key set in an experiment meant for a
    sweep over model sizes would override every size. (The SFT and GRPO baselines train a fixed
    number of epochs whatever the size, so their step counts stay in their experiments.)"""
    for path in (ROOT / "conf" / "experiment" / f"{e}.yaml" for e in EXPERIMENTS):
        tree = yaml.safe_load(path.read_text()) or {}
        for key in PER_SIZE_KEYS:
            node = tree
            for part in key:
                node = node.get(part) if isinstance(node, dict) else None
            assert node is None, f"{path.name} sets {'.'.join(key)}, which belongs to conf/model/*.yaml"


def test_exposure_sweep_points_compose() -> None:
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        cfg = make_config("experiment=paper_opsd", "algorithm=fixed_exposure", f"algorithm.alpha={alpha}")
        assert cfg.algorithm.name == "fixed_exposure" and cfg.algorithm.alpha == alpha
        assert cfg.algorithm.loss.clip == 0.05  # the model preset still wins over the algorithm


def test_cluster_options_validate() -> None:
    colocated = make_config(
        "cluster=multinode",
        "cluster.colocate_rollout=true",
        "cluster.student.gpus=0.5",
        "cluster.rollout.gpus=0.5",
        "trainer.ranks=2",
        "rollout.replicas=2",
        "trainer.weight_transport=cuda_ipc",
    )
    assert colocated.cluster.colocate_rollout and colocated.trainer.weight_transport == "cuda_ipc"
    bad = {
        ("cluster.colocate_rollout=true", "trainer.ranks=2"): "rollout.replicas",
        ("trainer.weight_transport=cuda_ipc",): "trainer.weight_transport",
        ("cluster=multinode", "cluster.colocate_rollout=true"): "cluster.rollout.gpus",
        ("teacher.engine=vllm",): "teacher.topk",
        ("teacher.engine=vllm", "teacher.topk=20", "teacher.weights=ema"): "teacher.weights",
        ("model.attn_implementation=flash",): "model.attn_implementation",
        # a controller that would change what the algorithm's name says runs
        ("algorithm=opsd", "controller.kind=atesd"): "controller.kind",
        ("algorithm=fixed_exposure", "controller.kind=random"): "controller.kind",
        ("algorithm=atesd", "controller.kind=fixed"): "controller.kind",
    }
    for overrides, key in bad.items():
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            make_config(*overrides)


def test_demo_runs_atesd_on_the_bundled_model_unclipped() -> None:
    cfg = make_config("experiment=demo")
    assert (cfg.model.name, cfg.algorithm.name, cfg.controller.kind) == ("smollm2_135m", "atesd", "atesd")
    assert cfg.algorithm.loss.clip is None  # the bundled model's profile (conf/model/smollm2_135m.yaml)
    assert make_config("experiment=demo", "algorithm.loss.clip=0.05").algorithm.loss.clip == 0.05


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_config_file_parses(path):
    """Each group option is valid YAML (a flow mapping holding ``???`` unquoted is not)."""
    assert isinstance(yaml.safe_load(path.read_text()), dict | None)
