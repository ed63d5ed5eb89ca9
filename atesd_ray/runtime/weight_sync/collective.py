"""Collective transport: a broadcast from student rank 0 to the receivers over a process group of
their own (gloo on CPU, NCCL on GPU), in buckets of at most ``trainer.weight_bucket_mb``, gathered
one parameter at a time, so neither side ever holds a second full copy of the model. Each member
stages every bucket in one buffer it keeps for the group's life: a buffer allocated per sync is
fresh memory whose first touch (page faults) costs several times the copy itself on CPU.

The student ranks already form torch.distributed's default group (FSDP2), and a process can hold
only one default group; ``ray.util.collective``'s gloo backend would try to create a second one.
So the broadcast gets a standalone ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` on its own
TCPStore, the way RL frameworks join trainer rank 0 with inference engines.

With delta syncs (``trainer.delta_sync``) a sync's layout is only known once rank 0 has encoded it:
every rank walks the stream first (:func:`encode`), rank 0 keeping the encoded tensors, whose
buckets the receivers then take; rank 0 broadcasts them (:func:`send_encoded`). Rank 0 then holds,
in host memory, its record of the last sync (one copy of the weights), which the tensors it sends
whole are, and the changed elements beside it.
"""

from __future__ import annotations

from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from atesd_ray.runtime.cluster import free_port
from atesd_ray.runtime.transfer import PeerLost, backend_group
from atesd_ray.runtime.weight_sync import Synced, WeightReceiver, WeightSender, WeightTransport, take_bucket
from atesd_ray.runtime.weights import TensorSpec, bucket_bytes, flatten, layout, split_buckets, unflatten


class BroadcastGroup:
    def __init__(
        self, address: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0
    ):
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        self.rank = rank
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        self.group = backend_group(backend, self.store, rank, world_size, timeout)
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)

    def close(self) -> None:
        """Abort the communicator: a broadcast still pending on it (a peer died mid-sync; an NCCL
        wait does not block the host) is cancelled instead of holding up the next group's first one."""
        self.group.abort()
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of this member's staging buffer (grown to the largest bucket once)."""
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._staging[:nbytes]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``tensor`` in place from ``src`` (moved to the group's device and back)."""
        on_device = tensor.to(self.device)
        options = dist.BroadcastOptions()
        options.rootRank = src
        try:
            self.group.broadcast([on_device], options).wait()
        except RuntimeError as err:  # gloo: "Connection closed by peer", a timeout; NCCL: an abort
            raise PeerLost(f"the weight group's broadcast failed on member {self.rank}: {err}") from err
        if on_device is not tensor:
            tensor.copy_(on_device)
        return tensor


def address(_member: WeightSender) -> tuple[str, int]:
    """The sender's node address and a free port there, for the group's store."""
    return ray.util.get_node_ip_address(), free_port()


def join(
    member: WeightSender | WeightReceiver, address: str, port: int, world: int, rank: int, backend: str
) -> bool:
    member.weight_group = BroadcastGroup(address, port, rank, world, backend)
    return True


def leave(member: WeightSender | WeightReceiver) -> bool:
    group = getattr(member, "weight_group", None)
    if group is not None:
        group.close()
    member.weight_group = None
    return True


def send(sender: WeightSender, fmt: str, buckets: list[list[TensorSpec]], allowed: bool) -> int:
    """Every student rank walks the whole stream (gathering sharded parameters is collective);
    rank 0, the group's member, fills and broadcasts one bucket at a time. Returns the bytes sent."""
    if not allowed:
        return 0
    group = getattr(sender, "weight_group", None) if sender.rank == 0 else None
    stream = sender.weight_stream(fmt, group.device if group is not None else sender.device)
    sent = 0
    for bucket in buckets:
        named = take_bucket(stream, bucket)
        if group is not None:
            buffer = group.staging(bucket_bytes(bucket))
            group.broadcast(flatten(named, buffer))
            sent += buffer.numel()
    return sent


def encode(
    sender: WeightSender, fmt: str, allowed: bool, version: int, mode: str, max_bytes: int
) -> list[list[TensorSpec]] | None:
    """Every rank walks the stream (gathering is collective); rank 0 keeps the encoded sync for
    :func:`send_encoded` and returns its buckets, the others None. Rank 0 keeps it in host
    memory, beside its record of the last sync sent, not on the GPU."""
    if not allowed:
        return None
    device = torch.device("cpu") if sender.rank == 0 else sender.device
    named = dict(sender.sync_stream(fmt, device, version, mode))
    if sender.rank != 0:
        return None
    sender.encoded = named
    return split_buckets(layout(named), max_bytes)


def send_encoded(sender: WeightSender, buckets: list[list[TensorSpec]] | None) -> int:
    """Rank 0 broadcasts the sync :func:`encode` kept, one bucket at a time; returns the bytes sent."""
    if buckets is None:
        return 0
    stream, sender.encoded = iter(sender.encoded.items()), None
    group, sent = sender.weight_group, 0
    for bucket in buckets:
        buffer = group.staging(bucket_bytes(bucket))
        group.broadcast(flatten(take_bucket(stream, bucket), buffer))
        sent += buffer.numel()
    return sent


def receive(
    receiver: WeightReceiver,
    version: int,
    buckets: list[list[TensorSpec]],
    allowed: bool,
    mode: str = "whole",
) -> int:
    """Bucket by bucket, as one update; every member joins each broadcast, even to discard an old
    version."""
    if not allowed or buckets is None:
        return receiver.weight_version
    newer = receiver.begin_update(version, again=mode == "full")
    group = receiver.weight_group
    for bucket in buckets:
        buffer = group.staging(bucket_bytes(bucket))
        group.broadcast(buffer)
        if newer:
            receiver.apply_chunk(unflatten(buffer, bucket))
    return receiver.finish_update(version)


class CollectiveSync(WeightTransport):
    name = "collective"

    def setup(self, timeout_s: float | None = None) -> None:
        super().setup(timeout_s)
        sender = self.students.actors[0]
        host, port = ray.get(sender.weight_transfer.remote(address), timeout=timeout_s)
        members = [sender, *self.receivers]
        ray.get(
            [
                m.weight_transfer.remote(join, host, port, len(members), rank, self.backend)
                for rank, m in enumerate(members)
            ],
            timeout=timeout_s,
        )
        self.layout = ray.put(self.buckets())  # the layout travels once, by reference

    def send(self, version: int, allowed: ray.ObjectRef, mode: str = "whole") -> Synced:
        if mode == "whole":
            sent = self.students.call("weight_transfer", send, self.format, self.layout, allowed)
            held = [r.weight_transfer.remote(receive, version, self.layout, allowed) for r in self.receivers]
            return Synced(held, sent)
        encoded = self.students.call(
            "weight_transfer", encode, self.format, allowed, version, mode, self.bucket_bytes
        )
        sent = self.students.actors[0].weight_transfer.remote(send_encoded, encoded[0])
        held = [r.weight_transfer.remote(receive, version, encoded[0], allowed, mode) for r in self.receivers]
        return Synced(held, [sent, *encoded[1:]])

    def teardown(self, timeout_s: float | None = None) -> None:
        members = [self.students.actors[0], *self.receivers]
        ray.get([m.weight_transfer.remote(leave) for m in members], timeout=timeout_s)


TRANSPORT = CollectiveSync
