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


_C = constant(1.0)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: constant(-1.0), "lr: -1.0 is not allowed; must be >= 0"),
        (lambda: constant(float("inf")), "lr: inf is not finite"),
        (lambda: constant("x"), "lr: 'x' is not a number"),
        (lambda: step_decay(0.0, 0.5, 10), "lr: 0.0 is not allowed; must be > 0"),
        (lambda: step_decay(1.0, 0.0, 10), "rate: 0.0 is not allowed; must be in (0, 1]"),
        (lambda: step_decay(1.0, 1.5, 10), "rate: 1.5"),
        (lambda: step_decay(1.0, 0.5, 0), "interval: 0 is not allowed; must be >= 1"),
        (lambda: step_decay(1.0, 0.5, 2.5), "interval: 2.5 is not a whole number of steps"),
        (lambda: multistep_decay(1.0, []), "milestones: [] is not allowed"),
        (lambda: multistep_decay(1.0, [5, 5]), "strictly increasing"),
        (lambda: multistep_decay(1.0, "5"), "milestones: '5' is not allowed"),
        (lambda: exponential_decay(1.0, -0.5), "rate: -0.5"),
        (lambda: linear_decay(1.0, 0), "total_steps: 0 is not allowed; must be >= 1"),
        (lambda: linear_decay(1.0, 10, end_lr=-1), "end_lr: -1.0 is not allowed"),
        (lambda: cosine_decay(-1.0, 10), "lr: -1.0 is not allowed; must be > 0"),
        (lambda: cosine_decay(1.0, 10, min_lr=2.0), "min_lr: 2.0 is above lr (1.0); must be <= lr"),
        (lambda: cosine_decay(1.0, True), "total_steps: True is not a whole number"),
        (lambda: sqrt_decay(1.0, 0), "total_steps: 0"),
        (lambda: polynomial_decay(1.0, 10, power=-1), "power: -1.0 is not allowed; must be > 0"),
        (lambda: polynomial_decay(1.0, 10, end_lr=3.0), "end_lr: 3.0 is above lr"),
        (lambda: inverse_sqrt(1.0, 0), "warmup_steps: 0 is not allowed; must be >= 1"),
        (lambda: noam(2.0, 0, 10), "model_dim: 0 is not allowed"),
        (lambda: noam(0.0, 4, 10), "scale: 0.0 is not allowed"),
        (lambda: rsqrt(1.0, 0), "warmup_steps: 0 is not allowed"),
        (lambda: wsd(1.0, 100, 0), "decay_steps: 0 is not allowed; must be >= 1"),
        (lambda: wsd(1.0, 100, 60, warmup_steps=50), "warmup_steps (50) + decay_steps (60) = 110 is more than total_steps"),
        (lambda: wsd(1.0, 100, 10, shape="quadratic"), "shape: 'quadratic' is not allowed; allowed: linear, cosine"),
        (lambda: wsd(1.0, 100, 10, min_lr=2.0), "min_lr: 2.0 is above lr"),
        (lambda: cosine_restarts(1.0, 0), "period: 0 is not allowed"),
        (lambda: cosine_restarts(1.0, 10, period_mult=0.9), "period_mult: 0.9 is not allowed; must be >= 1"),
        (lambda: cosine_restarts(1.0, 10, decay=1.1), "decay: 1.1 is not allowed"),
        (lambda: warmup(_C, -1), "steps: -1 is not allowed; must be >= 0"),
        (lambda: warmup(_C, 10, shape="cubic"), "shape: 'cubic' is not allowed; allowed: linear, exponential"),
        (lambda: warmup(_C, 10, shape="exponential"), "init_lr: 0.0 is not allowed with shape 'exponential'"),
        (lambda: warmup(constant(0.0), 10, init_lr=0.1, shape="exponential"), "schedule: starts at 0.0"),
        (lambda: warmup(0.1, 10), "schedule: 0.1 is not a schedule"),
        (lambda: warmup(reduce_on_plateau(1.0), 10), "must be the outermost schedule"),
        (lambda: join([_C, _C], []), "boundaries: [] has 0 entries; 2 schedules need 1"),
        (lambda: join([_C, _C, _C], [10, 5]), "boundaries: [10, 5] is not allowed; must be strictly increasing"),
        (lambda: join([], []), "schedules: [] is not allowed"),
        (lambda: join([_C, _C], [0]), "boundaries[0]: 0 is not allowed; must be >= 1"),
        (lambda: wrap(_C, step_start=-1), "step_start: -1 is not allowed; must be >= 0"),
        (lambda: wrap(_C, step_duration=0), "step_duration: 0 is not allowed; must be >= 1"),
        (lambda: wrap(_C, minimum=-1e-4), "minimum: -0.0001 is not allowed"),
        (lambda: reduce_on_plateau(1.0, factor=1.0), "factor: 1.0 is not allowed; must be in (0, 1)"),
        (lambda: reduce_on_plateau(1.0, patience=-1), "patience: -1 is not allowed; must be >= 0"),
        (lambda: reduce_on_plateau(1.0, threshold=-1), "threshold: -1.0 is not allowed; must be >= 0"),
        (lambda: reduce_on_plateau(1.0, threshold_mode="pct"), "threshold_mode: 'pct' is not allowed; allowed: rel, abs"),
        (lambda: reduce_on_plateau(1.0, cooldown=-2), "cooldown: -2 is not allowed"),
        (lambda: reduce_on_plateau(1.0, mode="lowest"), "mode: 'lowest' is not allowed; allowed: min, max"),
        (lambda: reduce_on_plateau(0.0), "lr: 0.0 is not allowed; must be > 0"),
        (lambda: reduce_on_plateau(1.0).observe("bad"), "metric: 'bad' is not a number"),
        (lambda: reduce_on_plateau(1.0).load_state_dict({}), "reduce_on_plateau state: missing best"),
    ],
)
def test_invalid_parameters_raise_clear_errors(build, needle):
    with pytest.raises(KeelError) as error:
        build()
    assert needle in str(error.value)


def test_plateau_scales_a_base_schedule_and_floors_only_after_a_reduction():
    base = warmup(constant(1.0), 10)
    f = reduce_on_plateau(base, factor=0.5, patience=0, min_lr=0.2)
    assert f(0) == 0.0 and f(5) == 0.5  # no floor before any reduction
    f(20)
    f.observe(1.0)
    f.observe(1.0)
    assert f(20) == 0.5 and f(2) == 0.2
    assert f.num_reductions == 1


def test_plateau_cooldown_and_max_mode():
    f = reduce_on_plateau(1.0, factor=0.5, patience=0, cooldown=2, mode="max")
    f.observe(1.0)  # improvement from -inf
    f.observe(0.5)  # bad -> reduce, cooldown 2
    assert f(0) == 0.5
    f.observe(0.5)
    f.observe(0.5)  # both in cooldown
    assert f(0) == 0.5
    f.observe(0.5)
    assert f(0) == 0.25


def test_schedules_accept_numpy_and_tensor_integer_steps():
    import numpy as np

    f = cosine_decay(1.0, 100)
    assert f(np.int64(50)) == f(50) == f(torch.tensor(50))
    assert isinstance(f(np.int64(50)), float)


def test_warmup_steps_reads_the_warmup_a_schedule_starts_with():
    from keel.schedules import from_config, warmup_steps

    assert warmup_steps(from_config({"name": "cosine", "warmup": 10}, base_lr=1e-3, total_steps=100)) == 10
    assert warmup_steps(from_config({"name": "wsd", "warmup": "5%", "decay": "20%"}, base_lr=1e-3, total_steps=100)) == 5
    assert warmup_steps(from_config({"name": "noam", "model_dim": 64, "warmup": 40}, base_lr=1.0)) == 40
    assert warmup_steps(from_config({"name": "constant"}, base_lr=1e-3)) == 0
    plateau = from_config({"name": "plateau", "schedule": {"name": "cosine", "warmup": 10}}, base_lr=1e-3,
                          total_steps=100)
    assert warmup_steps(plateau) == 10
    from keel.schedules import constant, cosine_decay, join, linear_decay, warmup, wrap

    assert warmup_steps(wrap(warmup(constant(1.0), 5), step_start=10, step_duration=3)) == 25
    assert warmup_steps(join([warmup(constant(1.0), 7), cosine_decay(1.0, 50)], [20])) == 7
    rising = join([linear_decay(1.0, 10, end_lr=2.0), cosine_decay(2.0, 50)], [10])
    assert warmup_steps(rising) == 10
    assert warmup_steps(join([constant(1.0), cosine_decay(1.0, 50)], [10])) == 0


def test_set_lr_keeps_the_ratios_of_a_plain_torch_optimizers_groups():
    import torch

    from keel.schedules import set_lr

    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3}], lr=1e-2)
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    set_lr(optimizer, 0.2)  # the ratio is fixed once, not re-derived from the LRs just set
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.02)
