"""One weight-sync interface, several transports (NeMo-RL style).

The training loop calls ``weight_sync.sync(version)`` and waits on the refs it returns; it never
knows how the bytes travel. Senders are the student ranks (all of them take part, since gathering
FSDP shards is collective; rank 0 sends). Receivers are rollout actors and, when the teacher is
``live`` or ``ema``, teacher actors; they implement ``workers.common.WeightReceiver`` and name the
format they load (``weight_formats.py``: the student's trainable tensors for HF engines, full
weights with LoRA merged for vLLM).

Transports:
- ``object_store``: rank 0 packs the weights into one numpy buffer that Ray's object store hands
  to every receiver zero-copy on the same node. The default on CPU.
- ``collective``: a broadcast from rank 0 over a standalone process group (gloo on CPU, NCCL on
  GPU; see ``broadcast_group.py`` for why it is not ``ray.util.collective``), in buckets of at
  most ``trainer.weight_bucket_mb``, gathered parameter by parameter, so neither side ever holds a
  second full copy of the model.
- ``cuda_ipc``: for rollouts colocated with the student ranks (``cluster.colocate_rollout``):
  student rank i fills a GPU bucket buffer and hands rollout i (same GPU) a CUDA IPC handle to it.
"""

from __future__ import annotations

import ray
from ray.actor import ActorHandle

from atesd_ray.runtime.cluster import ActorGroup
from atesd_ray.runtime.weights import split_buckets


class WeightSync:
    def __init__(self, students: ActorGroup, receivers: list[ActorHandle], bucket_bytes: int = 512 << 20):
        self.students = students
        self.receivers = list(receivers)
        self.bucket_bytes = bucket_bytes
        self.format = "trainable"

    def setup(self) -> None:
        """Called once after the actors exist: agree on the payload format."""
        formats = set(ray.get([r.weight_format.remote() for r in self.receivers]))
        if len(formats) > 1:
            raise ValueError(
                f"weight receivers want different formats {sorted(formats)} (an HF engine beside a vLLM one); "
                "use the same engine for the rollout and a live/EMA teacher, or teacher.weights=frozen"
            )
        self.format = formats.pop() if formats else "trainable"

    def _buckets(self) -> list:
        specs = ray.get(self.students.actors[0].weight_layout.remote(self.format))
        return split_buckets(specs, self.bucket_bytes)

    def sync(self, version: int) -> list[ray.ObjectRef]:
        """Start moving the student's weights, tagged ``version`` (the student's update count: a sync
        behind an update that failed moves nothing); the refs resolve when all hold it."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release transport resources (process groups, buffers)."""


class ObjectStoreSync(WeightSync):
    def sync(self, version: int) -> list[ray.ObjectRef]:
        exported = self.students.call("export_weights", version, self.format)
        packed = exported[0]  # rank 0's PackedWeights; passed as a ref, never pulled into the driver
        return [r.receive_weights.remote(packed, version) for r in self.receivers] + exported[1:]


class CollectiveSync(WeightSync):
    def __init__(
        self, students: ActorGroup, receivers: list[ActorHandle], backend: str, bucket_bytes: int = 512 << 20
    ):
        super().__init__(students, receivers, bucket_bytes)
        self.backend = backend

    def setup(self) -> None:
        super().setup()
        sender = self.students.actors[0]
        address, port = ray.get(sender.master_address.remote())
        world = 1 + len(self.receivers)
        members = [sender, *self.receivers]
        ray.get(
            [
                m.join_weight_group.remote(address, port, world, rank, self.backend)
                for rank, m in enumerate(members)
            ]
        )
        self.buckets = ray.put(self._buckets())  # the layout travels once, by reference

    def sync(self, version: int) -> list[ray.ObjectRef]:
        allowed = self.students.actors[0].holds_version.remote(version)
        sent = self.students.call("broadcast_weights", version, self.format, self.buckets)
        return sent + [r.receive_broadcast.remote(version, self.buckets, allowed) for r in self.receivers]

    def teardown(self) -> None:
        ray.get([m.leave_weight_group.remote() for m in [self.students.actors[0], *self.receivers]])


class CudaIpcSync(WeightSync):
    """Receiver i is colocated with student rank i; buckets move one at a time through a reused buffer."""

    def setup(self) -> None:
        super().setup()
        if len(self.receivers) != len(self.students):
            raise ValueError(
                f"cuda_ipc pairs student rank i with rollout i: {len(self.students)} ranks, {len(self.receivers)} receivers"
            )
        self.buckets = self._buckets()

    def sync(self, version: int) -> list[ray.ObjectRef]:
        if not all(ray.get(self.students.call("holds_version", version))):
            return []
        ray.get(self.students.call("ipc_begin", self.format, self.buckets))
        last = len(self.buckets) - 1
        for k, bucket in enumerate(self.buckets):
            handles = self.students.call("ipc_share_bucket", bucket)
            ray.get(
                [
                    r.receive_ipc.remote(h, bucket, version, k == last)
                    for r, h in zip(self.receivers, handles, strict=True)
                ]
            )
        return self.students.call("ipc_end")


def make_weight_sync(
    transport: str,
    students: ActorGroup,
    receivers: list[ActorHandle],
    backend: str,
    bucket_bytes: int = 512 << 20,
) -> WeightSync:
    if transport == "object_store":
        return ObjectStoreSync(students, receivers, bucket_bytes)
    if transport == "collective":
        return CollectiveSync(students, receivers, backend, bucket_bytes)
    if transport == "cuda_ipc":
        return CudaIpcSync(students, receivers, bucket_bytes)
    raise ValueError(f"trainer.weight_transport: unknown transport '{transport}'")
