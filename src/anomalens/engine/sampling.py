"""Batch samplers of the training engine beyond plain shuffling.

`BalancedBatchSampler` gives every batch ``batch_size // 2`` normal and ``batch_size - batch_size // 2``
anomalous images and a fixed number of batches per epoch, like the official InCTRL
``BalancedBatchSampler`` (`datasets/new_utlis.py`): each label has an endless stream of images made of
successive random permutations, so every image of a label is used once before any is used again, across
epoch boundaries. Unlike the official sampler (numpy's global generator), permutation c of a label is
drawn from a generator seeded by (seed, label, c, rank) alone, so epoch e is the same whether or not the
run was resumed before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of indices: normal first, then anomalous; `set_epoch` selects the epoch's batches.

    Args:
        labels: 0/1 label of each dataset index.
        batch_size: images per batch (per process); half of it (rounded down) are normal.
        steps: batches per epoch.
        seed: seeds the permutations (with the label, the permutation number and `rank`).
        rank: process index under torchrun (each process draws its own batches).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, steps: int, seed: int, rank: int = 0):
        self.pools = [[i for i, y in enumerate(labels) if y == label] for label in (0, 1)]
        missing = [name for name, pool in zip(("normal", "anomalous"), self.pools, strict=True) if not pool]
        if missing:
            raise ValueError(f"balanced sampling needs normal and anomalous images; no {missing[0]} image")
        if batch_size < 2:
            raise ValueError(f"balanced sampling needs batch_size >= 2, got {batch_size}")
        self.per_label = (batch_size // 2, batch_size - batch_size // 2)
        self.steps = steps
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._stream(label, self.epoch * self.steps * self.per_label[label]) for label in (0, 1)]
        for _ in range(self.steps):
            yield [next(streams[label]) for label in (0, 1) for _ in range(self.per_label[label])]

    def _stream(self, label: int, start: int) -> Iterator[int]:
        """The label's endless stream of indices from position `start` on."""
        pool = self.pools[label]
        cycle, offset = divmod(start, len(pool))
        while True:
            key = hashlib.sha256(f"{self.seed}/{label}/{cycle}/{self.rank}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:6], "little"))
            order = torch.randperm(len(pool), generator=generator).tolist()
            for j in order[offset:]:
                yield pool[j]
            cycle, offset = cycle + 1, 0
