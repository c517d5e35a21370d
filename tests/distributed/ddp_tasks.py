"""Tasks for the data-parallel tests (named in configs as ``ddp_tasks:...``): the user task's spirals with a NaN
injected into one rank's shard, or a rank that dies."""

import os
import signal

import torch
from user_task import make


def nan_in_second_half(at_batch: int = 5, hidden: int = 16):
    """Global batch ``at_batch`` gets NaN inputs in its second half: all of rank 1's shard with 2 ranks, the last
    half of the rows of one process with the whole global batch."""
    task = make(hidden=hidden)
    plain_batch = task.train_batch

    def train_batch(index, rank=0, world_size=1):
        inputs, targets = plain_batch(index, rank, world_size)
        if index == at_batch:
            rows = inputs.shape[0]
            first = rank * rows  # this shard's first row in the global batch
            half = rows * world_size // 2
            inputs = inputs.clone()
            for row in range(rows):
                if first + row >= half:
                    inputs[row] = torch.nan
        return inputs, targets

    task.train_batch = train_batch
    return task


def rank_dies(rank_to_die: int = 1, at_batch: int = 12, hidden: int = 16):
    """Rank ``rank_to_die`` kills itself (SIGKILL) when it draws batch ``at_batch``."""
    task = make(hidden=hidden)
    plain_batch = task.train_batch

    def train_batch(index, rank=0, world_size=1):
        if index == at_batch and rank == rank_to_die and world_size > 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return plain_batch(index, rank, world_size)

    task.train_batch = train_batch
    return task


def spike_in_second_half(at_batch: int = 12, hidden: int = 16):
    """Global batch ``at_batch`` gets far-out inputs with wrong labels in its second half (rank 1's shard with 2
    ranks): a loss spike that only one rank sees."""
    task = make(hidden=hidden)
    plain_batch = task.train_batch

    def train_batch(index, rank=0, world_size=1):
        inputs, targets = plain_batch(index, rank, world_size)
        if index == at_batch:
            rows = inputs.shape[0]
            keep = torch.arange(rows) + rank * rows < rows * world_size // 2
            inputs = torch.where(keep[:, None], inputs, inputs * 10)
            targets = torch.where(keep, targets, (targets + 1) % 3)
        return inputs, targets

    task.train_batch = train_batch
    return task
