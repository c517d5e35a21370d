"""SOAP's batched path (the default on CUDA), forced on the CPU: equal to the per-parameter path in float64, resumable
from its stacked state, and the products' precision (highest, TF32, bfloat16) measured against float64.

Measured here (one refresh step after 30, float32 state; relative to the float64 step): the update differs by about
1e-5 with float32 products, 4e-4 with TF32 and 4e-3 with bfloat16; the refreshed eigenbases by 3e-7, 4e-4 and
4e-3 (largest element), against a difference of order 1e-1 between one power iteration's basis and the exact
eigenbasis, which SOAP accepts by design.
"""

import copy
import io

import pytest
import torch

import keel.optim as ko
from keel.errors import KeelError
from keel.optim.soap import _round_to_tf32
from keel.precision import cuda_tf32

SHAPES = [(6, 10), (6, 10), (12, 5), (10,), (12, 5), (3, 4, 5), (6, 10)]  # stacks of 3 and 2; 1-D and 3-D apart
PARITY = [
    {},
    {"precondition_frequency": 3, "weight_decay": 0.0},
    {"max_precondition_dim": 8, "betas": (0.9, 0.99), "shampoo_beta": 0.8},  # one side of (12, 5) not rotated
    {"precondition_1d": True, "correct_bias": False},
    {"merge_dims": True, "max_precondition_dim": 30},  # (3, 4, 5) merges to (12, 5) and joins that stack
]


def _run(make, shapes=SHAPES, steps=40, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    opt = make(params)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(shapes))]
    for _ in range(steps):
        for p, g in zip(params, generators):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) + 0.5 * p.detach()
        opt.step()
    return opt, [p.detach() for p in params]


@pytest.mark.parametrize("hparams", PARITY)
def test_batched_path_equals_the_per_parameter_path_in_float64(hparams):
    _, reference = _run(lambda ps: ko.SOAP(ps, lr=3e-3, **hparams))
    opt, batched = _run(lambda ps: ko.SOAP(ps, lr=3e-3, batched=True, **hparams))
    assert opt.uses_batched() and len(opt._stacks[1]) >= 2
    for a, b in zip(batched, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_stacked_state_saves_and_resumes_bitwise_on_either_path():
    opt, _ = _run(lambda ps: ko.SOAP(ps, precondition_frequency=3, batched=True), steps=7)
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)

    def more(optimizer, ps):
        generator = torch.Generator().manual_seed(5)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) + 0.5 * p.detach()
            optimizer.step()
        return [p.detach().clone() for p in ps]

    twins = [[p.detach().clone().requires_grad_(True) for p in params] for _ in range(2)]
    uninterrupted = more(opt, params)
    for twin, batched in zip(twins, (True, False)):
        saved.seek(0)
        again = ko.SOAP(twin, precondition_frequency=3, batched=batched)
        again.load_state_dict(torch.load(saved, weights_only=True))
        resumed = more(again, twin)
        for a, b in zip(resumed, uninterrupted):
            if batched:
                assert torch.equal(a, b)
            else:  # per-parameter products sum in another order: float64 rounding
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _state_after(steps=30):
    torch.manual_seed(1)
    params = [torch.randn(s).requires_grad_(True) for s in [(16, 24), (16, 24), (32, 16), (32, 16)]]
    opt = ko.SOAP(params, lr=1e-2, batched=True)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(params))]

    def gradients():
        for p, g in zip(params, generators):
            p.grad = 0.5 * p.detach() + 0.3 * torch.randn(p.shape, generator=g)

    for _ in range(steps):
        gradients()
        opt.step()
    gradients()
    return opt, params


def _one_step(opt, params, precision, dtype):
    copies = [p.detach().clone().to(dtype).requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.to(dtype)
    other = ko.SOAP(copies, lr=1e-2, batched=True, matmul_precision=precision)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for c in copies:
        state = other.state[c]
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor):
                state[key] = value.to(dtype)
            elif isinstance(value, list):
                state[key] = [None if v is None else v.to(dtype) for v in value]
    other.step()  # step 30: a refresh step
    return other, [c.detach().double() - p.detach().double() for c, p in zip(copies, params)]


def test_tf32_and_bfloat16_products_stay_far_inside_what_soap_approximates_anyway():
    opt, params = _state_after()
    exact_opt, exact = _one_step(opt, params, "highest", torch.float64)
    errors, basis_errors = {}, {}
    for precision in ("highest", "tf32", "bfloat16"):
        other, moved = _one_step(opt, params, precision, torch.float32)
        errors[precision] = max(float((a - b).norm() / b.norm()) for a, b in zip(moved, exact))
        basis_errors[precision] = max(
            float((other.state[c]["Q"][0].double() - exact_opt.state[e]["Q"][0]).abs().max())
            for c, e in zip(other.param_groups[0]["params"], exact_opt.param_groups[0]["params"]))
    assert errors["highest"] < 1e-4 and errors["tf32"] < 2e-3 and errors["bfloat16"] < 2e-2
    assert basis_errors["highest"] < 1e-5 and basis_errors["tf32"] < 2e-3 and basis_errors["bfloat16"] < 2e-2
    # one power iteration + QR from the last basis, against the exact eigenbasis of the same statistics
    state = exact_opt.state[exact_opt.param_groups[0]["params"][0]]
    eigenbasis = torch.flip(torch.linalg.eigh(state["GG"][0])[1], dims=[1])
    lag = float((state["Q"][0].abs() - eigenbasis.abs()).abs().max())  # columns up to sign
    assert lag > 20 * basis_errors["tf32"]


def test_matmul_precision_defaults_and_the_emulated_tf32_rounding():
    assert ko.SOAP([torch.zeros(2, 2, requires_grad=True)]).products() == "highest"  # the CPU
    assert ko.create("soap", [torch.zeros(2, 2, requires_grad=True)], matmul_precision="tf32").products() == "tf32"
    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-10 + 2**-11, 1.0 + 3 * 2**-12, float("inf"), -3.0])
    assert _round_to_tf32(x).tolist() == [1.0, 1.0 + 2**-9, 1.0 + 2**-10, float("inf"), -3.0]
    with pytest.raises(KeelError, match=r"optimizer\.matmul_precision: 'fp8' .*null or one of 'highest'"):
        ko.check_config({"name": "soap", "matmul_precision": "fp8"})


def test_cuda_tf32_block_restores_the_previous_setting():
    """torch's switch (settable without a GPU): the legacy flag, which keel reads and sets unless a program set the
    newer `fp32_precision` (reading the legacy flag after that is an error in torch >= 2.9)."""
    before = torch.backends.cuda.matmul.allow_tf32
    with cuda_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32
        with cuda_tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_batched_tf32_stays_close_to_the_per_parameter_float32_path():
    def run(**options):
        torch.manual_seed(1)
        params = [torch.randn(s, device="cuda", requires_grad=True) for s in [(64, 96), (64, 96), (128, 64)]]
        opt = ko.SOAP(params, lr=1e-3, **options)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn_like(p) + 0.5 * p.detach()
            opt.step()
        return opt, [p.detach().cpu() for p in params]

    auto, fast = run()
    assert auto.uses_batched() and auto.products() == "tf32"
    _, exact = run(batched=False, matmul_precision="highest")
    for a, b in zip(fast, exact):
        assert float((a - b).norm() / b.norm()) < 1e-2
