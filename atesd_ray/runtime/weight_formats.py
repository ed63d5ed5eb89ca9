"""What a weight sync carries, both ends: produced one tensor at a time from the (FSDP2-sharded)
student, and loaded by the receiver. Receivers name the format they load (``weight_format``):

- ``trainable``: the tensors that train (every weight, or only LoRA's A and B), named as in the
  student. Receivers holding the same network (HF engines, a live or EMA teacher) copy them in by
  name (``weights.load_into``).
- ``merged``, the vLLM load path: every weight of the base network under its Hugging Face name,
  LoRA merged in (W + alpha/r * B A), for engines that load checkpoints by HF name and know
  nothing of PEFT. :func:`load_merged` loads them with vLLM's own in-place reload
  (``reload_weights(is_checkpoint_format=True)``: the fused qkv/gate-up layers are filled and
  re-packed for the CPU GEMM kernels; a partial bucket is fine), re-packs a tied LM head, which the
  reload does not touch (:class:`VLLMWorkerExtension`, inside vLLM's worker), and drops the prefix
  cache, whose KV was computed with the old weights.

Parameters are gathered one at a time (``DTensor.full_tensor``, a collective every rank joins in
the same order), so a bucketed sync holds one bucket at a time instead of a second copy of the
model. ``meta=True`` yields shape-only tensors: the layout of a sync, without gathering anything.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

FORMATS = ("trainable", "merged")
PEFT_PREFIX = "base_model.model."
_LORA_PARTS = {".lora_A.": "A", ".lora_B.": "B"}


def _lora_part(name: str) -> tuple[str, str] | None:
    """(module, part) for a LoRA tensor or a base-layer weight, else None."""
    for marker, part in _LORA_PARTS.items():
        if marker in name:
            return name.split(marker)[0], part
    if name.endswith(".base_layer.weight"):
        return name.removesuffix(".base_layer.weight"), "W"
    if "lora_" in name:
        raise ValueError(
            f"weight sync cannot merge LoRA tensor '{name}' (only lora_A/lora_B on linear layers)"
        )
    return None


def stream_weights(
    model: nn.Module,
    fmt: str,
    dtype: torch.dtype,
    device: torch.device | str,
    lora_scale: float = 1.0,
    meta: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor in ``dtype`` on ``device``) in a fixed order, for the format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format '{fmt}'; allowed: {', '.join(FORMATS)}")

    def whole(p: torch.Tensor) -> torch.Tensor:
        if meta:
            return torch.empty(p.shape, dtype=dtype, device="meta")
        if isinstance(p, DTensor):
            # one rank holds the whole tensor: gathering it would only copy it
            p = p.to_local() if p.device_mesh.size() == 1 else p.full_tensor()
        return p.detach().to(device)

    if fmt == "trainable":
        for name, p in model.named_parameters():
            if p.requires_grad:
                yield name, whole(p).to(dtype)
        return
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        hf_name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.bias", ".bias")
        part = _lora_part(hf_name)
        if part is None:
            yield hf_name, whole(p).to(dtype)
            continue
        module, kind = part
        parts = pending.setdefault(module, {})
        parts[kind] = whole(p)
        if len(parts) == 3:
            del pending[module]
            merged = parts["W"].float() + lora_scale * (parts["B"].float() @ parts["A"].float())
            yield f"{module}.weight", merged.to(dtype)
    if pending:
        raise ValueError(f"LoRA layers without all of base weight, A and B: {sorted(pending)[:3]}")


class VLLMWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); ``self`` is the worker."""

    def load_hf_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Load whole tensors by Hugging Face name, in place; returns how many were given."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        for module in self.model_runner.get_model().modules():
            # a tied head shares the embedding's tensor, but the CPU backend packed its own copy of it
            if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)
        return len(named)


def load_merged(llm, named: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Whole tensors by Hugging Face name (all of them or one bucket) into a ``vllm.LLM`` running in
    this process, in place; then its prefix cache is reset."""
    llm.collective_rpc("load_hf_weights", args=([(n, t.to(dtype)) for n, t in named.items()],))
    llm.reset_prefix_cache()
