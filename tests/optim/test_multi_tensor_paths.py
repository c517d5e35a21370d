"""Lion and AdEMAMix: which path runs on which device (compiled or multi-tensor eager), the trainer's `compile` choice,
and the compiled path's scalars reaching the device without a host synchronisation. The rule itself (compiled
against eager, in float32 and bfloat16) is checked in tests/optim/test_optim_conformance.py, float64 parity with the
references in tests/optim/test_optim_parity.py."""

import pytest
import torch
from torch import nn

import keel.optim as ko
from keel.optim import multi_tensor
from keel.optim.multi_tensor import _make_list_update, compile_pays, follow_compile_choice


def test_cuda_needs_a_longer_run_than_the_cpu_to_repay_a_compile(monkeypatch):
    monkeypatch.setattr(multi_tensor, "compiler_available", lambda: True)
    gpt2 = 163_000_000  # GPT-2 small with a 50,304-token vocabulary
    assert compile_pays(gpt2, 1000, "cpu")  # a CPU step is slow: a compile is repaid within a short run
    assert not compile_pays(gpt2, 1000, "cuda") and not compile_pays(gpt2, None, "cuda")
    assert compile_pays(gpt2, 20_000, "cuda")
    assert multi_tensor.CUDA_COMPILE_PAYS_ELEMENT_STEPS > 10 * multi_tensor.COMPILE_PAYS_ELEMENT_STEPS


@pytest.mark.parametrize("name", ["lion", "ademamix"])
def test_the_trainers_compile_choice_decides_only_what_was_left_to_keel(name):
    model = nn.Linear(4, 4)
    for choice, expected in ((True, True), (False, False), ("auto", None)):
        opt = ko.create(name, model)
        follow_compile_choice(opt, choice)
        assert opt.fused is expected
    given = ko.create(name, model, fused=False)
    follow_compile_choice(given, True)
    assert given.fused is False  # a value the user gave is kept
    adamw = ko.create("adamw", model)
    follow_compile_choice(adamw, True)  # torch's optimizers are not keel's to compile
    assert not hasattr(adamw, "fused")


def test_scalars_go_to_the_cpu_as_before():
    rows = [[1e-3, 0.5], [2e-3, 0.25]]
    hyper = multi_tensor._to_device(rows, torch.device("cpu"))
    assert hyper.dtype == torch.float64 and hyper.tolist() == rows


@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
def test_forced_compiled_rule_equals_eager_over_steps_with_a_changing_lr(cls, monkeypatch):
    """The rule torch.compile fuses (run uncompiled) against the multi-tensor one, with the LR changing every step
    as under a schedule (the scalars are uploaded afresh each step)."""
    monkeypatch.setattr(cls, "_compiled", _make_list_update(cls._update_tensor))
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s, requires_grad=True) for s in [(200, 400), (9,), (70000,)]]
        opt = cls(params, lr=1e-3, weight_decay=0.1, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for step in range(6):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (1 + step) / 6
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
def test_on_cuda_the_compiled_step_equals_the_eager_one(cls):
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda", requires_grad=True) for s in [(512, 768), (768,), (70000,)]]
        opt = cls(params, lr=1e-3, weight_decay=0.1, fused=fused)
        for step in range(4):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (1 + step)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        if cls is ko.Lion:  # sign() of an average that rounds to either side of 0 may flip: a rare element
            assert (a - b).abs().gt(1e-5).float().mean() < 1e-4
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert multi_tensor._to_device([[1.0]], torch.device("cuda")).is_cuda
