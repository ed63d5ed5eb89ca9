"""CUDA IPC transport, for rollouts colocated with the student ranks (``cluster.colocate_rollout``):
student rank i fills one reusable GPU buffer with a bucket and hands rollout i, on the same GPU, an
IPC handle to it; no copy in between. Buckets move one at a time: rank i fills bucket k + 1 once
rollout i has applied bucket k (the driver chains the calls by their refs, so ``sync`` returns at
once, like every transport's).

A colocated rollout and student rank see the same GPU, possibly under different device indices
(each actor's CUDA_VISIBLE_DEVICES), so the receiver opens the handle on its own current device.

The chain is the same for a CPU buffer, whose "handle" is its bytes (through the object store): so
the CPU tests run every step of it but the IPC handle itself, which ``make gpu-check`` runs.
"""

from __future__ import annotations

import ray
import torch

from atesd_ray.runtime.transfer import open_shared, share
from atesd_ray.runtime.weight_sync import Synced, WeightReceiver, WeightSender, WeightTransport, take_bucket
from atesd_ray.runtime.weights import TensorSpec, bucket_bytes, flatten, unflatten


def begin(sender: WeightSender, fmt: str, buckets: list[list[TensorSpec]], allowed: bool) -> bool:
    """One GPU buffer as large as the largest bucket, and the weight stream to fill it from."""
    sender.ipc = None
    if allowed:
        buffer = torch.empty(max(map(bucket_bytes, buckets)), dtype=torch.uint8, device=sender.device)
        sender.ipc = (sender.weight_stream(fmt, sender.device), buffer)
    return allowed


def share_bucket(sender: WeightSender, bucket: list[TensorSpec], _previous_applied: object) -> tuple | None:
    """Fill the buffer with the next bucket (once the receiver has applied the one before:
    ``_previous_applied`` is its ref); a handle to it, None when the sync was refused."""
    if sender.ipc is None:
        return None
    stream, buffer = sender.ipc
    flatten(take_bucket(stream, bucket), buffer)
    return share(buffer)


def receive(
    receiver: WeightReceiver,
    handle: tuple | None,
    bucket: list[TensorSpec],
    version: int,
    first: bool,
    last: bool,
) -> int:
    """One bucket of the update to ``version`` (opened at the first, closed at the last)."""
    if handle is None:
        return receiver.weight_version
    if first:
        receiver.begin_update(version)
    if receiver.updating == version:
        buffer = open_shared(handle)
        receiver.apply_chunk(unflatten(buffer, bucket))
        if buffer.is_cuda:
            torch.cuda.synchronize()  # done reading before the sender reuses its buffer
    return receiver.finish_update(version) if last else receiver.weight_version


def end(sender: WeightSender, _last_applied: object) -> bool:
    """Free the buffer once the receiver is done with it. A freed block that another process opened
    stays in torch's IPC limbo, which ``empty_cache`` does not reach, until ``ipc_collect``: without
    it each sync's buffer would linger on a GPU shared with vLLM."""
    if sender.ipc is not None:
        on_gpu = sender.ipc[1].is_cuda
        sender.ipc = None
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
    return True


class CudaIpcSync(WeightTransport):
    """Receiver i is colocated with student rank i."""

    name = "cuda_ipc"

    def setup(self, timeout_s: float | None = None) -> None:
        super().setup(timeout_s)
        if len(self.receivers) != len(self.students):
            raise ValueError(
                f"cuda_ipc pairs student rank i with rollout i: {len(self.students)} ranks, {len(self.receivers)} receivers"
            )
        self.layout = self.buckets()

    def send(self, version: int, allowed: ray.ObjectRef, mode: str = "whole") -> Synced:
        # colocated: nothing crosses a wire, so the config allows no delta syncs here
        assert mode == "whole", "cuda_ipc moves whole syncs only"
        applied = self.students.call("weight_transfer", begin, self.format, self.layout, allowed)
        last = len(self.layout) - 1
        for k, bucket in enumerate(self.layout):
            handles = [
                s.weight_transfer.remote(share_bucket, bucket, a)
                for s, a in zip(self.students.actors, applied, strict=True)
            ]
            applied = [
                r.weight_transfer.remote(receive, h, bucket, version, k == 0, k == last)
                for r, h in zip(self.receivers, handles, strict=True)
            ]
        ended = [s.weight_transfer.remote(end, a) for s, a in zip(self.students.actors, applied, strict=True)]
        return Synced(applied, ended)


TRANSPORT = CudaIpcSync
