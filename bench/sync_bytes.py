"""(g) Bytes per weight sync: the LoRA adapter alone (``weight_format`` "trainable", what an engine
that holds the frozen base and the adapter takes) against the merged model ("merged", what an engine
that knows nothing of PEFT takes), counted by the sync's own stream (``stream_weights(meta=True)``,
shapes only, nothing allocated). The bundled model is loaded with the run's LoRA; the Qwen3 presets
are built on the meta device from the dimensions of their Hugging Face ``config.json`` (no download),
with the presets' LoRA (r 64 on every projection).

Beside them, delta syncs without LoRA (``trainer.delta_sync``): a model fully fine-tuned a few AdamW
steps at the demo's learning rate (next-token loss on the bundled synthetic problems), each step's
sync encoded by the sync's own encoder against the one before, in float32 and in bfloat16."""

from __future__ import annotations

import dataclasses
import time

import torch

from atesd_ray.config import model_preset
from atesd_ray.data.synthetic import generate
from atesd_ray.models import DTYPES, apply_lora, load_model, load_tokenizer
from atesd_ray.runtime.weight_delta import DeltaEncoder
from atesd_ray.runtime.weight_formats import stream_weights

# (hidden, intermediate, layers, attention heads, key-value heads, head dim, vocabulary, tied head),
# from each model's config.json on the Hugging Face hub
QWEN3 = {
    "qwen3_1_7b": (2048, 6144, 28, 16, 8, 128, 151936, True),
    "qwen3_4b": (2560, 9728, 36, 32, 8, 128, 151936, True),
    "qwen3_8b": (4096, 12288, 36, 32, 8, 128, 151936, False),
}


def qwen3_on_meta(name: str) -> torch.nn.Module:
    """The preset's network with its LoRA, on the meta device."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, inter, layers, heads, kv, head_dim, vocab, tied = QWEN3[name]
    config = Qwen3Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        return apply_lora(Qwen3ForCausalLM(config), model_preset(name).lora)


def sync_bytes(model: torch.nn.Module, dtype: torch.dtype, lora_scale: float) -> dict:
    """Bytes and tensors of one sync in each format."""
    out = {}
    for fmt in ("trainable", "merged"):
        tensors = list(stream_weights(model, fmt, dtype, "meta", lora_scale, meta=True))
        out[fmt] = {"bytes": sum(t.numel() * t.element_size() for _, t in tensors), "tensors": len(tensors)}
    out["adapter_share"] = out["trainable"]["bytes"] / out["merged"]["bytes"]
    return out


def delta_rows(name: str, steps: int = 2, lr: float = 1e-5) -> list[dict]:
    """Per dtype: the share of a whole sync each step's delta sync carries, and of elements changed;
    and student rank 0's seconds to encode each delta (a bitwise compare against its record in host
    memory, the changed elements gathered, the record patched), which a whole sync does not spend."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        base = model_preset(name)
        cfg = dataclasses.replace(base, dtype=dtype, lora=dataclasses.replace(base.lora, enabled=False))
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, vocab_size=len(tokenizer))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        texts = [f"{r.problem}\n{r.reference}" for r in generate(8, seed=0)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        encoder = DeltaEncoder()
        shares, changed, encode_s = [], [], []
        for step in range(steps + 1):
            if step:
                model(**batch, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            t0 = time.perf_counter()
            for _ in encoder.encode(stream_weights(model, "trainable", DTYPES[dtype], "cpu"), step, False):
                pass
            if step:
                encode_s.append(time.perf_counter() - t0)
                shares.append(encoder.last["sent"] / encoder.last["whole"])
                changed.append(encoder.last["changed"] / encoder.last["elements"])
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "lr": lr,
                "whole_bytes": encoder.last["whole"],
                "delta_share": shares,
                "changed_share": changed,
                "encode_s": encode_s,
            }
        )
    return rows


def measure(bundled_ranks: tuple[int, ...] = (16, 64), delta_model: str = "smollm2_135m") -> dict:
    """One row per model and LoRA rank: the bundled model at ``bundled_ranks``, the Qwen3 presets at theirs."""
    rows = []
    base = model_preset("smollm2_135m")
    for r in bundled_ranks:
        cfg = dataclasses.replace(base, lora=dataclasses.replace(base.lora, enabled=True, r=r, alpha=2 * r))
        model = load_model(cfg, vocab_size=len(load_tokenizer(cfg)))
        rows.append({"model": cfg.name, "lora_r": r, "dtype": cfg.dtype, "measured": True})
        rows[-1] |= sync_bytes(model, DTYPES[cfg.dtype], cfg.lora.alpha / cfg.lora.r)
    for name in QWEN3:
        preset = model_preset(name)
        rows.append({"model": name, "lora_r": preset.lora.r, "dtype": preset.dtype, "measured": False})
        rows[-1] |= sync_bytes(qwen3_on_meta(name), DTYPES[preset.dtype], preset.lora.alpha / preset.lora.r)
    return {"rows": rows, "delta": delta_rows(delta_model)}


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=1))
