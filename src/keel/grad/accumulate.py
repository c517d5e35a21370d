"""Gradient accumulation: split a batch into micro-batches and weight their losses by token count."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from keel.errors import KeelError

IGNORE_INDEX = -100  # the target value torch.nn.functional.cross_entropy ignores by default


def split_micro_batches(batch, num_micro_batches: int) -> list:
    """Split a tensor, or a tuple/list/dict of tensors, into `num_micro_batches` pieces along dim 0.

    Pieces differ in size by at most one row when the batch does not divide evenly.
    """
    if num_micro_batches < 1:
        raise KeelError(f"grad_accum: {num_micro_batches!r} is not a positive int; allowed: an int >= 1")
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] < num_micro_batches:
            raise KeelError(
                f"grad_accum: {num_micro_batches} micro-batches from a batch of {batch.shape[0]} rows; "
                "allowed: grad_accum <= batch size"
            )
        return list(torch.tensor_split(batch, num_micro_batches, dim=0))
    if isinstance(batch, dict):
        parts = {k: split_micro_batches(v, num_micro_batches) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(num_micro_batches)]
    if isinstance(batch, (tuple, list)):
        parts = [split_micro_batches(v, num_micro_batches) for v in batch]
        return [type(batch)(p[i] for p in parts) for i in range(num_micro_batches)]
    raise KeelError(f"split_micro_batches: a {type(batch).__name__} is not a batch; allowed: tensor, tuple, list, dict")


def count_tokens(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of targets that count towards the loss (those not equal to `ignore_index`)."""
    return int((targets != ignore_index).sum())


def micro_batch_weights(token_counts: Sequence[int], *, sync: bool = True) -> list[float]:
    """Loss weights w_i = n_i * W / N for micro-batches holding n_i tokens, N tokens in the global batch.

    With each micro-batch's loss a mean over its own tokens, sum_i w_i * loss_i equals the mean over all
    N tokens of the global batch (times the world size W, which data-parallel gradient averaging divides
    out again). So micro-batches with different numbers of tokens give the gradient of one large batch.
    With `sync` and an initialised process group, N is summed over ranks (one all_reduce).
    """
    counts = [int(n) for n in token_counts]
    if not counts or min(counts) < 0:
        raise KeelError(f"token_counts: {counts!r}; allowed: a non-empty list of ints >= 0")
    total, world = sum(counts), 1
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([total], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        total = int(t.item())
    if total == 0:
        return [0.0 for _ in counts]
    return [n * world / total for n in counts]
