"""Handing a GPU buffer to another process on the same device, without a copy (CUDA IPC).

A colocated rollout and student rank see the same GPU, possibly under different device indices
(each actor's CUDA_VISIBLE_DEVICES), so the receiver opens the handle on its own current device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_DEVICE_ARG = 6  # position of the device index in torch's rebuild_cuda_tensor arguments


def share(buffer: torch.Tensor) -> tuple[Callable, tuple]:
    """A picklable handle to ``buffer``; the sender keeps ``buffer`` alive until the receiver is done."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.current_stream(buffer.device).synchronize()
    return reduce_tensor(buffer)


def open_shared(handle: tuple[Callable, tuple]) -> torch.Tensor:
    rebuild, args = handle
    args = list(args)
    args[_DEVICE_ARG] = torch.cuda.current_device()
    return rebuild(*args)
