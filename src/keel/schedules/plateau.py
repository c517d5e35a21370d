"""Metric-driven schedule: reduce the learning rate when a monitored metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from keel.errors import KeelError
from keel.schedules.base import check_choice, check_count, check_lr, check_range, check_real, check_schedule
from keel.schedules.decays import constant

__all__ = ["ReduceOnPlateau", "reduce_on_plateau"]


class ReduceOnPlateau:
    """Multiply the learning rate by ``factor`` after ``patience`` evaluations without improvement.

    Built by :func:`reduce_on_plateau`, which documents the rule. Call it with the step for the LR,
    call :meth:`observe` with the metric after each evaluation, and save :meth:`state_dict` in
    checkpoints (all plain floats and ints).
    """

    def __init__(
        self,
        base: Callable[[int], float],
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        cooldown: int,
        min_lr: float,
        mode: str,
        eps: float,
    ) -> None:
        self.base = base
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.mode = mode
        self.eps = eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_counter = 0
        self.scale = 1.0
        self.num_reductions = 0
        self.last_step = 0

    def _value(self, step: int, scale: float) -> float:
        value = self.base(step)
        return value if scale == 1.0 else max(value * scale, self.min_lr)

    def __call__(self, step: int) -> float:
        value = self.base(step)  # checks the step
        self.last_step = int(step)
        return value if self.scale == 1.0 else max(value * self.scale, self.min_lr)

    def _is_better(self, value: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return value < self.best * (1.0 - self.threshold)
            return value < self.best - self.threshold
        if self.threshold_mode == "rel":
            return value > self.best * (1.0 + self.threshold)
        return value > self.best + self.threshold

    def observe(self, metric: float) -> None:
        """Record one evaluation of the monitored metric (e.g. the validation loss)."""
        try:
            value = float(metric)
        except (TypeError, ValueError):
            raise KeelError(f"metric: {metric!r} is not a number") from None
        if self._is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            old = self._value(self.last_step, self.scale)
            new = self._value(self.last_step, self.scale * self.factor)
            if old - new > self.eps:
                self.scale *= self.factor
                self.num_reductions += 1
            self.cooldown_counter = self.cooldown
            self.num_bad = 0

    def state_dict(self) -> dict[str, Any]:
        """The evolving state: best metric, counters and the current LR multiplier."""
        return {
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
            "scale": self.scale,
            "num_reductions": self.num_reductions,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise KeelError(f"reduce_on_plateau state: missing {', '.join(missing)}; was it saved by this schedule?")
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.scale = float(state["scale"])
        self.num_reductions = int(state["num_reductions"])
        self.last_step = int(state["last_step"])

    def __repr__(self) -> str:
        return (
            f"reduce_on_plateau(base={self.base!r}, factor={self.factor!r}, patience={self.patience!r}, "
            f"threshold={self.threshold!r}, threshold_mode={self.threshold_mode!r}, cooldown={self.cooldown!r}, "
            f"min_lr={self.min_lr!r}, mode={self.mode!r})"
        )


def reduce_on_plateau(
    lr: float | Callable[[int], float],
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    mode: str = "min",
    eps: float = 1e-8,
) -> ReduceOnPlateau:
    """Reduce the LR by ``factor`` when the metric has not improved for more than ``patience`` evaluations.

    ``lr`` is a peak LR or a schedule to scale (e.g. a warmup); the LR is ``base(t)`` until the first
    reduction and ``max(base(t) * factor**k, min_lr)`` after ``k`` reductions. After each
    :meth:`~ReduceOnPlateau.observe`: the metric improves when it is below
    ``best * (1 - threshold)`` (``threshold_mode="rel"``) or ``best - threshold`` (``"abs"``)
    (above ``best * (1 + threshold)`` / ``best + threshold`` with ``mode="max"``); otherwise the
    count of bad evaluations grows. During ``cooldown`` evaluations after a reduction bad
    evaluations are not counted. When the count exceeds ``patience`` the LR is reduced, unless that
    would change it by no more than ``eps``. The rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
    """
    if callable(lr):
        base = check_schedule(lr, "lr")
    else:
        base = constant(check_lr(lr, "lr"))
    factor = check_range(factor, "factor", 0.0, 1.0, low_open=True, high_open=True)
    patience = check_count(patience, "patience", minimum=0)
    threshold = check_real(threshold, "threshold")
    if threshold < 0:
        raise KeelError(f"threshold: {threshold!r} is not allowed; must be >= 0")
    threshold_mode = check_choice(threshold_mode, "threshold_mode", ("rel", "abs"))
    cooldown = check_count(cooldown, "cooldown", minimum=0)
    min_lr = check_lr(min_lr, "min_lr", allow_zero=True)
    mode = check_choice(mode, "mode", ("min", "max"))
    eps = check_real(eps, "eps")
    if eps < 0:
        raise KeelError(f"eps: {eps!r} is not allowed; must be >= 0")
    return ReduceOnPlateau(base, factor, patience, threshold, threshold_mode, cooldown, min_lr, mode, eps)
