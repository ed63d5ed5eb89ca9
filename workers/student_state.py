"""A student rank's checkpoint: what the group writes into ``checkpoints/step_<N>/student/`` and
reads back (a mixin of :class:`workers.student.StudentRank`).

Rank 0 writes the trainable weights (safetensors), the optimizer state and every rank's RNG state
(``optimizer.pt``, read back with ``weights_only``: a checkpoint cannot run code), the scheduler and
the update count (``student_state.json``); all ranks gather. The RNG state holds the device's
generator too: LoRA dropout draws from the CUDA generator on a GPU, so a resumed run that restored
only the CPU's would draw other masks than the run it continues.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from atesd_ray.model_folders import HF_DIR, save_hf_model
from atesd_ray.runtime.checkpoint import check_fingerprint, fingerprint, load_tensors

log = logging.getLogger(__name__)


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The generators a training step draws from: the CPU's, and the device's on a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict | torch.Tensor, device: torch.device) -> None:
    """Restore :func:`rng_state` (or the bare CPU state of checkpoints written before it)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if state["cuda"] is None:
            log.warning(
                "the checkpoint holds no CUDA RNG state; dropout masks will differ from the run it continues"
            )
        else:
            torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointedRank:
    """Checkpointing of a student rank (``save``, ``load``); uses its model, optimizer, scheduler,
    device and weight stream."""

    def save(self, directory: str) -> bool:
        """Write this group's state into ``directory`` (rank 0 writes; all ranks gather)."""
        from safetensors.torch import save_file

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=options)
        optim_sd = get_optimizer_state_dict(self.policy, self.optimizer, options=options)
        rng = [None] * self.world
        dist.all_gather_object(rng, rng_state(self.device))
        merged = dict(self.weight_stream("merged", torch.device("cpu"))) if self.cfg.trainer.save_hf else None
        if self.rank == 0:
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            weights = {n: model_sd[n].contiguous() for n in self.trainable}
            save_file(weights, str(out / "student.safetensors"), metadata={"model": self.cfg.model.name})
            torch.save({"optimizer": optim_sd, "rng": rng}, out / "optimizer.pt")
            state = {
                "step": self.version,
                "scheduler": self.scheduler.state_dict(),
                "skipped_nonfinite": self.skipped_nonfinite,
                "world_size": self.world,
                "fingerprint": self._fingerprint(),
            }
            (out / "student_state.json").write_text(json.dumps(state))
            if merged is not None:  # beside student/: checkpoints/step_<N>/huggingface
                base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                save_hf_model(out.parent / HF_DIR, merged, base, self.tokenizer)
        dist.barrier()
        return True

    def load(self, directory: str) -> int:
        """Restore from a checkpoint written by :meth:`save`; code in it is never executed."""
        from safetensors.torch import load_file

        d = Path(directory)
        state = json.loads((d / "student_state.json").read_text())
        check_fingerprint(state["fingerprint"], self._fingerprint(), d)
        weights = load_file(str(d / "student.safetensors"))
        blob = load_tensors(d / "optimizer.pt")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.policy, self.optimizer, blob["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["step"]
        self.skipped_nonfinite = state["skipped_nonfinite"]
        rng = blob["rng"]
        set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0], self.device)
        return self.version

    def _fingerprint(self) -> dict:
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return fingerprint(self.cfg.model.name, self.cfg.model.lora.enabled, trainable)
