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

    Examples (``PlainTask``, the digits) and length buckets of documents (``BucketSampler``) are drawn through it.
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

    def locate(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The epoch and the item of each of rank ``rank``'s ``batch_size`` positions in global batch ``index``."""
        first = (index * world_size + rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        epochs, offsets = np.divmod(positions, self.size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return epochs, out

    def indices(self, index: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        return self.locate(index, rank, world_size)[1]


class BucketSampler:
    """Length bucketing: batches of sequences of similar length under a token budget, drawn like examples.

    ``lengths`` are the sequences' input lengths. Sorted by length, the sequences are cut greedily into buckets
    whose rows times longest length stay within ``batch_tokens`` (the padded size of the batch), as fairseq's
    ``batch_by_size`` does; the bucket boundaries depend on the lengths alone, so every epoch has the same
    number of buckets. Each epoch breaks ties between equal lengths with a permutation drawn from
    ``(seed, epoch)`` (which sequences share a bucket varies) and visits the buckets in the order an
    ``IndexSampler`` over them draws: batch ``index`` for rank ``rank`` of ``world_size`` is bucket position
    ``index * world_size + rank`` of that stream, so the ranks together see exactly the buckets of ``world_size``
    consecutive micro-batches of one rank, and any batch is reproduced from its index alone.
    """

    def __init__(self, lengths: np.ndarray, batch_tokens: int, seed: int):
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            raise ValueError("a bucket sampler needs at least one sequence")
        if int(lengths.max()) > batch_tokens:
            raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds batch_tokens {batch_tokens}")
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self.bounds = bucket_bounds(np.sort(lengths), batch_tokens)
        self.buckets = IndexSampler(len(self.bounds) - 1, 1, seed)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.bounds) - 1

    def _order(self, epoch: int) -> np.ndarray:
        """Sequence ids sorted by length, ties in an order drawn from ``(seed, epoch)``."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            ties = np.random.default_rng((self.seed, epoch, 1)).permutation(len(self.lengths))
            self._orders[epoch] = np.lexsort((ties, self.lengths))
        return self._orders[epoch]

    def indices(self, index: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """The sequence ids of batch ``index`` for rank ``rank`` (one bucket)."""
        epochs, buckets = self.buckets.locate(index, rank, world_size)
        epoch, bucket = int(epochs[0]), int(buckets[0])
        return self._order(epoch)[self.bounds[bucket] : self.bounds[bucket + 1]]


def bucket_bounds(sorted_lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Boundaries of the greedy buckets over ascending ``sorted_lengths``: each bucket's rows times its longest
    length is at most ``batch_tokens``."""
    bounds, rows = [0], 0
    for i, length in enumerate(sorted_lengths.tolist()):
        if rows and (rows + 1) * length > batch_tokens:
            bounds.append(i)
            rows = 0
        rows += 1
    bounds.append(len(sorted_lengths))
    return np.asarray(bounds, dtype=np.int64)


def document_spans(offsets: np.ndarray, block_size: int, long_documents: str = "split") -> np.ndarray:
    """``(start, tokens)`` of each sequence cut from documents ``tokens[offsets[i]:offsets[i + 1]]``.

    A sequence holds at most ``block_size + 1`` tokens (``block_size`` inputs and their shifted targets).
    ``split``: a longer document becomes consecutive pieces overlapping by one token, so every token but the
    document's first is a target exactly once; ``truncate``: only its first piece. Documents of fewer than two
    tokens (nothing to predict) are left out.
    """
    starts, ends = np.asarray(offsets[:-1], dtype=np.int64), np.asarray(offsets[1:], dtype=np.int64)
    targets = ends - starts - 1
    keep = targets >= 1
    starts, targets = starts[keep], targets[keep]
    pieces = -(-targets // block_size)
    if long_documents == "truncate":
        pieces = np.minimum(pieces, 1)
    doc = np.repeat(np.arange(len(starts)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    span_starts = starts[doc] + k * block_size
    span_targets = np.minimum(block_size, targets[doc] - k * block_size)
    return np.stack([span_starts, span_targets + 1], axis=1)


def padded_batch(tokens: np.ndarray, spans: np.ndarray, pad_id: int = 0,
                 ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the sequences ``spans`` (rows of ``(start, tokens)``), right-padded to the longest:
    padded inputs hold ``pad_id`` and padded targets ``ignore_index``, so the loss and the count skip them (a
    causal model never attends from a real position to a later pad)."""
    width = int(spans[:, 1].max()) - 1
    x = np.full((len(spans), width), pad_id, dtype=np.int64)
    y = np.full((len(spans), width), ignore_index, dtype=np.int64)
    for row, (start, n) in enumerate(spans.tolist()):
        window = np.asarray(tokens[start : start + n], dtype=np.int64)
        x[row, : n - 1] = window[:-1]
        y[row, : n - 1] = window[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


def sequential_buckets(tokens: np.ndarray, spans: np.ndarray, batch_tokens: int, max_tokens: int | None = None):
    """The fixed evaluation batches of document sequences: the first sequences of the split up to ``max_tokens``
    targets, sorted by length (stably) and cut into buckets under ``batch_tokens``; yields padded batches."""
    if max_tokens is not None:
        covered = np.cumsum(spans[:, 1] - 1)
        spans = spans[: max(1, int(np.searchsorted(covered, max_tokens)) + 1)]
    order = np.argsort(spans[:, 1], kind="stable")
    bounds = bucket_bounds(spans[order, 1] - 1, batch_tokens)
    for begin, end in zip(bounds[:-1], bounds[1:]):
        yield padded_batch(tokens, spans[order[begin:end]])


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
