"""Trained students as Hugging Face model folders (``checkpoints/step_<N>/huggingface/``, ``mode=export``):
writing one, and finding and checking one given as a model path.

A folder holds ``config.json``, ``generation_config.json``, the tokenizer with its chat template,
and the weights as safetensors (sharded past 5 GB, with an index) under Hugging Face names, with
LoRA merged in (W + alpha/r * B A), so ``AutoModelForCausalLM.from_pretrained(folder)``, ``vllm
serve folder`` and ``model.source=path model.path=folder`` load it with no PEFT involved.
``model.path`` and ``eval.model`` also take a run directory or a checkpoint and find the folder
in it (:func:`model_directory`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from atesd_ray.runtime.checkpoint import CheckpointManager, is_checkpoint

HF_DIR = "huggingface"


def save_hf_model(out: Path, weights: dict[str, torch.Tensor], model, tokenizer) -> Path:
    """Write ``weights`` (whole tensors by Hugging Face name) with ``model``'s config and generation
    config and ``tokenizer`` into ``out``."""
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    if not model.config.architectures:  # a model built from a config (the tiny one) names no class yet
        # FSDP2 and PEFT subclass or wrap the model: name the transformers class underneath
        model.config.architectures = [
            next(c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers."))
        ]
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_torch_state_dict({n: t.contiguous() for n, t in weights.items()}, out)
    # the safetensors writer creates its files 0600 (through a temporary file); give them the mode
    # config.json got from a plain open(), the user's umask, so a server running as another user on
    # shared storage can read them as it reads the rest of the folder
    mode = (out / "config.json").stat().st_mode & 0o777
    for path in out.iterdir():
        if path.is_file():
            path.chmod(mode)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_directory(path: Path) -> Path:
    """A model folder (``config.json`` inside) as given, or the Hugging Face folder of a checkpoint,
    or of a run directory's latest complete checkpoint; checked by :func:`check_model_folder`."""
    if (path / "config.json").is_file():
        return check_model_folder(path)
    checkpoint = path if is_checkpoint(path) else None
    if checkpoint is None and (path / "checkpoints").is_dir():
        checkpoint = CheckpointManager(path, keep_last=1).latest()
    if checkpoint is not None and (checkpoint / HF_DIR / "config.json").is_file():
        return check_model_folder(checkpoint / HF_DIR)
    raise FileNotFoundError(
        f"{path}: not a model folder (config.json), nor a checkpoint or run directory whose checkpoint "
        f"holds a {HF_DIR}/ folder (written when trainer.save_hf is true)"
    )


def check_model_folder(folder: Path) -> Path:
    """A model folder transformers can build and fill: ``config.json`` parses as a known
    architecture and weights are there. Fails naming the file, wherever it is first read (the
    driver reads it before any actor starts)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - json, unknown model_type, bad fields: one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{folder / 'config.json'}: not a model config transformers can read: {reason}"
        ) from err
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors or *.bin) beside config.json")
    return folder


def check_tokenizer_folder(folder: Path) -> Path:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); write the folder with mode=export, "
            "or name one with model.tokenizer=<hub id or directory>"
        )
    return folder
