"""One weight-sync interface, several transports (NeMo-RL style).

The training loop calls ``weight_sync.sync(version)`` and waits on the refs it returns; it never
knows how the bytes travel. Senders are the student ranks (all of them take part, since gathering
FSDP shards is collective; rank 0 sends). Receivers are rollout actors and, when the teacher is
``live`` or ``ema``, teacher actors; they implement ``workers.common.WeightReceiver``.

Transports:
- ``object_store``: rank 0 packs the weights into one numpy buffer that Ray's object store hands
  to every receiver zero-copy on the same node. The default on CPU.
- ``collective``: a broadcast from rank 0 over a standalone process group (gloo on CPU, NCCL on
  GPU); see ``broadcast_group.py`` for why it is not ``ray.util.collective``.
vLLM receivers (GPU) implement the same receiver methods; see ``workers/vllm_engine.py``.
"""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from atesd_ray.runtime.cluster import ActorGroup


class WeightSync:
    def __init__(self, students: ActorGroup, receivers: list[ActorHandle]):
        self.students = students
        self.receivers = list(receivers)

    def setup(self) -> None:
        """Called once after the actors exist."""

    def sync(self, version: int) -> list[ray.ObjectRef]:
        """Start moving the student's weights, tagged ``version``; the refs resolve when all hold it."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release transport resources (collective groups)."""


class ObjectStoreSync(WeightSync):
    def sync(self, version: int) -> list[ray.ObjectRef]:
        exported = self.students.call("export_weights", version)
        packed = exported[0]  # rank 0's PackedWeights; passed as a ref, never pulled into the driver
        return [r.receive_weights.remote(packed, version) for r in self.receivers] + exported[1:]


class CollectiveSync(WeightSync):
    def __init__(self, students: ActorGroup, receivers: list[ActorHandle], backend: str):
        super().__init__(students, receivers)
        self.backend = backend

    def setup(self) -> None:
        sender = self.students.actors[0]
        address, port = ray.get(sender.master_address.remote())
        world = 1 + len(self.receivers)
        members = [sender, *self.receivers]
        ray.get([m.join_weight_group.remote(address, port, world, rank, self.backend) for rank, m in enumerate(members)])

    def sync(self, version: int) -> list[ray.ObjectRef]:
        sent = self.students.call("broadcast_weights", version)
        return sent + [r.receive_broadcast.remote(version) for r in self.receivers]

    def teardown(self) -> None:
        ray.get([m.leave_weight_group.remote() for m in [self.students.actors[0], *self.receivers]])


def make_weight_sync(transport: str, students: ActorGroup, receivers: list[ActorHandle], backend: str) -> WeightSync:
    if transport == "object_store":
        return ObjectStoreSync(students, receivers)
    if transport == "collective":
        return CollectiveSync(students, receivers, backend)
    raise ValueError(f"trainer.weight_transport: unknown transport '{transport}'")
