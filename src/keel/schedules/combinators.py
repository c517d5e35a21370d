"""Combinators: build a schedule out of others (warmup in front, pieces joined, steps remapped)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from keel.errors import KeelError
from keel.schedules.base import Schedule, check_choice, check_count, check_lr, check_schedule

__all__ = ["warmup", "join", "wrap", "WARMUP_SHAPES"]

WARMUP_SHAPES = ("linear", "exponential")


def warmup(schedule: Callable[[int], float], steps: int, init_lr: float = 0.0, shape: str = "linear") -> Schedule:
    """Put a warmup of ``steps`` steps in front of ``schedule``.

    With ``W = steps`` and ``target = schedule(0)``: for ``t < W``,
    ``"linear"``: ``lr(t) = init_lr + (target - init_lr) * t / W`` (Goyal et al. 2017);
    ``"exponential"``: ``lr(t) = init_lr * (target / init_lr) ** (t / W)`` (geometric; needs ``init_lr > 0``).
    For ``t >= W``: ``lr(t) = schedule(t - W)``, so the warmup reaches the schedule's starting value
    exactly at step ``W`` and the schedule then runs its whole course. ``steps=0`` is no warmup.
    """
    schedule = check_schedule(schedule, "schedule")
    w = check_count(steps, "steps", minimum=0)
    init_lr = check_lr(init_lr, "init_lr", allow_zero=True)
    shape = check_choice(shape, "shape", WARMUP_SHAPES)
    if shape == "exponential" and init_lr == 0 and w > 0:
        raise KeelError("init_lr: 0.0 is not allowed with shape 'exponential'; must be > 0 (the ramp is geometric)")
    target = schedule(0)
    if shape == "exponential" and w > 0 and target <= 0:
        raise KeelError(f"schedule: starts at {target!r}; an exponential warmup needs a schedule starting above 0")

    def fn(t: int) -> float:
        if t >= w:
            return schedule(t - w)
        if shape == "linear":
            return init_lr + (target - init_lr) * (t / w)
        return init_lr * (target / init_lr) ** (t / w)

    return Schedule("warmup", fn, schedule=schedule, steps=w, init_lr=init_lr, shape=shape)


def join(schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` until ``boundaries[1]``, and so on.

    ``lr(t) = schedules[i](t - boundaries[i-1])`` for ``boundaries[i-1] <= t < boundaries[i]``
    (with ``boundaries[-1] = 0``): each piece sees steps relative to its own start. optax's
    ``join_schedules``. Needs ``len(boundaries) == len(schedules) - 1``, strictly increasing, > 0.
    """
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence) or not schedules:
        raise KeelError(f"schedules: {schedules!r} is not allowed; must be a non-empty list of schedules")
    pieces = [check_schedule(s, f"schedules[{i}]") for i, s in enumerate(schedules)]
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise KeelError(f"boundaries: {boundaries!r} is not allowed; must be a list of steps")
    if len(boundaries) != len(pieces) - 1:
        raise KeelError(
            f"boundaries: {list(boundaries)!r} has {len(boundaries)} entries; "
            f"{len(pieces)} schedules need {len(pieces) - 1}"
        )
    points = [check_count(b, f"boundaries[{i}]") for i, b in enumerate(boundaries)]
    if any(b <= a for a, b in zip(points, points[1:])):
        raise KeelError(f"boundaries: {points!r} is not allowed; must be strictly increasing")
    starts = [0, *points]

    def fn(t: int) -> float:
        i = bisect.bisect_right(points, t)
        return pieces[i](t - starts[i])

    return Schedule("join", fn, schedules=tuple(pieces), boundaries=tuple(points))


def wrap(
    schedule: Callable[[int], float], step_start: int = 0, step_duration: int = 1, minimum: float = 0.0
) -> Schedule:
    """Remap steps and floor the result, exactly as OpenNMT-tf's ``ScheduleWrapper``.

    ``s = max(t - step_start, 0) // step_duration``; ``lr(t) = max(schedule(s), minimum)``.
    With :func:`~keel.schedules.noam` this gives OpenNMT-tf's ``start_decay_steps``,
    ``decay_step_duration`` and ``minimum_learning_rate``.
    """
    schedule = check_schedule(schedule, "schedule")
    start = check_count(step_start, "step_start", minimum=0)
    duration = check_count(step_duration, "step_duration")
    minimum = check_lr(minimum, "minimum", allow_zero=True)
    return Schedule(
        "wrap",
        lambda t: max(schedule(max(t - start, 0) // duration), minimum),
        schedule=schedule,
        step_start=start,
        step_duration=duration,
        minimum=minimum,
    )
