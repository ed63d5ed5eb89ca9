"""One weight-sync interface, several transports (NeMo-RL style).

The training loop calls ``weight_sync.sync(version)`` and waits on what it returns (:class:`Synced`:
the version each receiver then holds, as the receiver reports it); it never knows how the bytes
travel. Each transport is one module of this package holding its three sides:
the driver's :class:`WeightTransport` subclass (``TRANSPORT``), and the functions it runs inside the
student ranks (senders) and inside the receivers, through their ``weight_transfer`` method:

- ``object_store``: rank 0 packs the weights into one numpy buffer that Ray's object store hands
  to every receiver zero-copy on the same node. The default on CPU.
- ``collective``: a broadcast from rank 0 over a process group of its own (gloo on CPU, NCCL on
  GPU), in buckets of at most ``trainer.weight_bucket_mb``.
- ``cuda_ipc``: rollouts colocated with the student ranks read student rank i's GPU bucket buffer
  through a CUDA IPC handle.

Senders are the student ranks (:class:`WeightSender`; all take part, since gathering FSDP shards
is collective). Receivers are rollout actors and, when the teacher is ``live`` or ``ema``, teacher
actors (:class:`WeightReceiver`); they name the format they load
(``atesd_ray/runtime/weight_formats.py``: the trainable tensors for HF engines, whole weights with
LoRA merged for vLLM).

With ``trainer.delta_sync`` a sync may carry only what changed since the last one
(``atesd_ray/runtime/weight_delta.py``): the transport asks for a full sync after every
:meth:`WeightTransport.setup` (a receiver (re)joined) and every ``trainer.full_sync_every``
versions, and a delta in between; the tensors travel the same way either way.

Every sync carries a version: the student's update count. A sync of a version the student does not
hold (the update behind it failed) is refused the same way by every transport: its refs resolve as
usual, nothing moves, and every receiver keeps and answers the version it holds; the step then
fails on the update's own error.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import ray
import torch
from ray.actor import ActorHandle

from atesd_ray.runtime.weight_delta import DeltaEncoder, DeltaReader, Parts
from atesd_ray.runtime.weights import TensorSpec, layout, split_buckets

if TYPE_CHECKING:
    from atesd_ray.runtime.cluster import ActorGroup

log = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "collective", "cuda_ipc")


class StaleWeightsError(RuntimeError):
    """A rollout was asked to run on weights older than the configured staleness allows."""


@dataclass(frozen=True)
class WeightCheck:
    """The student's temperature-1 log-probs of one fixed short sequence at weight ``version``: a
    receiver holding the same version scores the sequence too, and the two must agree to rounding
    noise. It checks every sync as it lands, whatever the transport and however stale the rollouts."""

    version: int
    prompt: list[int]
    response: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Synced:
    """A sync under way: ``held``, per receiver, a ref to the version it holds once the sync is
    done (the receivers own their version); ``senders``, the student ranks' side, to wait on too.
    A delta sync also holds ``whole``: the same version sent again whole, for when a receiver is
    left behind (it held other weights than the delta's base). ``allowed`` is rank 0's
    ``holds_version``; when it refused the sync, ``refused`` is called (nothing moved)."""

    held: list[ray.ObjectRef]
    senders: list[ray.ObjectRef]
    version: int | None = None
    whole: Callable[[], Synced] | None = None
    allowed: ray.ObjectRef | None = None
    refused: Callable[[], None] | None = None

    def get(self) -> list[int]:
        """Wait for both sides; the versions the receivers hold."""
        ray.get(self.senders)
        held = ray.get(self.held)
        if self.allowed is not None and not ray.get(self.allowed):
            if self.refused is not None:
                self.refused()
            return held
        if self.whole is not None and any(h < self.version for h in held):
            log.warning(
                "a receiver missed the delta sync of v%d (it holds v%d): sending it whole",
                self.version,
                min(held),
            )
            return self.whole().get()
        return held


class WeightSender:
    """Mixin of a student rank. Subclasses set ``rank``, ``device`` and ``version`` (the optimizer
    steps applied: the version of the weights it holds) and implement :meth:`weight_stream`."""

    rank: int
    device: torch.device
    version: int
    delta: DeltaEncoder | None = None  # rank 0's record of the last sync sent (delta syncs only)

    def weight_stream(
        self, fmt: str, device: torch.device, meta: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors a sync in format ``fmt`` carries, whole, one at a time, in a fixed order."""
        raise NotImplementedError

    def sync_stream(
        self, fmt: str, device: torch.device, version: int, mode: str
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """What a sync at ``version`` carries, in ``mode`` (``weight_delta.MODES``): every rank walks
        the whole stream (gathering is collective); rank 0's is encoded as a delta or kept for one."""
        stream = self.weight_stream(fmt, device)
        if mode == "whole" or self.rank != 0:
            return stream
        self.delta = self.delta or DeltaEncoder()
        return self.delta.encode(stream, version, full=mode == "full")

    def weight_check(self) -> WeightCheck:
        """This rank's :class:`WeightCheck` at the weights it holds (every rank joins)."""
        raise NotImplementedError

    def weight_layout(self, fmt: str) -> list[TensorSpec]:
        """Names, shapes and dtypes of a sync in format ``fmt`` (from metadata; no gathering)."""
        return layout(dict(self.weight_stream(fmt, torch.device("meta"), meta=True)))

    def holds_version(self, version: int) -> bool:
        """Whether a sync tagged ``version`` may go out: it must carry the weights after ``version`` updates."""
        if version != self.version:
            log.warning(
                "sync of version %d refused: the weights are those after %d updates", version, self.version
            )
        return version == self.version

    def weight_transfer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a transport's sender-side ``fn(self, *args)`` in this actor."""
        return fn(self, *args)


class WeightReceiver:
    """Mixin of an actor holding a copy of the student (rollout; live or EMA teacher).

    A sync reaches it as one update, whatever the transport: :meth:`begin_update`, then
    :meth:`apply_chunk` once per chunk (the whole sync on the object store, one bucket of a
    broadcast or a CUDA IPC hand-off), then :meth:`finish_update`. The receiver owns its version:
    ``weight_version`` is the last version fully applied: set by :meth:`finish_update`, and by
    the loads that put a checkpoint's weights in place (a resume, a restart) and a rewind. An
    engine that must see a sync whole (vLLM re-packs fused layers once all of a layer's weights are
    in) opens its load in :meth:`open_weights` and closes it in :meth:`close_weights`.

    Subclasses implement :meth:`apply_weights` (whole tensors), :meth:`apply_delta` when they take
    delta syncs, and set ``payload_format``.
    """

    device: torch.device  # of its models (``runtime/devices.py``)
    threads: int
    weight_version: int = 0
    payload_format: str = "trainable"
    updating: int | None = None  # the version of an update begun and not finished
    reader: DeltaReader | None = None  # the update's: whole tensors and delta pairs apart
    mirrors_student: bool = True  # holds the student's weights as synced (an EMA teacher does not)

    def begin_update(self, version: int, again: bool = False) -> bool:
        """Open an update to ``version``; False (nothing to apply) when it is not newer than what is
        held, so a resumed EMA teacher is not blended twice, unless ``again``: the full sync a delta
        sync builds on is taken even of the version held (an engine keeps its record of it). An
        update left unfinished (its sender died mid-sync) is dropped: the new one carries every
        weight again."""
        if version < self.weight_version or (version == self.weight_version and not again):
            return False
        if self.updating is not None:
            log.warning("update to v%d was interrupted; starting over with v%d", self.updating, version)
        self.updating = version
        self.reader = DeltaReader(self.weight_version)
        self.open_weights()
        return True

    def finish_update(self, version: int) -> int:
        """Close the update to ``version`` (if one is open); returns the version now held."""
        if self.updating == version and self.reader.behind:
            return self.weight_version  # left open: the whole sync that follows starts it over
        if self.updating == version:
            self.reader.finish()
            self.close_weights()
            self.weight_version, self.updating = version, None
        return self.weight_version

    def open_weights(self) -> None:
        """Called before the first chunk of an update."""

    def close_weights(self) -> None:
        """Called after the last chunk of an update."""

    def apply_chunk(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        """One chunk of the update begun (``shared`` as in :meth:`apply_weights`): its whole tensors
        and its delta pairs."""
        whole, parts = self.reader.split(named)
        if whole:
            self.apply_weights(whole, shared)
        if parts:
            self.apply_delta(parts)

    def apply_delta(self, parts: Parts) -> None:
        """Tensors of a delta sync by name: (flat positions, new values there)."""
        raise NotImplementedError(f"{type(self).__name__} does not take delta syncs")

    def apply_weights(self, named: dict[str, torch.Tensor], shared: bool = False) -> None:
        """Whole tensors of an update. ``shared``: ``named`` views read-only memory that lives as long
        as its tensors (the object store's); a receiver that only reads its weights may keep the
        tensors instead of copying them. Otherwise the memory is the transport's and is reused
        once this returns."""
        raise NotImplementedError

    def check_weights(self, min_version: int, who: str, what: str = "") -> None:
        """Refuse to serve on weights older than ``min_version``, or half-updated ("{who} holds
        weights v1, {what} needs >= v2")."""
        if self.updating is not None:
            raise StaleWeightsError(
                f"{who}: the update to v{self.updating} did not finish, so its weights are incomplete"
            )
        if self.weight_version < min_version:
            need = f"{what} needs" if what else "needs"
            raise StaleWeightsError(f"{who} holds weights v{self.weight_version}, {need} >= v{min_version}")

    def score_check(self, prompt: list[int], response: list[int]) -> list[float]:
        """Temperature-1 log-probs of ``response`` after ``prompt`` under the weights held."""
        raise NotImplementedError

    def verify_weights(self, check: WeightCheck) -> float | None:
        """Mean |log p_mine - log p_student| over the check sequence, when this receiver should hold
        the weights ``check`` was taken at; None when it holds other weights by design."""
        if not self.mirrors_student or self.updating is not None or self.weight_version != check.version:
            return None
        mine = self.score_check(check.prompt, check.response)
        gaps = [abs(a - b) for a, b in zip(mine, check.logprobs, strict=True)]
        return math.fsum(gaps) / max(1, len(gaps))

    def weight_format(self) -> str:
        return self.payload_format

    def weight_transfer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a transport's receiver-side ``fn(self, *args)`` in this actor."""
        return fn(self, *args)

    def get_weight_version(self) -> int:
        return self.weight_version

    def rewind_version(self, version: int) -> int:
        """Count the weights held as ``version``, an older one, so that the next sync applies the
        same weights again: for a benchmark timing repeated syncs of one version."""
        if version > self.weight_version:
            raise ValueError(f"rewinding to v{version}, newer than the v{self.weight_version} held")
        self.weight_version = version
        return version

    def placement(self) -> dict:
        """Where this actor's models live and how many threads it runs (``topology.json``)."""
        return {"device": str(self.device), "threads": self.threads}

    def ping(self) -> bool:
        return True


class WeightTransport:
    """The driver's side of a transport: ``sync(version)`` starts moving the weights; its
    :class:`Synced` says, once done, what every receiver holds (``version``, or after a refused
    sync what it held before)."""

    name: ClassVar[str]

    def __init__(
        self,
        students: ActorGroup,
        receivers: list[ActorHandle],
        backend: str,
        bucket_bytes: int = 512 << 20,
        full_sync_every: int = 0,
    ):
        self.students = students
        self.receivers = list(receivers)
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.full_sync_every = full_sync_every  # 0: every sync whole and no record kept (no deltas)
        self.full_at: int | None = None  # the version of the last full sync since setup
        self.format = "trainable"

    def setup(self, timeout_s: float | None = None) -> None:
        """Called once the actors exist (and again after a receiver restarts): agree on the format.
        ``timeout_s`` bounds each wait for the members (``ray.exceptions.GetTimeoutError``)."""
        formats = set(ray.get([r.weight_format.remote() for r in self.receivers], timeout=timeout_s))
        if len(formats) > 1:
            raise ValueError(
                f"weight receivers want different formats {sorted(formats)} (an HF engine beside a vLLM one); "
                "use the same engine for the rollout and a live/EMA teacher, or teacher.weights=frozen"
            )
        self.format = formats.pop() if formats else "trainable"
        self.full_at = None  # a receiver may have (re)joined: the next sync goes whole

    def mode(self, version: int) -> str:
        """How the sync at ``version`` travels (``weight_delta.MODES``)."""
        if not self.full_sync_every:
            return "whole"
        if self.full_at is None or version - self.full_at >= self.full_sync_every or version < self.full_at:
            self.full_at = version
            return "full"
        return "delta"

    def sync(self, version: int) -> Synced:
        allowed = self.students.actors[0].holds_version.remote(version)
        full_at = self.full_at
        mode = self.mode(version)
        synced = self.send(version, allowed, mode)
        whole = (lambda: self._whole(version, allowed)) if mode == "delta" else None

        def refused() -> None:  # nothing moved: a full sync planned for this version is still to come
            if self.full_at == version:
                self.full_at = full_at

        return replace(synced, version=version, whole=whole, allowed=allowed, refused=refused)

    def _whole(self, version: int, allowed: ray.ObjectRef) -> Synced:
        self.full_at = version
        return self.send(version, allowed, "full")

    def verify(self) -> list[ray.ObjectRef]:
        """Per receiver, a ref to its :meth:`WeightReceiver.verify_weights` against the student's
        :class:`WeightCheck` at the weights it holds now: call right after :meth:`sync`, whose
        loads every receiver finishes first (an actor runs its calls in order)."""
        check = self.students.together("weight_check").ref
        return [r.verify_weights.remote(check) for r in self.receivers]

    def send(self, version: int, allowed: ray.ObjectRef, mode: str = "whole") -> Synced:
        """Move the weights tagged ``version`` in ``mode``; every call on either side takes ``allowed`` (rank 0's
        ``holds_version``; Ray resolves it first) and does nothing when it is False."""
        raise NotImplementedError

    def teardown(self, timeout_s: float | None = None) -> None:
        """Release transport resources (process groups, buffers); ``timeout_s`` bounds the wait
        for the members (a member whose node is gone never answers)."""

    def buckets(self) -> list[list[TensorSpec]]:
        specs = ray.get(self.students.actors[0].weight_layout.remote(self.format))
        return split_buckets(specs, self.bucket_bytes)


def make_weight_sync(
    transport: str,
    students: ActorGroup,
    receivers: list[ActorHandle],
    backend: str,
    bucket_bytes: int = 512 << 20,
    full_sync_every: int = 0,
) -> WeightTransport:
    if transport not in TRANSPORTS:
        raise ValueError(f"trainer.weight_transport: unknown transport '{transport}'")
    module = importlib.import_module(f"{__name__}.{transport}")
    return module.TRANSPORT(students, receivers, backend, bucket_bytes, full_sync_every)


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
