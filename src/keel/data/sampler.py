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

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # start + block + 1 <= len
        windows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]


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
