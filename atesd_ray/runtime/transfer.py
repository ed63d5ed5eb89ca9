"""The device-level pieces of the weight transports, importable without Ray (``make gpu-check``
runs them on a machine that has only PyTorch): a standalone gloo or NCCL process group, and a CUDA
IPC handle to a buffer, opened on the receiver's own device."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

_DEVICE_ARG = 6  # position of the device index in torch's rebuild_cuda_tensor arguments


class PeerLost(RuntimeError):
    """A collective operation of the weight group failed: a member died mid-sync (its connection
    closed) or never joined (the timeout). The members that are left see this, not an actor death,
    so the driver treats it as one (``atesd_ray/faults.py``): it waits for the lost member and
    builds the group again."""


def backend_group(
    backend: str, store: dist.Store, rank: int, world_size: int, timeout: timedelta
) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """A standalone gloo or NCCL group with the same timeout: a broadcast a dead peer never joins
    fails after ``timeout`` on either backend (NCCL's own default is its 10-minute watchdog)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"weight broadcast backend must be gloo or nccl, got '{backend}'")


def share(buffer: torch.Tensor) -> tuple[Callable, tuple] | torch.Tensor:
    """A picklable handle to ``buffer`` (a CPU buffer: its bytes); the sender keeps ``buffer``
    alive until the receiver is done."""
    if not buffer.is_cuda:
        return buffer.clone()
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.current_stream(buffer.device).synchronize()
    return reduce_tensor(buffer)


def open_shared(handle: tuple[Callable, tuple] | torch.Tensor) -> torch.Tensor:
    """The buffer behind ``handle``, on this process's current CUDA device: a colocated pair sees the
    same GPU under possibly different indices (each actor's CUDA_VISIBLE_DEVICES)."""
    if isinstance(handle, torch.Tensor):
        return handle
    rebuild, args = handle
    args = list(args)
    args[_DEVICE_ARG] = torch.cuda.current_device()
    return rebuild(*args)
