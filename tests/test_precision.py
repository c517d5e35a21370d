"""Autocast policy and the fp16 dynamic loss scaler: skip, backoff, growth, checkpointing."""

import math

import pytest
import torch

from keel.errors import KeelError
from keel.precision import DynamicLossScaler, Precision


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def one_update(precision, model, optimizer, x, y, inject_inf=False):
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    precision.scale(loss).backward()
    if inject_inf:
        next(model.parameters()).grad[0, 0] = float("inf")
    precision.unscale_(optimizer)
    applied = precision.step(optimizer)
    precision.update()
    return loss.detach(), applied


def test_fp32_autocast_is_a_no_op_and_scale_is_identity():
    p = Precision("fp32", torch.device("cpu"))
    loss = torch.tensor(2.0)
    assert p.scale(loss) is loss and p.loss_scale == 1.0
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_matmuls_in_low_precision_but_keeps_fp32_weights(mode, dtype):
    model = tiny_model()
    p = Precision(mode, torch.device("cpu"))
    with p.autocast():
        out = model(torch.randn(2, 4))
    assert out.dtype == dtype
    assert all(param.dtype == torch.float32 for param in model.parameters())


def test_bf16_autocast_updates_lower_the_loss():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    p = Precision("bf16", torch.device("cpu"))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True).sin()
    losses = [float(one_update(p, model, optimizer, x, y)[0]) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_fp16_scaled_grads_are_unscaled_before_the_step():
    model, ref = tiny_model(), tiny_model()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    p = Precision("fp16", torch.device("cpu"), init_scale=1024.0)
    # fp16 autocast changes the forward numerics; compare the scaler path itself in fp32 arithmetic
    loss = torch.nn.functional.mse_loss(model(x), y)
    p.scale(loss).backward()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p.unscale_(opt)
    p.unscale_(opt)  # idempotent within one update
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_fp16_overflow_skips_update_and_backs_off():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    p = Precision("fp16", torch.device("cpu"), init_scale=2.0**10, growth_interval=3)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = [q.detach().clone() for q in model.parameters()]
    _, applied = one_update(p, model, optimizer, x, y, inject_inf=True)
    assert applied is False
    assert p.loss_scale == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert len(optimizer.state) == 0  # optimizer state untouched


def test_fp16_scale_grows_after_growth_interval_finite_updates():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    p = Precision("fp16", torch.device("cpu"), init_scale=8.0, growth_interval=3)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    scales = []
    for _ in range(7):
        _, applied = one_update(p, model, optimizer, x, y)
        assert applied
        scales.append(p.loss_scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    # an overflow resets the growth tracker
    one_update(p, model, optimizer, x, y, inject_inf=True)
    assert p.loss_scale == 16.0 and p.scaler.growth_tracker == 0


def test_scaler_state_round_trips_through_weights_only_load(tmp_path):
    p = Precision("fp16", torch.device("cpu"), init_scale=64.0, growth_interval=5)
    p.scaler.growth_tracker = 3
    torch.save(p.state_dict(), tmp_path / "state.pt")
    q = Precision("fp16", torch.device("cpu"))
    q.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert q.scaler.state_dict() == p.scaler.state_dict()


def test_scaler_rejects_bad_options_and_precision_rejects_unknown_mode():
    with pytest.raises(KeelError):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(KeelError, match="fp8"):
        Precision("fp8", torch.device("cpu"))
