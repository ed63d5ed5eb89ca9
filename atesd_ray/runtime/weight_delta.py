"""Delta syncs (``trainer.delta_sync``): a sync that carries, of each tensor, only the elements that
changed since the last sync sent, exactly, as verl's ``delta_sharded`` does.

On the wire a delta is named tensors like any sync, so every transport moves it as it is:

- ``BASE``, first: the version the delta applies to;
- a tensor sent whole keeps its name (one that changed in more places than a delta saves);
- a tensor sent in part is two, one after the other: ``NAME@index`` (flat positions, int32, or
  int64 past 2^31 elements) and ``NAME@values`` (its new values there, in the sync's dtype);
- a tensor that did not change is left out.

Elements compare bitwise in the sync's dtype, so a receiver that writes the values at their
positions holds the same bits as after a full sync. It pays where that dtype hides most updates:
in bf16 an optimizer step moves a few percent of the elements across a rounding boundary; in
float32 nearly all of them change, and every tensor goes whole. The sender keeps what it last sent
(one copy of the sync in host memory, rank 0), and what it sends whole is that copy itself; a full
sync every ``trainer.full_sync_every`` versions, and after any receiver (re)joins, refreshes it
and every receiver whole. A receiver a delta does not fit (it holds another version: Ray restarted
it between syncs) applies none of it and answers the version it holds; the transport then sends
the same version again whole (:class:`~atesd_ray.runtime.weight_sync.Synced`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

BASE = "@delta_base"
INDEX = "@index"
VALUES = "@values"
MODES = ("whole", "full", "delta")  # no snapshot kept; whole and the snapshot refreshed; changes only

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Parts = dict[
    str, tuple[torch.Tensor, torch.Tensor]
]  # a delta's tensors by name: (flat positions, new values)


class DeltaEncoder:
    """The sender's side: the tensors last sent, on the CPU, and the version they are."""

    def __init__(self) -> None:
        self.sent: dict[str, torch.Tensor] = {}
        self.version: int | None = None  # None: no complete sync behind ``sent``
        # the last sync encoded: its mode, bytes sent, bytes and elements of the whole weights, elements changed
        self.last: dict = {}

    def encode(
        self, stream: Iterator[tuple[str, torch.Tensor]], version: int, full: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The sync of ``stream`` (whole tensors) at ``version``: whole when ``full`` or when no
        complete sync was sent before (a delta needs one behind it), else the changes."""
        base, self.version = self.version, None  # an interrupted encode leaves no base behind
        full = full or base is None
        sent = whole = elements = changed = 0
        if not full:
            yield BASE, torch.tensor([base], dtype=torch.int64)
        for name, tensor in stream:
            whole, elements = whole + _nbytes(tensor), elements + tensor.numel()
            last = self.sent.get(name)
            if full or last is None or last.shape != tensor.shape or last.dtype != tensor.dtype:
                self.sent[name] = tensor.detach().to("cpu", copy=True)
                encoded, count = [(name, self.sent[name])], tensor.numel()
            else:
                encoded, count = self._changes(name, tensor, last)
            changed += count
            sent += sum(_nbytes(t) for _, t in encoded)
            yield from encoded
        self.version = version
        self.last = {
            "mode": "full" if full else "delta",
            "sent": sent,
            "whole": whole,
            "elements": elements,
            "changed": changed,
        }

    def _changes(
        self, name: str, tensor: torch.Tensor, last: torch.Tensor
    ) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """``tensor`` against what was last sent of it: nothing, its changes, or itself; and how
        many of its elements changed."""
        new = tensor.detach().reshape(-1)
        changed = _bits(new) != _bits(last.to(new.device).reshape(-1))
        count = int(changed.sum())
        if count == 0:
            return [], 0
        index_dtype = torch.int32 if new.numel() < 2**31 else torch.int64
        index_size = torch.empty((), dtype=index_dtype).element_size()
        if count * (index_size + new.element_size()) >= _nbytes(new):
            last.copy_(tensor.detach().reshape(last.shape))
            return [(name, last)], count
        index = changed.nonzero().reshape(-1)
        values = new[index]
        last.view(-1)[index.cpu()] = values.cpu()
        return [(name + INDEX, index.to(index_dtype)), (name + VALUES, values)], count


class DeltaReader:
    """The receiver's side of one update: splits each chunk into whole tensors and (index, values)
    pairs. A pair may straddle two chunks (a bucket boundary): its index is kept (copied) until
    its values arrive."""

    def __init__(self, held: int):
        self.held = held  # the version the receiver holds
        self.index: tuple[str, torch.Tensor] | None = None
        self.behind = False  # a delta against other weights came: none of this update applies

    def split(self, named: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Parts]:
        whole: dict[str, torch.Tensor] = {}
        parts: Parts = {}
        if BASE in named and (base := int(named[BASE].reshape(-1)[0])) != self.held:
            log.warning(
                "a delta sync against v%d reached a receiver holding v%d: it waits for a full one",
                base,
                self.held,
            )
            self.behind = True
        if self.behind:
            return whole, parts
        for name, tensor in named.items():
            if name == BASE:
                continue
            elif name.endswith(INDEX):
                self.index = (name.removesuffix(INDEX), tensor.clone())
            elif name.endswith(VALUES):
                target = name.removesuffix(VALUES)
                if self.index is None or self.index[0] != target:
                    raise RuntimeError(f"delta sync: values of '{target}' came without their positions")
                parts[target] = (self.index[1].long(), tensor)
                self.index = None
            else:
                whole[name] = tensor
        return whole, parts

    def finish(self) -> None:
        if self.index is not None and not self.behind:
            raise RuntimeError(f"delta sync ended with positions of '{self.index[0]}' and no values")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width: NaN equals NaN, -0.0 differs from 0.0."""
    return t.view(_BITS[t.element_size()])
