"""What every worker actor shares: process setup and receiving versioned student weights."""

from __future__ import annotations

import logging
import os

import torch

from atesd_ray.config import Config
from atesd_ray.models import set_torch_threads
from atesd_ray.runtime.broadcast_group import BroadcastGroup
from atesd_ray.runtime.weights import PackedWeights, flatten, layout, unflatten, unpack


def setup_actor(cfg: Config, role: str) -> int:
    """Logging and thread settings for an actor process; returns its torch thread count."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = cfg.cluster.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.trainer.ranks))
    return set_torch_threads(threads)


class StaleWeightsError(RuntimeError):
    """A rollout was asked to run on weights older than the configured staleness allows."""


class WeightReceiver:
    """Mixin for actors that hold a copy of the student (rollout; live or EMA teacher).

    Subclasses implement ``_synced_parameters`` (the tensors the student sends, in its order and
    dtype) and ``_apply_weights``. Every sync carries a version; ``weight_version`` is the last one
    applied.
    """

    weight_version: int = 0

    def _synced_parameters(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply_weights(self, named: dict[str, torch.Tensor], version: int) -> None:
        raise NotImplementedError

    def receive_weights(self, packed: PackedWeights, version: int) -> int:
        """Apply weights newer than those held; an older or equal version is a no-op (so a resumed
        EMA teacher is not blended twice with the checkpoint's weights)."""
        if version > self.weight_version:
            self._apply_weights(unpack(packed), version)
            self.weight_version = version
        return self.weight_version

    def join_weight_group(self, address: str, port: int, world_size: int, rank: int, backend: str) -> bool:
        self._weight_group = BroadcastGroup(address, port, rank, world_size, backend)
        return True

    def receive_broadcast(self, version: int) -> int:
        specs = layout(self._synced_parameters())
        buffer = torch.empty(sum(s.nbytes for s in specs), dtype=torch.uint8)
        self._weight_group.broadcast(buffer)  # every member joins, even to discard
        if version > self.weight_version:
            self._apply_weights(unflatten(buffer, specs), version)
            self.weight_version = version
        return self.weight_version

    def leave_weight_group(self) -> bool:
        self._weight_group = None
        return True

    def get_weight_version(self) -> int:
        return self.weight_version

    def ping(self) -> bool:
        return True


def send_broadcast(named: dict[str, torch.Tensor], group: BroadcastGroup) -> int:
    """Sender side of ``receive_broadcast``: one flat buffer from group rank 0."""
    buffer = flatten(named)
    group.broadcast(buffer)
    return int(buffer.numel())
