"""Deterministic batch sampling: batch ``i`` depends only on (seed, i), so resuming needs only ``i``."""

from __future__ import annotations

import numpy as np
import torch


class RandomWindowSampler:
    """Random windows of ``block_size + 1`` tokens; inputs are the first ``block_size``, targets the shifted rest.

    The windows of batch ``index`` are drawn from a generator seeded with ``(seed, index)``, so any batch can be
    reproduced without replaying the ones before it: the sampler's whole state is the next batch index, which
    the trainer keeps in its checkpoint. An epoch is ``len(tokens) // (batch_size * block_size)`` batches.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for block_size {block_size}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self._offsets = np.arange(block_size + 1)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.tokens) // (self.batch_size * self.block_size))

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index``: rank ``rank``'s ``batch_size`` rows of a global batch of ``batch_size * world_size``
        windows (so one rank with the whole global batch sees exactly what the ranks see together)."""
        rng = np.random.default_rng((self.seed, index))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * world_size)
        starts = starts[rank * self.batch_size : (rank + 1) * self.batch_size]  # start + block + 1 <= len
        windows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]


class IndexSampler:
    """Deterministic batches of item indices over a map-style dataset of ``size`` items: one epoch is a
    permutation of all items drawn from ``(seed, epoch)``, read in order; batch ``index`` is the global batch of
    ``batch_size * world_size`` items starting at ``index * batch_size * world_size`` of that endless stream,
    and rank ``rank`` takes its ``batch_size`` of them. Batches may span an epoch boundary, so no item is dropped
    and any batch is reproduced from its index alone: the sampler's whole state is the next batch index.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ValueError("an index sampler needs at least one item")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.size // self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return self._permutations[epoch]

    def indices(self, index: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        first = (index * world_size + rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        epochs, offsets = np.divmod(positions, self.size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return out


def sequential_windows(tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int | None = None):
    """Non-overlapping windows over ``tokens`` from the start, in batches: the fixed evaluation set.

    Yields ``(inputs, targets)``; the last batch may be smaller. ``max_tokens`` caps the tokens covered.
    """
    n_windows = (len(tokens) - 1) // block_size
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // block_size))
    offsets = np.arange(block_size + 1)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        windows = torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64))
        yield windows[:, :-1], windows[:, 1:]
