"""What a weight sync carries, both ends: produced one tensor at a time from the (FSDP2-sharded)
student, and loaded by the receiver. Receivers name the format they load (``weight_format``):

- ``trainable``: the tensors that train (every weight, or only LoRA's A and B), named as in the
  student. Receivers holding the same network (HF engines, a live or EMA teacher) copy them in by
  name (``weights.load_into``).
- ``merged``, the vLLM load path: every weight of the base network under its Hugging Face name,
  LoRA merged in (W + alpha/r * B A), for engines that load checkpoints by HF name and know
  nothing of PEFT. :class:`VLLMWorkerExtension`, inside vLLM's worker, loads a whole sync as one
  in-place layerwise reload (the fused qkv/gate-up layers are filled and re-packed for the
  kernels once complete, so any bucket layout is exact) and re-packs a tied LM head, which the
  reload does not touch; the engine then drops its prefix cache, whose KV was computed with the
  old weights.

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
    """Mixed into vLLM's worker (``worker_extension_cls``); ``self`` is the worker.

    A sync loads as ONE layerwise reload, however many chunks it comes in (vLLM's own
    weight-transfer protocol does the same): :meth:`begin_weight_load` opens it, each chunk goes
    through the model's ``load_weights`` (:meth:`load_weight_chunk`), :meth:`finish_weight_load`
    closes it. vLLM processes a layer (fuses q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``,
    re-packs for the CPU kernels) once every weight of it has arrived, so a bucket boundary inside a
    fused layer is fine. A reload per chunk is not: it would rebuild the split layer from
    uninitialized memory and keep only that chunk's shards, silently.
    """

    def begin_weight_load(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        self.weights_expected = {name for name, _ in model.named_parameters()}
        self.weights_loaded: set[str] = set()
        initialize_layerwise_reload(model)

    def load_weight_chunk(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Whole tensors by Hugging Face name; returns how many were given."""
        model = self.model_runner.get_model()
        self.weights_loaded |= model.load_weights(iter(named))
        _own_pending_tensors(model, named)
        return len(named)

    def finish_weight_load(self, complete: bool = True) -> None:
        """Process the layers still waiting and re-pack a tied LM head. A load that left any
        parameter out is refused (vLLM itself would only log it) unless it is closed as abandoned
        (``complete=False``), before a new load starts over."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)
        for module in model.modules():
            # a tied head shares the embedding's tensor, but the CPU backend packed its own copy of it
            if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)
        missing = sorted(self.weights_expected - self.weights_loaded)
        if missing and complete:
            raise RuntimeError(
                f"a weight load into vLLM gave no tensor for {len(missing)} parameters, e.g. {missing[:3]}"
            )

    def push_adapter(self, peft_config: dict, tensors: dict[str, torch.Tensor], adapter_id: int) -> int:
        """Replace LoRA adapter ``adapter_id`` with ``tensors`` (PEFT names, the adapter's name left
        out), built in memory as vLLM's own loader builds one from a directory; returns their count.
        They are copied: vLLM scales B in place when it activates an adapter."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.model_runner.lora_manager
        adapters = manager._adapter_manager
        helper = PEFTHelper.from_dict(peft_config)
        helper.validate_legal(manager.lora_config)
        mapper = getattr(adapters.model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=adapter_id,
            tensors={name: t.detach().clone() for name, t in tensors.items()},
            peft_helper=helper,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
            skip_prefixes=getattr(adapters.model, "lora_skip_prefixes", None),
        )
        adapters.remove_adapter(adapter_id)
        adapters.add_adapter(lora)
        adapters.activate_adapter(adapter_id)
        return len(tensors)


def _own_pending_tensors(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> None:
    """A layer whose weights have not all arrived keeps the chunk's tensors until they have. The
    transport reuses the memory they view (a staging buffer, a CUDA IPC buffer) for the next chunk,
    so the ones kept get memory of their own."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    chunk = {t.untyped_storage().data_ptr() for _, t in named}
    for layer in model.modules():
        for _, bound in get_layerwise_info(layer).loaded_weights:
            for key, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in chunk:
                    bound.arguments[key] = value.clone()
