"""Closed-form values of every schedule at its boundaries, combinators, set_lr and the OpenNMT-tf example."""

import math

import pytest
import torch

from keel.errors import KeelError
from keel.schedules import (
    constant,
    cosine_decay,
    cosine_restarts,
    exponential_decay,
    inverse_sqrt,
    join,
    linear_decay,
    multistep_decay,
    noam,
    polynomial_decay,
    reduce_on_plateau,
    rsqrt,
    set_lr,
    sqrt_decay,
    step_decay,
    warmup,
    wrap,
    wsd,
)

approx = pytest.approx


def test_constant():
    f = constant(0.1)
    assert [f(t) for t in (0, 1, 10**9)] == [0.1, 0.1, 0.1]
    assert constant(0.0)(5) == 0.0


def test_step_decay():
    f = step_decay(1.0, 0.5, 10)
    assert f(0) == 1.0 and f(9) == 1.0 and f(10) == 0.5 and f(19) == 0.5 and f(20) == 0.25


def test_multistep_decay():
    f = multistep_decay(1.0, [10, 30], rate=0.1)
    assert f(0) == 1.0 and f(9) == 1.0
    assert f(10) == approx(0.1) and f(29) == approx(0.1)
    assert f(30) == approx(0.01) and f(10**6) == approx(0.01)


def test_exponential_decay():
    f = exponential_decay(2.0, 0.5)
    assert f(0) == 2.0 and f(1) == 1.0 and f(3) == 0.25
    g = exponential_decay(2.0, 0.5, interval=100)
    assert g(50) == approx(2.0 * 0.5**0.5) and g(100) == approx(1.0)


def test_linear_decay():
    f = linear_decay(1.0, 100, end_lr=0.1)
    assert f(0) == 1.0 and f(50) == approx(0.55) and f(100) == approx(0.1) and f(1000) == approx(0.1)


def test_cosine_decay():
    f = cosine_decay(1.0, 100, min_lr=0.1)
    assert f(0) == 1.0 and f(50) == approx(0.55) and f(100) == approx(0.1) and f(10**6) == approx(0.1)


def test_sqrt_decay():
    f = sqrt_decay(1.0, 100)
    assert f(0) == 1.0 and f(75) == approx(0.5) and f(100) == 0.0 and f(200) == 0.0


def test_polynomial_decay():
    f = polynomial_decay(1.0, 100, power=2.0, end_lr=0.1)
    assert f(0) == 1.0 and f(50) == approx(0.1 + 0.9 * 0.25) and f(100) == approx(0.1) and f(500) == approx(0.1)


def test_inverse_sqrt():
    f = inverse_sqrt(1.0, 100, init_lr=0.0)
    assert f(0) == 0.0 and f(50) == approx(0.5) and f(100) == approx(1.0) and f(400) == approx(0.5)


def test_noam_opennmt_worked_example():
    f = noam(2.0, 4, 8000)
    assert f(1) == approx(2.795e-6, rel=1e-3)
    assert f(1) == approx(2.0 * 4**-0.5 * 2 * 8000**-1.5, rel=1e-12)
    # The peak is at s = warmup_steps, i.e. step warmup_steps - 1.
    assert f(7999) == approx(2.0 * 0.5 * 8000**-0.5)
    assert f(7999) > f(7998) and f(7999) > f(8000)
    assert wrap(f, minimum=1e-4)(1) == 1e-4


def test_rsqrt():
    f = rsqrt(2.0, 100)
    assert f(0) == approx(0.2) and f(100) == approx(0.2) and f(400) == approx(0.1)


@pytest.mark.parametrize(
    ("shape", "mid"),
    [("linear", 0.5), ("cosine", 0.5), ("sqrt", math.sqrt(0.5)), ("1-sqrt", 1 - math.sqrt(0.5))],
)
def test_wsd(shape, mid):
    f = wsd(1.0, 1000, decay_steps=200, warmup_steps=100, shape=shape)
    assert f(0) == 0.0 and f(50) == 0.5 and f(100) == 1.0 and f(799) == 1.0 and f(800) == 1.0
    assert f(900) == approx(mid)
    assert f(1000) == approx(0.0, abs=1e-15) and f(5000) == approx(0.0, abs=1e-15)


def test_cosine_restarts():
    f = cosine_restarts(1.0, 10, period_mult=2, decay=0.5, min_lr=0.0)
    assert f(0) == 1.0 and f(5) == approx(0.5)
    assert f(10) == 0.5 and f(20) == approx(0.25)  # second cycle: 20 steps, peak 0.5
    assert f(30) == 0.25  # third cycle starts after 10 + 20


def test_warmup_reaches_schedule_start_at_steps():
    base = cosine_decay(1.0, 100)
    f = warmup(base, 10, init_lr=0.1)
    assert f(0) == 0.1 and f(5) == approx(0.55) and f(10) == 1.0
    assert all(f(10 + t) == base(t) for t in range(0, 150, 7))
    g = warmup(constant(1.0), 10, init_lr=0.01, shape="exponential")
    assert g(0) == 0.01 and g(5) == approx(0.1) and g(10) == 1.0
    assert warmup(base, 0)(3) == base(3)


def test_join_pieces_see_relative_steps():
    a, b, c = constant(1.0), linear_decay(1.0, 10), constant(0.5)
    f = join([a, b, c], [5, 15])
    assert f(4) == 1.0 and f(5) == 1.0 and f(10) == approx(0.5) and f(15) == 0.5 and f(99) == 0.5


def test_wrap_opennmt_semantics():
    f = wrap(linear_decay(1.0, 10), step_start=5, step_duration=2, minimum=0.3)
    assert f(0) == 1.0 and f(5) == 1.0 and f(6) == 1.0 and f(7) == approx(0.9)
    assert f(100) == 0.3


def test_set_lr_respects_lr_scale_and_tensor_lr():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, approx(0.05)]
    opt2 = torch.optim.Adam([p], lr=torch.tensor(1.0))
    set_lr(opt2, 0.25)
    assert isinstance(opt2.param_groups[0]["lr"], torch.Tensor) and opt2.param_groups[0]["lr"].item() == 0.25


def test_plateau_state_round_trip():
    f = reduce_on_plateau(1.0, factor=0.5, patience=1)
    for metric in (1.0, 1.0, 1.0):
        f.observe(metric)
    assert f(0) == 0.5
    g = reduce_on_plateau(1.0, factor=0.5, patience=1)
    g.load_state_dict(f.state_dict())
    assert g(0) == 0.5 and g.state_dict() == f.state_dict()


def test_step_must_be_a_non_negative_integer():
    f = constant(1.0)
    with pytest.raises(KeelError, match="step: -1"):
        f(-1)
    with pytest.raises(KeelError, match="not an integer"):
        f(1.5)
