"""Monotonicity, continuity and bounds of every schedule, checked with hypothesis over their parameters."""

import math
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

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
    rsqrt,
    sqrt_decay,
    step_decay,
    warmup,
    wrap,
    wsd,
)

FAST = settings(max_examples=40, deadline=None)
lrs = st.floats(1e-6, 10.0)
fractions = st.floats(0.0, 1.0)
lengths = st.integers(1, 400)
rates = st.floats(0.01, 1.0)


def values(schedule, end):
    return [schedule(t) for t in range(end)]


def non_increasing(xs, tol=1e-12):
    return all(b <= a * (1 + tol) + 1e-300 for a, b in zip(xs, xs[1:]))


def non_decreasing(xs, tol=1e-12):
    return all(b >= a * (1 - tol) for a, b in zip(xs, xs[1:]))


ROUNDING = 32 * sys.float_info.epsilon  # a few ulps of the LR: float rounding in one step of a formula


def max_jump(xs):
    return max((abs(b - a) for a, b in zip(xs, xs[1:])), default=0.0)


@FAST
@given(lr=lrs, total=lengths, floor=fractions)
def test_linear_and_cosine_decay_monotone_bounded_and_lipschitz(lr, total, floor):
    end = lr * floor
    for schedule, slope in [
        (linear_decay(lr, total, end_lr=end), (lr - end) / total),
        (cosine_decay(lr, total, min_lr=end), (lr - end) * math.pi / (2 * total)),
    ]:
        xs = values(schedule, total + 20)
        assert non_increasing(xs)
        assert xs[0] == lr and math.isclose(xs[total], end, rel_tol=1e-9, abs_tol=1e-15)
        assert all(end * (1 - 1e-12) <= x <= lr for x in xs)
        assert max_jump(xs) <= slope * (1 + 1e-9) + ROUNDING * lr


@FAST
@given(lr=lrs, total=lengths, power=st.floats(0.1, 5.0), floor=fractions)
def test_polynomial_and_sqrt_decay_monotone_to_their_end(lr, total, power, floor):
    poly = values(polynomial_decay(lr, total, power=power, end_lr=lr * floor), total + 5)
    root = values(sqrt_decay(lr, total), total + 5)
    for xs, end in [(poly, lr * floor), (root, 0.0)]:
        assert non_increasing(xs)
        assert xs[0] == lr and math.isclose(xs[-1], end, rel_tol=1e-9, abs_tol=1e-15)


@FAST
@given(lr=lrs, rate=rates, interval=st.integers(1, 30))
def test_step_exponential_multistep_monotone(lr, rate, interval):
    for schedule in (
        step_decay(lr, rate, interval),
        exponential_decay(lr, rate, interval),
        multistep_decay(lr, [interval, 2 * interval + 3], rate),
    ):
        xs = values(schedule, 120)
        assert xs[0] == lr and non_increasing(xs) and all(x >= 0 for x in xs)


@FAST
@given(lr=lrs, total=st.integers(10, 400), warm=fractions, decay=st.floats(0.01, 1.0), floor=fractions,
       shape=st.sampled_from(["linear", "cosine", "sqrt", "1-sqrt"]))
def test_wsd_rises_holds_then_falls(lr, total, warm, decay, floor, shape):
    d = max(1, int(decay * total))
    w = int(warm * (total - d))
    xs = values(wsd(lr, total, d, warmup_steps=w, min_lr=lr * floor, shape=shape), total + 5)
    assert non_decreasing(xs[: w + 1])
    assert all(x == lr for x in xs[w : total - d + 1])
    assert non_increasing(xs[w:])
    assert math.isclose(xs[total], lr * floor, rel_tol=1e-9, abs_tol=1e-15)


@FAST
@given(scale=lrs, dim=st.integers(1, 2048), w=st.integers(1, 300))
def test_noam_rsqrt_inverse_sqrt_peak_at_warmup_then_decay(scale, dim, w):
    n = values(noam(scale, dim, w), 2 * w + 10)
    peak = n.index(max(n))
    assert peak == w - 1  # s = step + 1 = warmup_steps
    assert non_decreasing(n[: peak + 1]) and non_increasing(n[peak:])
    r = values(rsqrt(scale, w), 2 * w + 10)
    assert all(x == r[0] for x in r[: w + 1]) and non_increasing(r)
    i = values(inverse_sqrt(scale, w), 2 * w + 10)
    assert non_decreasing(i[: w + 1]) and non_increasing(i[w:]) and math.isclose(i[w], scale)


@FAST
@given(lr=lrs, period=st.integers(1, 40), mult=st.sampled_from([1, 1.5, 2, 3]), decay=rates, floor=fractions)
def test_cosine_restarts_decays_within_each_cycle_and_restarts_at_the_peak(lr, period, mult, decay, floor):
    min_lr = lr * floor * decay**3
    schedule = cosine_restarts(lr, period, period_mult=mult, decay=decay, min_lr=min_lr)
    starts, start, length = [], 0.0, float(period)
    while start < 300:
        starts.append(start)
        start += length
        length *= mult
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        cycle = values(schedule, math.ceil(b))[math.ceil(a):]
        assert non_increasing(cycle)
        if a == int(a):
            assert math.isclose(schedule(int(a)), max(lr * decay**i, min_lr), rel_tol=1e-12, abs_tol=1e-300)


@FAST
@given(lr=lrs, w=st.integers(1, 100), init=fractions, total=lengths)
def test_warmup_rises_to_the_schedule_start_then_follows_it(lr, w, init, total):
    base = cosine_decay(lr, total)
    f = warmup(base, w, init_lr=lr * init)
    xs = values(f, w + 1)
    assert xs[0] == lr * init and xs[w] == base(0)
    assert non_decreasing(xs)
    assert max_jump(xs) <= (lr - lr * init) / w * (1 + 1e-9) + ROUNDING * lr
    assert all(f(w + t) == base(t) for t in range(0, total + 5, 3))
    g = values(warmup(base, w, init_lr=lr * max(init, 1e-3), shape="exponential"), w + 1)
    assert non_decreasing(g) and math.isclose(g[w], lr)


@FAST
@given(bounds=st.lists(st.integers(1, 50), min_size=1, max_size=4, unique=True), t=st.integers(0, 300))
def test_join_piece_sees_steps_from_its_own_start(bounds, t):
    bounds = sorted(bounds)
    pieces = [linear_decay(1.0 + i, 1000) for i in range(len(bounds) + 1)]
    f = join(pieces, bounds)
    i = sum(b <= t for b in bounds)
    start = ([0, *bounds])[i]
    assert f(t) == pieces[i](t - start)


@FAST
@given(start=st.integers(0, 50), duration=st.integers(1, 10), minimum=st.floats(0.0, 0.5), t=st.integers(0, 500))
def test_wrap_is_opennmt_schedule_wrapper(start, duration, minimum, t):
    inner = noam(2.0, 16, 20)
    assert wrap(inner, start, duration, minimum)(t) == max(inner(max(t - start, 0) // duration), minimum)


@FAST
@given(lr=st.floats(0.0, 10.0), t=st.integers(0, 10**12))
def test_constant_everywhere(lr, t):
    assert constant(lr)(t) == lr
