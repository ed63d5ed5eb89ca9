"""What every worker actor shares: process setup and receiving versioned student weights."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import torch

from atesd_ray.config import Config
from atesd_ray.console import configure_actor
from atesd_ray.models import set_torch_threads
from atesd_ray.runtime.broadcast_group import BroadcastGroup
from atesd_ray.runtime.cuda_ipc import open_shared
from atesd_ray.runtime.weights import PackedWeights, TensorSpec, bucket_bytes, flatten, unflatten, unpack


def setup_actor(cfg: Config, role: str) -> int:
    """Logging and thread settings for an actor process; returns its torch thread count."""
    configure_actor(role)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = cfg.cluster.torch_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.trainer.ranks))
    return set_torch_threads(threads)


def once_per_step(method: Callable) -> Callable:
    """For actor methods ``method(self, step, ...)`` that change state: a second call for the step
    last applied (a retried step) returns the first call's result instead of applying it again."""

    @functools.wraps(method)
    def wrapper(self, step: int, *args, **kwargs):
        done = self.__dict__.setdefault("_applied_steps", {})
        if method.__name__ in done and done[method.__name__][0] == step:
            return done[method.__name__][1]
        result = method(self, step, *args, **kwargs)
        done[method.__name__] = (step, result)
        return result

    return wrapper


class StaleWeightsError(RuntimeError):
    """A rollout was asked to run on weights older than the configured staleness allows."""


class WeightReceiver:
    """Mixin for actors that hold a copy of the student (rollout; live or EMA teacher).

    Subclasses implement ``_apply_weights`` (called once per object-store sync, once per bucket of
    a broadcast or CUDA IPC sync). ``weight_format`` says what they load
    (``atesd_ray/runtime/weight_formats.py``).
    Every sync carries a version; ``weight_version`` is the last one fully applied.
    """

    weight_version: int = 0
    payload_format: str = "trainable"

    def _apply_weights(self, named: dict[str, torch.Tensor], version: int) -> None:
        raise NotImplementedError

    def weight_format(self) -> str:
        return self.payload_format

    def receive_weights(self, packed: PackedWeights | None, version: int) -> int:
        """Apply weights newer than those held; an older or equal version is a no-op (so a resumed
        EMA teacher is not blended twice with the checkpoint's weights), and so is a sync the
        student refused (``packed`` None: see ``StudentRank.holds_version``)."""
        if packed is not None and version > self.weight_version:
            self._apply_weights(unpack(packed), version)
            self.weight_version = version
        return self.weight_version

    def join_weight_group(self, address: str, port: int, world_size: int, rank: int, backend: str) -> bool:
        self._weight_group = BroadcastGroup(address, port, rank, world_size, backend)
        return True

    def receive_broadcast(self, version: int, buckets: list[list[TensorSpec]], sent: bool = True) -> int:
        """Receive a sync bucket by bucket (``send_buckets`` on the student's rank 0). ``sent``: the
        sender's ``holds_version``, so that nobody waits in a broadcast the sender refused."""
        if not sent:
            return self.weight_version
        newer = version > self.weight_version
        for bucket in buckets:
            buffer = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=self._weight_group.device)
            self._weight_group.broadcast(buffer)  # every member joins, even to discard
            if newer:
                self._apply_weights(unflatten(buffer, bucket), version)
        if newer:
            self.weight_version = version
        return self.weight_version

    def receive_ipc(self, handle: tuple, bucket: list[TensorSpec], version: int, last: bool) -> int:
        """Apply one bucket from a colocated student rank's GPU buffer (CUDA IPC, no copy in between)."""
        if version > self.weight_version:
            self._apply_weights(unflatten(open_shared(handle), bucket), version)
            torch.cuda.synchronize()  # done reading before the sender reuses its buffer
            if last:
                self.weight_version = version
        return self.weight_version

    def leave_weight_group(self) -> bool:
        self._weight_group = None
        return True

    def get_weight_version(self) -> int:
        return self.weight_version

    def ping(self) -> bool:
        return True


def send_buckets(
    stream: Iterator[tuple[str, torch.Tensor]],
    buckets: list[list[TensorSpec]],
    group: BroadcastGroup | None,
) -> int:
    """Sender side of ``receive_broadcast``: fill and broadcast one bucket at a time.

    Every student rank walks the whole stream (gathering sharded parameters is collective); only
    the rank holding ``group`` (rank 0) sends. Returns the bytes sent.
    """
    sent = 0
    for bucket in buckets:
        named = take_bucket(stream, bucket)
        if group is not None:
            buffer = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=group.device)
            group.broadcast(flatten(named, buffer))
            sent += buffer.numel()
    return sent


def take_bucket(
    stream: Iterator[tuple[str, torch.Tensor]], bucket: list[TensorSpec]
) -> dict[str, torch.Tensor]:
    """The next ``len(bucket)`` tensors of ``stream``, checked against the bucket's layout."""
    named = {}
    for spec in bucket:
        name, tensor = next(stream)
        if name != spec.name or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"weight stream gave {name} {tuple(tensor.shape)}, the layout expects {spec.name} {spec.shape}"
            )
        named[name] = tensor
    return named
