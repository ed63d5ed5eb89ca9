"""``mode=export``: a checkpoint's student as a Hugging Face model folder (``atesd_ray/model_folders.py``)."""

from __future__ import annotations

from pathlib import Path

from atesd_ray.config import Config
from atesd_ray.model_folders import HF_DIR, save_hf_model
from atesd_ray.models import DTYPES, load_model, load_tokenizer, synced_parameters
from atesd_ray.runtime.checkpoint import CheckpointManager, fingerprint, read_student_weights
from atesd_ray.runtime.weight_formats import stream_weights
from atesd_ray.runtime.weights import load_into


def run(cfg: Config) -> Path:
    """``mode=export``: the student of a checkpoint (``export.step``, default the latest complete one of
    ``run_dir``) as a Hugging Face folder in ``export.out`` (default ``<checkpoint>/huggingface``).
    The run's ``model=`` must be given, as for ``eval.model``: the checkpoint holds the tensors that
    trained, over that model."""
    if cfg.run_dir is None:
        raise ValueError("mode=export needs run_dir=<the training run>")
    manager = CheckpointManager(Path(cfg.run_dir), keep_last=1)
    if cfg.export.step is None:
        checkpoint = manager.latest()
    else:
        checkpoint = next((p for n, p in manager.complete() if n == cfg.export.step), None)
    if checkpoint is None:
        which = "any" if cfg.export.step is None else f"step {cfg.export.step}'s"
        raise FileNotFoundError(f"{cfg.run_dir}: no complete checkpoint ({which}) to export")
    m = cfg.model
    tokenizer = load_tokenizer(m)
    student = load_model(m, vocab_size=len(tokenizer))
    load_into(
        student,
        read_student_weights(checkpoint, fingerprint(m.name, m.lora.enabled, synced_parameters(student))),
    )
    merged = dict(stream_weights(student, "merged", DTYPES[m.dtype], "cpu", m.lora.alpha / m.lora.r))
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    out = Path(cfg.export.out) if cfg.export.out else checkpoint / HF_DIR
    save_hf_model(out, merged, base, tokenizer)
    print(f"exported {checkpoint} -> {out}", flush=True)
    return out
