"""Object-store transport: student rank 0 packs the weights into one numpy buffer (``weights.pack``),
which Ray's object store hands to every receiver, zero-copy on the same node; a receiver that only
reads its weights keeps the store's memory as its parameters (no copy at all on the way in; the
store keeps an object while any tensor views it). The default on CPU."""

from __future__ import annotations

import ray
import torch

from atesd_ray.runtime.weight_sync import Synced, WeightReceiver, WeightSender, WeightTransport
from atesd_ray.runtime.weights import PackedWeights, pack, unpack


def export(sender: WeightSender, fmt: str, allowed: bool, version: int, mode: str) -> PackedWeights | None:
    """Every rank gathers (a collective); rank 0 returns the packed sync, the others None."""
    if not allowed:
        return None
    named = dict(sender.sync_stream(fmt, torch.device("cpu"), version, mode))
    return pack(named) if sender.rank == 0 else None


def receive(receiver: WeightReceiver, packed: PackedWeights | None, version: int, mode: str = "whole") -> int:
    """The whole sync as one chunk; a refused sync (``packed`` None) changes nothing. Weights that
    deltas will patch are not the store's read-only memory: only a sync without deltas is shared."""
    if packed is not None and receiver.begin_update(version, again=mode == "full"):
        receiver.apply_chunk(unpack(packed), shared=mode == "whole")
    return receiver.finish_update(version)


class ObjectStoreSync(WeightTransport):
    name = "object_store"

    def send(self, version: int, allowed: ray.ObjectRef, mode: str = "whole") -> Synced:
        exported = self.students.call("weight_transfer", export, self.format, allowed, version, mode)
        # rank 0's buffer travels as a ref from the student to the receivers, never through the driver
        received = [r.weight_transfer.remote(receive, exported[0], version, mode) for r in self.receivers]
        return Synced(received, exported[1:])


TRANSPORT = ObjectStoreSync
