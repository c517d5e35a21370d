"""Non-finite checks: fused gradient check, loss check, agreement across data-parallel ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import keel.grad.finite as finite_module
from keel.grad import all_ranks_agree, grads_are_finite, loss_is_finite


def params(values):
    out = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        out.append(p)
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_grads_are_finite_detects_each_kind(bad):
    assert grads_are_finite(params([[1.0, 2.0], [3.0]]))
    assert not grads_are_finite(params([[1.0, 2.0], [3.0, bad]]))


def test_grads_are_finite_huge_but_finite_values():
    # the L2 norm of these overflows float32, the max-abs check does not
    assert grads_are_finite(params([[3e38, 3e38, 3e38]]))


def test_grads_are_finite_without_grads_and_mixed_dtypes():
    assert grads_are_finite([torch.nn.Parameter(torch.ones(2))])
    half = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    half.grad = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    assert not grads_are_finite(params([[1.0]]) + [half])


def test_loss_is_finite():
    assert loss_is_finite(torch.tensor(1.5)) and loss_is_finite(2.0)
    assert not loss_is_finite(torch.tensor(float("nan")))
    assert not loss_is_finite(float("inf"))


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank 1 sees a NaN gradient; every rank must decide to skip
        grads = params([[1.0, float("nan") if rank == 1 else 2.0]])
        local = grads_are_finite(grads, sync=False)
        agreed = grads_are_finite(grads)
        results[rank] = (local, agreed, all_ranks_agree(True), loss_is_finite(float("inf") if rank == 0 else 1.0))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # spawning two processes that import torch takes 4-15 s on two shared cores
def test_all_ranks_take_the_same_decision_with_two_gloo_processes():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
    assert results[0] == (True, False, True, False)
    assert results[1] == (False, False, True, False)


def test_all_ranks_agree_without_process_group_is_identity():
    assert all_ranks_agree(True) and not all_ranks_agree(False)


class FakeProcessGroup:
    """Stands in for torch.distributed with one other rank whose flag is `other`; all_reduce(MIN) combines them."""

    ReduceOp = dist.ReduceOp

    def __init__(self, other: int):
        self.other, self.calls = other, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_backend(self):
        return "gloo"

    def all_reduce(self, tensor, op):
        assert op == dist.ReduceOp.MIN and tensor.dtype == torch.int32
        self.calls += 1
        tensor.copy_(torch.minimum(tensor, torch.full_like(tensor, self.other)))


@pytest.mark.parametrize("local,other,expected", [(True, 1, True), (True, 0, False), (False, 1, False)])
def test_reduction_path_takes_the_minimum_over_ranks(monkeypatch, local, other, expected):
    fake = FakeProcessGroup(other)
    monkeypatch.setattr(finite_module, "dist", fake)
    grads = params([[1.0, 2.0 if local else float("nan")]])
    assert grads_are_finite(grads) is expected
    assert grads_are_finite(grads, sync=False) is local and fake.calls == 1
    assert loss_is_finite(1.0 if local else float("inf")) is expected
