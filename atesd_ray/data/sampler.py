"""Deterministic batch order: a fixed permutation per epoch, so a resumed run sees the same data."""

from __future__ import annotations

import numpy as np


class EpochSampler:
    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True):
        if size == 0:
            raise ValueError("the training set is empty")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed = 0  # samples drawn so far, across epochs: the data position in checkpoints

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(self.consumed, self.size)
            out.append(int(self._order(epoch)[pos]))
            self.consumed += 1
        return out

    @property
    def epoch(self) -> int:
        return self.consumed // self.size
