"""Pure functions over logged series (losses, learning rates, gradient norms) that the diagnoses rest on.

Nothing here trains or reads files: each function takes lists of numbers and returns numbers or a small record,
so every threshold can be tested on synthetic curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A loss that rises this far above the initial loss (as a multiple of it) has blown up.
BLOW_UP_FACTOR = 1.5


def finite(values: list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


def level(values: list[float] | np.ndarray, center: float, width: int) -> float:
    """Median of the ``width`` values around position ``center`` (a fraction 0..1 of the series)."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    middle = int(round(center * (n - 1)))
    half = max(1, width // 2)
    lo, hi = max(0, middle - half), min(n, middle + half + 1)
    if center <= 0:
        lo, hi = 0, min(n, width)
    elif center >= 1:
        lo, hi = max(0, n - width), n
    return float(np.median(array[lo:hi]))


def trailing_median(values: list[float] | np.ndarray, window: int) -> np.ndarray:
    """Median of each value and the ``window - 1`` before it (fewer at the start)."""
    array = np.asarray(values, dtype=float)
    return np.array([np.median(array[max(0, i - window + 1):i + 1]) for i in range(len(array))])


def noise_scale(values: list[float] | np.ndarray, window: int) -> float:
    """Robust step-to-step noise: 1.4826 x the median absolute deviation of the values from their trailing median."""
    array = np.asarray(values, dtype=float)
    if len(array) < 3:
        return 0.0
    residual = array - trailing_median(array, window)
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def ema_smooth(values: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (the LR range test's smoothing, as fastai's)."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta**i))
    return smoothed


def percentile(values: list[float], q: float) -> float:
    array = finite(values)
    return float(np.percentile(array, q)) if len(array) else math.nan


def warmup_end(lrs: list[float]) -> int:
    """Index where a rising LR first reaches its peak (0 when the LR does not start below half its peak)."""
    array = np.asarray(lrs, dtype=float)
    if not len(array) or not np.isfinite(array).all() or array.max() <= 0 or array[0] >= 0.5 * array.max():
        return 0
    return int(np.argmax(array >= 0.99 * array.max()))


def lr_drops(lrs: list[float], factor: float = 0.7, after: int = 0) -> list[int]:
    """Indices ``i`` where the LR falls abruptly: ``lr[i] <= factor * lr[i - 1]`` (a step decay), after ``after``."""
    return [i for i in range(max(1, after + 1), len(lrs))
            if lrs[i - 1] > 0 and lrs[i] <= factor * lrs[i - 1]]


@dataclass
class Stability:
    """How a short run went. ``status``: ``stable``; ``diverged`` (NaN/inf, blow-up, or the trainer stopped it);
    ``jump`` (a sudden rise after a steady fall); ``early`` (the loss rose above its initial value at the start);
    ``no_progress`` (it ended no lower than it began)."""

    status: str
    step: int | None = None  # where the trouble starts (index into the run's steps)
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def stable(self) -> bool:
        return self.status == "stable"

    @property
    def early(self) -> bool:
        return self.status == "early" or bool(self.evidence.get("early"))


def classify(losses: list[float], steps: list[int] | None = None, *, initial: float | None = None,
             stopped: str | None = None, early_steps: int = 10) -> Stability:
    """Classify a loss curve as stable or not (see ``Stability``).

    - diverged: a non-finite loss, ``stopped`` (the trainer or a probe stopped it: the reason), or the trailing
      median rising above ``BLOW_UP_FACTOR`` x the initial loss; ``early`` when the rise began (the step after the
      lowest point before it) within ``early_steps``;
    - early: within the first ``early_steps`` the trailing median rises above the initial loss by more than
      4 noise scales (and 2%): training at this LR goes the wrong way from initialisation;
    - jump: after the loss has fallen by at least 10% of the initial loss, the trailing median rises above its
      running minimum by more than a quarter of the fall so far and 4 noise scales (the Playbook's "sudden rise in
      the loss after a steady decline");
    - no_progress: the last tenth of the run is no lower than 98% of the initial loss.
    Noise is 1.4826 x the MAD of the losses around their trailing median (window: 5% of the run, 3 to 10).
    """
    steps = list(steps) if steps is not None else list(range(len(losses)))
    values = np.asarray(losses, dtype=float)
    start = float(initial) if initial is not None and math.isfinite(initial) else (
        float(values[0]) if len(values) and math.isfinite(values[0]) else math.nan)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        return Stability("diverged", steps[i], f"non-finite loss at step {steps[i]}",
                         {"step": steps[i], "loss": float(values[i]), "initial_loss": start,
                          "early": steps[i] < early_steps})
    if not len(values):
        if stopped:
            return Stability("diverged", 0, stopped, {"reason": stopped, "steps_run": 0, "early": True})
        return Stability("no_progress", None, "no step was logged", {"steps_run": 0})
    window = int(min(10, max(3, len(values) // 20)))
    median = trailing_median(values, window)
    noise = noise_scale(values, window)
    blown = np.flatnonzero(median > BLOW_UP_FACTOR * start) if math.isfinite(start) and start > 0 else []
    if len(blown):
        i = int(blown[0])
        onset = _onset(median, i, steps)
        return Stability("diverged", steps[i], f"the loss blew up: {median[i]:.4g} at step {steps[i]} from "
                         f"{start:.4g} at the start, rising from step {onset}",
                         {"step": steps[i], "loss": float(median[i]), "initial_loss": start, "rising_from": onset,
                          "early": onset < early_steps})
    if stopped:
        i = len(values) - 1
        onset = _onset(median, i, steps)
        return Stability("diverged", steps[i], stopped,
                         {"step": steps[i], "loss": float(values[i]), "initial_loss": start, "reason": stopped,
                          "rising_from": onset, "early": onset < early_steps})
    rise = max(4 * noise, 0.02 * abs(start))
    for i in range(len(values)):
        if steps[i] >= early_steps:
            break
        if median[i] > start + rise:
            return Stability("early", steps[i], f"the loss rose from {start:.4g} to {median[i]:.4g} by step "
                             f"{steps[i]}, right after initialisation",
                             {"step": steps[i], "loss": float(median[i]), "initial_loss": start,
                              "noise": noise, "early": True})
    running_min = np.minimum.accumulate(median)
    for i in range(window, len(values)):
        fallen = start - running_min[i - 1]
        if fallen < 0.1 * abs(start):
            continue
        threshold = max(0.25 * fallen, 4 * noise)
        if median[i] - running_min[i - 1] > threshold:
            low = int(np.argmin(median[:i]))
            return Stability("jump", steps[i], f"the loss jumped from {running_min[i - 1]:.4g} (step {steps[low]}) "
                             f"to {median[i]:.4g} at step {steps[i]} after a steady fall",
                             {"step": steps[i], "loss": float(median[i]), "lowest_step": steps[low],
                              "lowest_loss": float(running_min[i - 1]), "initial_loss": start,
                              "threshold": threshold, "noise": noise, "early": steps[low] < early_steps})
    end = level(values, 1.0, max(3, len(values) // 10))
    if math.isfinite(start) and end >= start - 0.02 * abs(start):
        return Stability("no_progress", steps[-1], f"the loss ended at {end:.4g}, no lower than {start:.4g} at the "
                         "start", {"step": steps[-1], "final_loss": end, "initial_loss": start})
    return Stability("stable", None, f"the loss fell from {start:.4g} to {end:.4g} without a jump",
                     {"initial_loss": start, "final_loss": end, "noise": noise, "steps_run": len(values)})


def _onset(median: np.ndarray, end: int, steps: list[int]) -> int:
    """The step after which a curve that goes wrong at index ``end`` last stood at its lowest: where the rise began."""
    if end <= 0:
        return steps[0] if steps else 0
    low = int(np.argmin(median[:end]))
    return steps[min(low + 1, end)]


def parabola_minimum(log_lrs: list[float], losses: list[float]) -> tuple[float, float] | None:
    """Vertex (log10 lr, loss) of the parabola through three points, or None when it opens downwards."""
    if len(log_lrs) != 3:
        return None
    a, b, c = np.polyfit(np.asarray(log_lrs, dtype=float), np.asarray(losses, dtype=float), 2)
    if a <= 0:
        return None
    x = -b / (2 * a)
    return float(x), float(a * x * x + b * x + c)
