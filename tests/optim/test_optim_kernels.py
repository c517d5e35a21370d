"""Which torch implementation keel's torch-backed optimizers run (fused, foreach, per-tensor loop), and that a
flag the user sets is kept."""

import pytest
import torch
from torch import nn

import keel.optim as ko
from keel.errors import KeelError
from keel.optim import torch_kernels

requires_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

#: torch 2.13 has fused CPU kernels for these (AdamW, Adam, SGD).
FUSED_ON_CPU = ["sgd", "momentum", "nesterov", "adam", "adamw"]
#: No fused kernel; on CPU torch's foreach ops are no faster than its per-tensor loop, which keel keeps.
LOOP_ON_CPU = ["rmsprop", "nadam", "radam", "adafactor"]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 11))


def step(opt, m, steps=3):
    idx = torch.arange(11) % 7
    for _ in range(steps):
        nn.functional.cross_entropy(m(idx), (idx + 1) % 11).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_every_torch_backed_optimizer_is_covered_here():
    torch_backed = {name for name in ko.names() if ko.get(name).torch_class is not None}
    assert torch_backed == set(FUSED_ON_CPU) | set(LOOP_ON_CPU)


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_builds_torchs_fused_kernel_on_cpu(name):
    m = model()
    opt = ko.create(name, m)
    assert opt.defaults["fused"] is True and opt.defaults["foreach"] is False
    assert all(g["fused"] is True for g in opt.param_groups)
    step(opt, m)


@pytest.mark.parametrize("name", LOOP_ON_CPU)
def test_without_a_fused_kernel_keeps_the_per_tensor_loop_on_cpu_and_uses_foreach_where_it_is_fast(
    name, monkeypatch
):
    m = model()
    opt = ko.create(name, m)
    assert "fused" not in opt.defaults and opt.defaults["foreach"] is False
    step(opt, m)
    monkeypatch.setattr(torch_kernels, "fast_foreach_devices", lambda: {"cpu", "cuda"})  # as on a GPU
    assert ko.create(name, model()).defaults["foreach"] is True


@requires_muon
def test_muons_adamw_groups_use_the_fused_kernel_and_take_the_users_choice():
    m = model()
    opt = ko.create("muon", m)
    kinds = {(g["kind"], g.get("fused"), g.get("foreach")) for g in opt.param_groups}
    assert ("adamw", True, False) in kinds and all(k[1] is None for k in kinds if k[0] == "muon")
    step(opt, m)
    opt = ko.create("muon", model(), adam_fused=False)
    assert {g["fused"] for g in opt.param_groups if g["kind"] == "adamw"} == {False}


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"fused": False}, {"fused": False, "foreach": False}),  # foreach still decided: not fast on CPU
        ({"foreach": False}, {"fused": True, "foreach": False}),  # fused still decided
        ({"fused": False, "foreach": False}, {"fused": False, "foreach": False}),
        ({"foreach": True}, {"fused": False, "foreach": True}),
        ({"fused": True}, {"fused": True, "foreach": False}),
    ],
)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_flags_the_user_sets_are_kept(name, given, expected):
    opt = ko.from_config({"name": name, **given}, model())
    assert {k: opt.defaults[k] for k in expected} == expected
    for k, v in given.items():
        assert opt.defaults[k] is v


def test_user_foreach_is_kept_for_optimizers_without_a_fused_kernel(monkeypatch):
    assert ko.create("rmsprop", model(), foreach=True).defaults["foreach"] is True
    monkeypatch.setattr(torch_kernels, "fast_foreach_devices", lambda: {"cpu"})
    assert ko.create("nadam", model(), foreach=False).defaults["foreach"] is False


def test_fused_and_foreach_both_true_is_an_error_naming_the_keys():
    with pytest.raises(KeelError, match=r"optimizer\.fused, optimizer\.foreach: both true"):
        ko.create("adamw", model(), fused=True, foreach=True)


def test_sparse_embeddings_and_complex_parameters_stay_off_the_fused_kernel():
    m = nn.Sequential(nn.Embedding(11, 8, sparse=True))
    opt = ko.create("sgd", m)
    assert opt.defaults["fused"] is False
    m(torch.arange(5)).sum().backward()
    opt.step()  # torch's fused SGD refuses sparse gradients
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    assert ko.create("adam", [z]).defaults["fused"] is False


def test_parameter_generators_in_groups_are_not_used_up():
    m = model()
    opt = ko.create("adamw", [{"params": m.parameters()}])
    assert len(opt.param_groups[0]["params"]) == len(list(m.parameters())) and opt.defaults["fused"] is True


def test_a_device_without_the_kernel_is_tried_once_and_refused():
    assert torch_kernels.fused_kernel_available(torch.optim.AdamW, "cpu")
    assert not torch_kernels.fused_kernel_available(torch.optim.AdamW, "meta-device-that-does-not-exist")
    assert torch_kernels.choose_kernels(torch.optim.AdamW, [torch.zeros(2, device="meta")]) == {
        "fused": False, "foreach": False
    }


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_fused_kernel_follows_the_per_tensor_loop_in_float32(name):
    """The fused kernel reorders floating-point operations only: 20 steps stay within float32 rounding."""
    results = []
    for fused in (True, False):
        m = model()
        opt = ko.create(name, m, fused=fused, foreach=False)
        step(opt, m, steps=20)
        results.append([p.detach() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
