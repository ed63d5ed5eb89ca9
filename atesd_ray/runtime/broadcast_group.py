"""A process group of its own between the student's rank 0 and the weight receivers.

The student ranks already form torch.distributed's default group (FSDP2), and a process can hold
only one default group; ``ray.util.collective``'s gloo backend would try to create a second one.
So the weight broadcast gets a standalone ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU)
built on its own TCPStore, the way RL frameworks join trainer rank 0 with inference engines.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class BroadcastGroup:
    def __init__(
        self, address: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0
    ):
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        self.rank = rank
        self.device = torch.device("cpu")
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        elif backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        else:
            raise ValueError(f"weight broadcast backend must be gloo or nccl, got '{backend}'")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``tensor`` in place from ``src`` (moved to the group's device and back)."""
        on_device = tensor.to(self.device)
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.group.broadcast([on_device], options).wait()
        if on_device is not tensor:
            tensor.copy_(on_device)
        return tensor
