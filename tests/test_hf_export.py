"""Checkpoints as Hugging Face model folders: ``from_pretrained`` gives the trained student's logits
(LoRA merged), ``mode=export`` writes the same folder, and the folder serves eval, the vLLM
engine and ``model.path`` (a run directory or checkpoint is resolved to its folder)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from atesd_ray.data.synthetic import generate
from atesd_ray.main import run_mode
from atesd_ray.model_folders import model_directory
from atesd_ray.models import load_model, load_tokenizer, pretrained_path, synced_parameters
from atesd_ray.modes.train import run
from atesd_ray.runtime.checkpoint import fingerprint, read_student_weights
from atesd_ray.runtime.weights import load_into
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

LORA = [*TINY, "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "trainer.lr=1e-2"]


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tmp_path_factory):
    """Two LoRA steps of the tiny model, checkpointed after each."""
    out = tmp_path_factory.mktemp("export") / "lora"
    run(make_config(*LORA, "trainer.save_every=1", f"run_dir={out}"), out)
    return out


def _student_logits(cfg, checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """The trained student as training knows it: the configured model with the checkpoint's LoRA tensors."""
    student = load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model)))
    mine = fingerprint(cfg.model.name, True, synced_parameters(student))
    load_into(student, read_student_weights(checkpoint, mine))
    with torch.no_grad():
        return student.eval()(input_ids=ids).logits


def _folder_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits


def _ids(cfg) -> torch.Tensor:
    tokenizer = load_tokenizer(cfg.model)
    record = generate(1, seed=3)[0]
    return torch.tensor([tokenizer(record.problem + "\n\n" + record.reference)["input_ids"]])


def test_every_checkpoint_holds_a_model_folder_with_the_students_logits(lora_run):
    cfg = make_config(*LORA)
    ids = _ids(cfg)
    for step in (1, 2):
        checkpoint = lora_run / "checkpoints" / f"step_{step}"
        folder = checkpoint / "huggingface"
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }
        with open(folder / "config.json") as fh:
            assert "quantization_config" not in json.load(fh)  # a plain model: LoRA merged, no PEFT
        torch.testing.assert_close(_folder_logits(folder, ids), _student_logits(cfg, checkpoint, ids))
    # a run directory stands for its latest checkpoint's folder, a checkpoint for its own
    assert model_directory(lora_run) == lora_run / "checkpoints" / "step_2" / "huggingface"
    assert (
        model_directory(lora_run / "checkpoints" / "step_1") == folder.parents[1] / "step_1" / "huggingface"
    )
    moved = dataclasses.replace(make_config(*TINY).model, source="path", path=str(lora_run), tokenizer=None)
    assert pretrained_path(moved) == str(folder)


def test_mode_export_writes_the_same_folder(lora_run, tmp_path):
    out = tmp_path / "exported"
    cfg = make_config(*LORA, "mode=export", f"run_dir={lora_run}", "export.step=1", f"export.out={out}")
    assert run_mode(cfg, lora_run) == {"out": str(out)}
    ids = _ids(cfg)
    torch.testing.assert_close(
        _folder_logits(out, ids), _folder_logits(lora_run / "checkpoints" / "step_1" / "huggingface", ids)
    )
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_mode(make_config(*LORA, "mode=export", f"run_dir={lora_run}", "export.step=7"), lora_run)


def test_the_folder_serves_eval(lora_run, tmp_path):
    folder = lora_run / "checkpoints" / "step_2" / "huggingface"
    cfg = make_config(
        *TINY, "mode=eval", f"eval.model={folder}", "eval.max_problems=2", "eval.max_new_tokens=4",
        f"run_dir={tmp_path}",
    )  # fmt: skip
    summary = run_mode(cfg, tmp_path)
    assert summary["model"] == str(folder) and summary["sets"]["synthetic"]["n_problems"] == 2


@pytest.mark.vllm
def test_the_vllm_engine_loads_the_folder(lora_run):
    """vLLM serves the exported folder (``model.path`` = the run directory) with the student's
    log-probs: the merged LoRA weights are the trained ones."""
    from workers.rollout import RolloutWorker

    cfg = make_config(*TINY, "rollout.engine=vllm", "model.source=path", f"model.path={lora_run}")
    ids = _ids(cfg)[0].tolist()
    prompts, responses = [ids[:20]], [ids[20:]]
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, 0)
    try:
        served = torch.tensor(ray.get(worker.score_responses.remote(prompts, responses))[0])
    finally:
        ray.kill(worker)
    logp = torch.log_softmax(_folder_logits(model_directory(lora_run), torch.tensor([ids]))[0, :-1], -1)
    expected = logp[19:].gather(-1, torch.tensor(responses[0])[:, None])[:, 0]
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=0)
