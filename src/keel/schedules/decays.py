"""Decay schedules: each returns a pure function ``step -> learning rate`` (absolute, a float).

``step`` is the number of optimizer updates already applied (0 for the first update). A decay over
``total_steps`` reaches its end value at ``step == total_steps`` and stays there afterwards.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from keel.errors import KeelError
from keel.schedules.base import (
    Schedule,
    check_choice,
    check_count,
    check_floor,
    check_lr,
    check_range,
    check_real,
)

__all__ = [
    "constant",
    "step_decay",
    "multistep_decay",
    "exponential_decay",
    "linear_decay",
    "cosine_decay",
    "sqrt_decay",
    "polynomial_decay",
    "inverse_sqrt",
    "noam",
    "rsqrt",
    "wsd",
    "cosine_restarts",
    "COOLDOWN_SHAPES",
]


def _between(high: float, low: float, weight: float) -> float:
    """``low + (high - low) * weight`` for ``low <= high``; exact at weights 1 and 0, never outside."""
    return min(max(high * weight + low * (1.0 - weight), low), high)


def constant(lr: float) -> Schedule:
    """A constant learning rate: ``lr(t) = lr``.

    ``lr`` may be 0 (a frozen stretch inside :func:`~keel.schedules.join`).
    """
    lr = check_lr(lr, "lr", allow_zero=True)
    return Schedule("constant", lambda t: lr, lr=lr)


def step_decay(lr: float, rate: float, interval: int) -> Schedule:
    """Step decay: multiply by ``rate`` every ``interval`` steps.

    ``lr(t) = lr * rate ** floor(t / interval)``. Same as ``torch.optim.lr_scheduler.StepLR``
    (``gamma=rate``, ``step_size=interval``); He et al. 2016 (ResNet) used rate 0.1.
    """
    lr = check_lr(lr, "lr")
    rate = check_range(rate, "rate", 0.0, 1.0, low_open=True)
    interval = check_count(interval, "interval")
    return Schedule("step_decay", lambda t: lr * rate ** (t // interval), lr=lr, rate=rate, interval=interval)


def multistep_decay(lr: float, milestones: Sequence[int], rate: float = 0.1) -> Schedule:
    """Multi-step decay: multiply by ``rate`` at each milestone step.

    ``lr(t) = lr * rate ** (number of milestones m with m <= t)``. Same as
    ``torch.optim.lr_scheduler.MultiStepLR`` (``gamma=rate``) with distinct milestones.
    """
    lr = check_lr(lr, "lr")
    rate = check_range(rate, "rate", 0.0, 1.0, low_open=True)
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence) or not milestones:
        raise KeelError(f"milestones: {milestones!r} is not allowed; must be a non-empty list of steps")
    points = [check_count(m, f"milestones[{i}]") for i, m in enumerate(milestones)]
    if any(b <= a for a, b in zip(points, points[1:])):
        raise KeelError(f"milestones: {list(milestones)!r} is not allowed; must be strictly increasing")
    return Schedule(
        "multistep_decay",
        lambda t: lr * rate ** bisect.bisect_right(points, t),
        lr=lr,
        milestones=tuple(points),
        rate=rate,
    )


def exponential_decay(lr: float, rate: float, interval: int = 1) -> Schedule:
    """Exponential decay: ``lr(t) = lr * rate ** (t / interval)``.

    With ``interval=1`` the same as ``torch.optim.lr_scheduler.ExponentialLR`` (``gamma=rate``);
    a larger interval decays smoothly by ``rate`` every ``interval`` steps (for a staircase use
    :func:`step_decay`).
    """
    lr = check_lr(lr, "lr")
    rate = check_range(rate, "rate", 0.0, 1.0, low_open=True)
    interval = check_count(interval, "interval")
    return Schedule(
        "exponential_decay", lambda t: lr * rate ** (t / interval), lr=lr, rate=rate, interval=interval
    )


def linear_decay(lr: float, total_steps: int, end_lr: float = 0.0) -> Schedule:
    """Linear decay from ``lr`` to ``end_lr`` over ``total_steps``, then constant ``end_lr``.

    ``lr(t) = lr + (end_lr - lr) * min(t, T) / T``. Same as ``torch.optim.lr_scheduler.LinearLR``
    (``start_factor=1``, ``end_factor=end_lr/lr``, ``total_iters=T``) and optax's
    ``linear_schedule``. ``end_lr > lr`` gives a linear ramp up.
    """
    lr = check_lr(lr, "lr")
    total = check_count(total_steps, "total_steps")
    end_lr = check_lr(end_lr, "end_lr", allow_zero=True)
    return Schedule(
        "linear_decay",
        lambda t: lr + (end_lr - lr) * (t / total) if t < total else end_lr,
        lr=lr,
        total_steps=total,
        end_lr=end_lr,
    )


def cosine_decay(lr: float, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Cosine decay from ``lr`` to ``min_lr`` over ``total_steps``, then constant ``min_lr``.

    ``lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * min(t, T) / T)) / 2``. Loshchilov & Hutter 2017
    (SGDR) without restarts. ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``T_max=T``,
    ``eta_min=min_lr``) gives the same values for ``t <= T`` but rises again after ``T``.
    """
    lr = check_lr(lr, "lr")
    total = check_count(total_steps, "total_steps")
    min_lr = check_lr(min_lr, "min_lr", allow_zero=True)
    check_floor(min_lr, "min_lr", lr)
    return Schedule(
        "cosine_decay",
        lambda t: _between(lr, min_lr, 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))),
        lr=lr,
        total_steps=total,
        min_lr=min_lr,
    )


def sqrt_decay(lr: float, total_steps: int) -> Schedule:
    """Square-root decay to zero over ``total_steps``: ``lr(t) = lr * sqrt((T - min(t, T)) / T)``."""
    lr = check_lr(lr, "lr")
    total = check_count(total_steps, "total_steps")
    return Schedule(
        "sqrt_decay", lambda t: lr * math.sqrt((total - min(t, total)) / total), lr=lr, total_steps=total
    )


def polynomial_decay(lr: float, total_steps: int, power: float = 1.0, end_lr: float = 0.0) -> Schedule:
    """Polynomial decay from ``lr`` to ``end_lr`` over ``total_steps``, then constant ``end_lr``.

    ``lr(t) = end_lr + (lr - end_lr) * (1 - min(t, T) / T) ** power``. optax's
    ``polynomial_schedule``; with ``end_lr=0`` the same as ``torch.optim.lr_scheduler.PolynomialLR``.
    """
    lr = check_lr(lr, "lr")
    total = check_count(total_steps, "total_steps")
    power = check_real(power, "power")
    if power <= 0:
        raise KeelError(f"power: {power!r} is not allowed; must be > 0")
    end_lr = check_lr(end_lr, "end_lr", allow_zero=True)
    check_floor(end_lr, "end_lr", lr)
    return Schedule(
        "polynomial_decay",
        lambda t: _between(lr, end_lr, (1.0 - min(t, total) / total) ** power),
        lr=lr,
        total_steps=total,
        power=power,
        end_lr=end_lr,
    )


def inverse_sqrt(lr: float, warmup_steps: int, init_lr: float = 0.0) -> Schedule:
    """Linear warmup to ``lr`` over ``warmup_steps``, then decay with the inverse square root of the step.

    ``lr(t) = init_lr + (lr - init_lr) * t / W`` for ``t < W``, else ``lr * sqrt(W / t)``.
    fairseq's ``inverse_sqrt`` scheduler (Vaswani et al. 2017's decay with the peak given directly).
    """
    lr = check_lr(lr, "lr")
    w = check_count(warmup_steps, "warmup_steps")
    init_lr = check_lr(init_lr, "init_lr", allow_zero=True)
    check_floor(init_lr, "init_lr", lr)

    def fn(t: int) -> float:
        if t < w:
            return init_lr + (lr - init_lr) * (t / w)
        return lr * math.sqrt(w / t)

    return Schedule("inverse_sqrt", fn, lr=lr, warmup_steps=w, init_lr=init_lr)


def noam(scale: float, model_dim: int, warmup_steps: int) -> Schedule:
    """The Transformer schedule: ``scale * model_dim**-0.5 * min(s**-0.5, s * warmup_steps**-1.5)``, ``s = t + 1``.

    Vaswani et al. 2017 ("Attention Is All You Need"), as OpenNMT-tf's ``NoamDecay`` (which counts
    from ``step + 1``). Rises linearly for ``warmup_steps`` steps, then decays as ``s**-0.5``. Combine
    with :func:`~keel.schedules.wrap` for OpenNMT-tf's ``start_decay_steps``,
    ``decay_step_duration`` and ``minimum_learning_rate``.
    """
    scale = check_lr(scale, "scale")
    model_dim = check_count(model_dim, "model_dim")
    w = check_count(warmup_steps, "warmup_steps")
    factor = scale * model_dim**-0.5
    w_pow = w**-1.5

    def fn(t: int) -> float:
        s = t + 1
        return factor * min(s**-0.5, s * w_pow)

    return Schedule("noam", fn, scale=scale, model_dim=model_dim, warmup_steps=w)


def rsqrt(scale: float, warmup_steps: int) -> Schedule:
    """Reciprocal square root with a constant start: ``lr(t) = scale / sqrt(max(t, warmup_steps))``.

    OpenNMT-tf's ``RsqrtDecay`` (T5/Mesh TensorFlow's ``rsqrt_decay``); constant
    ``scale / sqrt(warmup_steps)`` until ``warmup_steps``.
    """
    scale = check_lr(scale, "scale")
    w = check_count(warmup_steps, "warmup_steps")
    return Schedule("rsqrt", lambda t: scale / math.sqrt(max(t, w)), scale=scale, warmup_steps=w)


COOLDOWN_SHAPES = ("linear", "cosine", "sqrt", "1-sqrt")


def _cooldown(shape: str, x: float) -> float:
    """The fraction of the way from the peak down to the floor, for progress ``x`` in [0, 1]: 1 -> 0."""
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "sqrt":
        return math.sqrt(1.0 - x)
    return 1.0 - math.sqrt(x)  # "1-sqrt"


def wsd(
    lr: float,
    total_steps: int,
    decay_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    shape: str = "linear",
) -> Schedule:
    """Warmup-stable-decay: linear warmup from 0, a constant stretch at ``lr``, then a cooldown to ``min_lr``.

    With ``W = warmup_steps``, ``D = decay_steps``, ``T = total_steps`` and ``x = (t - (T - D)) / D``:
    ``lr(t) = lr * t / W`` for ``t < W``; ``lr`` for ``W <= t < T - D``;
    ``min_lr + (lr - min_lr) * c(x)`` for ``T - D <= t <= T``; ``min_lr`` afterwards.
    Cooldown shapes ``c``: ``"linear"`` ``1 - x``; ``"cosine"`` ``(1 + cos(pi x)) / 2``;
    ``"sqrt"`` ``sqrt(1 - x)`` (the shape of :func:`sqrt_decay`); ``"1-sqrt"`` ``1 - sqrt(x)``
    (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
    Hu et al. 2024 (MiniCPM) introduced WSD.
    """
    lr = check_lr(lr, "lr")
    total = check_count(total_steps, "total_steps")
    d = check_count(decay_steps, "decay_steps")
    w = check_count(warmup_steps, "warmup_steps", minimum=0)
    min_lr = check_lr(min_lr, "min_lr", allow_zero=True)
    check_floor(min_lr, "min_lr", lr)
    shape = check_choice(shape, "shape", COOLDOWN_SHAPES)
    if w >= total:
        raise KeelError(f"warmup_steps: {w} steps is at or beyond the run length ({total} steps); the warmup must end "
                        "before the run does")
    if w + d > total:
        raise KeelError(
            f"decay_steps: warmup_steps ({w}) + decay_steps ({d}) = {w + d} is more than total_steps ({total}); "
            "the warmup and the cooldown must fit in the run"
        )
    start = total - d

    def fn(t: int) -> float:
        if t < w:
            return lr * (t / w)
        if t < start:
            return lr
        x = min(t - start, d) / d
        return _between(lr, min_lr, _cooldown(shape, x))

    return Schedule(
        "wsd", fn, lr=lr, total_steps=total, decay_steps=d, warmup_steps=w, min_lr=min_lr, shape=shape
    )


def cosine_restarts(
    lr: float,
    period: int,
    period_mult: float = 1.0,
    decay: float = 1.0,
    min_lr: float = 0.0,
) -> Schedule:
    """Cosine annealing with warm restarts (SGDR; Loshchilov & Hutter 2017).

    Cycle ``i`` (from 0) lasts ``T_i = period * period_mult**i`` steps and peaks at
    ``lr_i = max(lr * decay**i, min_lr)``;
    at position ``t_i`` in its cycle, ``lr(t) = min_lr + (lr_i - min_lr) * (1 + cos(pi * t_i / T_i)) / 2``.
    The LR jumps back to ``lr_i`` at each restart. Same as
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` (``T_0=period``, ``T_mult=period_mult``,
    ``eta_min=min_lr``) when ``decay=1`` and ``period_mult`` is a whole number (torch allows only those).
    Snapshot ensembles (Huang et al. 2017) use ``period = ceil(total_steps / M)`` for ``M`` snapshots.
    """
    lr = check_lr(lr, "lr")
    period = check_count(period, "period")
    mult = check_real(period_mult, "period_mult")
    if mult < 1:
        raise KeelError(f"period_mult: {mult!r} is not allowed; must be >= 1")
    decay = check_range(decay, "decay", 0.0, 1.0, low_open=True)
    min_lr = check_lr(min_lr, "min_lr", allow_zero=True)
    check_floor(min_lr, "min_lr", lr)

    def fn(t: int) -> float:
        if mult == 1.0:
            cycle, position, length = t // period, t % period, float(period)
        else:
            # Cycles grow geometrically, so this loop runs O(log t) times.
            cycle, start, length = 0, 0.0, float(period)
            while t >= start + length:
                start += length
                cycle += 1
                length = period * mult**cycle
            position = t - start
        peak = max(lr * decay**cycle, min_lr)
        return _between(peak, min_lr, 0.5 * (1.0 + math.cos(math.pi * position / length)))

    return Schedule(
        "cosine_restarts", fn, lr=lr, period=period, period_mult=mult, decay=decay, min_lr=min_lr
    )
