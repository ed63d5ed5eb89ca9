"""What a weight sync carries: the merged format equals PEFT's own merge under Hugging Face names,
the meta layout matches the real tensors, and buckets partition the layout within their size; how a
receiver loads it: shared (the store's memory kept, no copy) or copied."""

from __future__ import annotations

import copy

import pytest
import torch

from atesd_ray.models import load_model
from atesd_ray.runtime.weight_formats import stream_weights
from atesd_ray.runtime.weights import (
    bucket_bytes,
    flatten,
    layout,
    load_into,
    pack,
    split_buckets,
    unflatten,
    unpack,
)
from tests.conftest import make_config


def _lora_model():
    cfg = make_config("model=tiny", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")
    model = load_model(cfg.model)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; a trained adapter does not
                p.normal_(0, 0.02)
    return cfg, model


def test_merged_format_is_peft_merge_under_hf_names():
    cfg, model = _lora_model()
    scale = cfg.model.lora.alpha / cfg.model.lora.r
    merged = dict(stream_weights(model, "merged", torch.float32, "cpu", scale))
    reference = copy.deepcopy(model).merge_and_unload()
    expected = dict(reference.named_parameters())
    assert merged.keys() == expected.keys()
    assert not any("lora" in n or "base_layer" in n for n in merged)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor.detach(), rtol=1e-5, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    base = dict(model.named_parameters())[f"base_model.model.{q.removesuffix('.weight')}.base_layer.weight"]
    assert (merged[q] - base).abs().max() > 1e-4  # the adapter really is in there


def test_trainable_format_and_meta_layout():
    cfg, model = _lora_model()
    trainable = dict(stream_weights(model, "trainable", torch.bfloat16, "cpu"))
    assert list(trainable) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n and t.dtype == torch.bfloat16 for n, t in trainable.items())
    for fmt in ("trainable", "merged"):
        real = layout(dict(stream_weights(model, fmt, torch.float32, "cpu", 2.0)))
        meta = layout(dict(stream_weights(model, fmt, torch.float32, "meta", 2.0, meta=True)))
        assert real == meta


def test_buckets_partition_the_layout():
    _, model = _lora_model()
    named = dict(stream_weights(model, "merged", torch.float32, "cpu", 2.0))
    specs = layout(named)
    limit = 64 << 10
    buckets = split_buckets(specs, limit)
    assert len(buckets) > 1
    assert [s.name for b in buckets for s in b] == [s.name for s in specs]
    for bucket in buckets:  # within the limit, unless one tensor alone exceeds it
        assert bucket_bytes(bucket) <= limit or len(bucket) == 1
        assert bucket[0].offset == 0
        restored = unflatten(flatten({s.name: named[s.name] for s in bucket}), bucket)
        assert all(torch.equal(restored[s.name], named[s.name]) for s in bucket)


def test_a_shared_load_keeps_the_senders_memory_and_a_later_copy_never_writes_it():
    cfg = make_config("model=tiny")
    sender, receiver = load_model(cfg.model), load_model(cfg.model)
    with torch.no_grad():
        for p in sender.parameters():
            p.add_(0.5)
    shared = unpack(pack(dict(stream_weights(sender, "trainable", torch.float32, "cpu"))))
    load_into(receiver, shared, share=True)
    mine = dict(receiver.named_parameters())
    assert all(mine[n].data_ptr() == t.data_ptr() for n, t in shared.items())
    # a tied output head is the same parameter, so it follows the embedding
    assert (
        receiver.get_output_embeddings().weight.data_ptr()
        == receiver.get_input_embeddings().weight.data_ptr()
    )
    kept = {n: t.clone() for n, t in shared.items()}
    load_into(receiver, {n: torch.zeros_like(t) for n, t in shared.items()})
    assert all(torch.equal(shared[n], kept[n]) for n in shared)  # the shared memory is untouched
    assert all(mine[n].abs().max() == 0 and mine[n].data_ptr() != shared[n].data_ptr() for n in shared)


@pytest.mark.parametrize("name", ["qwen3_1_7b", "qwen3_4b", "qwen3_8b"])
def test_an_adapter_sync_of_a_qwen3_preset_is_under_5_percent_of_the_merged_one(name):
    """Counted by the sync's own stream on the preset's network on the meta device: the adapter
    (r 64 on every projection) against every base weight with it merged in."""

    from bench.sync_bytes import qwen3_on_meta, sync_bytes

    model = qwen3_on_meta(name)
    counted = sync_bytes(model, torch.bfloat16, 2.0)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counted["merged"]["bytes"] == 2 * base and counted["trainable"]["bytes"] == 2 * adapter
    assert counted["adapter_share"] <= 0.05
