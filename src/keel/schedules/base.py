"""What every schedule shares: the callable wrapper, argument checks and applying an LR to an optimizer."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from keel.errors import KeelError

__all__ = ["Schedule", "set_lr", "warmup_steps"]


class Schedule:
    """A learning-rate schedule: a pure function of the step that returns the absolute learning rate.

    ``step`` is the number of optimizer updates already applied (0 for the first update). The
    wrapper checks the step, returns a Python float and gives the schedule a readable ``repr``
    showing how it was built.
    """

    __slots__ = ("_fn", "name", "params")

    def __init__(self, name: str, fn: Callable[[int], float], **params: Any) -> None:
        self._fn = fn
        self.name = name
        self.params = params

    def __call__(self, step: int) -> float:
        try:
            step = operator.index(step)
        except TypeError:
            raise KeelError(f"step: {step!r} is not an integer; a step counts optimizer updates") from None
        if step < 0:
            raise KeelError(f"step: {step} is negative; steps start at 0 (the first update)")
        return float(self._fn(step))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def warmup_steps(schedule: Callable[[int], float]) -> int:
    """Length of the warmup a schedule starts with (0 if none): what "after warmup" means for clipping.

    The outermost ``warmup`` combinator's ``steps``; a schedule's own ``warmup_steps`` (wsd, noam, rsqrt,
    inverse_sqrt); through ``wrap`` as ``step_start + inner * step_duration``; through reduce-on-plateau to its
    base; for ``join``, the first piece's warmup, or the whole first piece when it ends higher than it starts.
    """
    base = getattr(schedule, "base", None)
    if callable(base):  # reduce-on-plateau
        return warmup_steps(base)
    params = getattr(schedule, "params", {})
    name = getattr(schedule, "name", "")
    if name == "warmup":
        return int(params["steps"])
    if "warmup_steps" in params:
        return int(params["warmup_steps"])
    if name == "wrap":
        return params["step_start"] + warmup_steps(params["schedule"]) * params["step_duration"]
    if name == "join":
        first, boundary = params["schedules"][0], params["boundaries"][0]
        return warmup_steps(first) or (boundary if first(boundary - 1) > first(0) else 0)
    return 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate to ``lr * group["lr_scale"]``.

    keel's parameter groups carry ``lr_scale`` (per-group LR multipliers, layer-wise decay). Groups of a plain
    torch optimizer that have none get it once, from their own LRs at the first call: each group's LR divided by
    the largest (``initial_lr`` where a torch scheduler set it), so their ratios are kept. A group whose ``lr`` is
    a tensor (as used by fused or capturable optimizers) is updated in place.
    """
    groups = optimizer.param_groups
    if any("lr_scale" not in group for group in groups):
        initial = [float(group.get("initial_lr", group["lr"])) for group in groups]
        reference = max(initial)
        for group, value in zip(groups, initial):
            group.setdefault("lr_scale", value / reference if reference > 0 else 1.0)
    for group in groups:
        value = lr * group["lr_scale"]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the schedule constructors. `arg` is the argument name used in errors.


def check_real(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise KeelError(f"{arg}: {value!r} is not a number") from None
    value = float(value)
    if not math.isfinite(value):
        raise KeelError(f"{arg}: {value!r} is not finite")
    return value


def check_lr(value: Any, arg: str, *, allow_zero: bool = False) -> float:
    """A learning rate: > 0 (or >= 0 with ``allow_zero``)."""
    value = check_real(value, arg)
    if value < 0 or (value == 0 and not allow_zero):
        raise KeelError(f"{arg}: {value!r} is not allowed; must be {'>= 0' if allow_zero else '> 0'}")
    return value


def check_count(value: Any, arg: str, *, minimum: int = 1) -> int:
    """A whole number of steps >= ``minimum``."""
    if isinstance(value, bool):
        raise KeelError(f"{arg}: {value!r} is not a whole number of steps")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        value = operator.index(value)
    except TypeError:
        raise KeelError(f"{arg}: {value!r} is not a whole number of steps") from None
    if value < minimum:
        raise KeelError(f"{arg}: {value} is not allowed; must be >= {minimum}")
    return value


def check_range(
    value: Any, arg: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    value = check_real(value, arg)
    if (value < low or (low_open and value == low)) or (value > high or (high_open and value == high)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise KeelError(f"{arg}: {value!r} is not allowed; must be in {left}{low:g}, {high:g}{right}")
    return value


def check_choice(value: Any, arg: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise KeelError(f"{arg}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def check_floor(floor: float, floor_arg: str, lr: float, lr_arg: str = "lr") -> None:
    """A floor (min_lr, end_lr) must not exceed the peak it decays from."""
    if floor > lr:
        raise KeelError(f"{floor_arg}: {floor!r} is above {lr_arg} ({lr!r}); must be <= {lr_arg}")


def check_schedule(schedule: Any, arg: str) -> Callable[[int], float]:
    """A step -> LR callable; stateful (metric-driven) schedules must be outermost."""
    if not callable(schedule):
        raise KeelError(f"{arg}: {schedule!r} is not a schedule (a callable step -> learning rate)")
    if hasattr(schedule, "observe"):
        raise KeelError(
            f"{arg}: {schedule!r} is metric-driven and must be the outermost schedule; "
            "pass the other schedule to it instead, e.g. reduce_on_plateau(warmup(constant(lr), 100))"
        )
    return schedule
