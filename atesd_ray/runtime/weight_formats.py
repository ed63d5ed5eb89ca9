"""What a weight sync carries, produced one tensor at a time from the (FSDP2-sharded) student.

Receivers name the format they load (``WeightReceiver.weight_format``):

- ``trainable``: the tensors that train (every weight, or only LoRA's A and B), named as in the
  student. Receivers holding the same network (HF engines, a live or EMA teacher) copy them in by
  name.
- ``merged``: every weight of the base network under its Hugging Face name, LoRA merged in
  (W + alpha/r * B A). For engines that load checkpoints by HF name and know nothing of PEFT (vLLM).

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
