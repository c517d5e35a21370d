"""The pure signals the diagnoses rest on, on synthetic curves."""

import math

import numpy as np
import pytest

from keel.diagnose import signals


def _decay(n=200, start=5.0, end=2.0, rate=0.03, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return list(end + (start - end) * np.exp(-rate * t) + noise * rng.standard_normal(n))


def test_a_smooth_fall_is_stable():
    result = signals.classify(_decay())
    assert result.status == "stable" and result.stable
    assert result.evidence["initial_loss"] == pytest.approx(5.0, abs=0.1)


def test_non_finite_loss_is_divergence_at_its_step():
    losses = _decay(50)
    losses[30] = math.nan
    result = signals.classify(losses)
    assert result.status == "diverged" and result.step == 30
    assert not result.early


def test_blow_up_is_divergence_and_early_when_the_rise_starts_early():
    losses = [5.0, 4.8, 4.9, 5.5, 6.5, 8.0, 11.0, 15.0, 20.0, 30.0]
    result = signals.classify(losses, early_steps=5)
    assert result.status == "diverged"
    assert result.early and result.evidence["rising_from"] <= 3


def test_sudden_jump_after_a_steady_fall():
    losses = _decay(150) + [4.0] * 20
    result = signals.classify(losses, early_steps=10)
    assert result.status == "jump"
    assert result.step >= 150 and not result.early
    assert result.evidence["lowest_loss"] < 2.2


def test_rise_right_after_initialisation_is_early():
    losses = [5.0, 5.3, 5.6, 5.8, 5.9, 5.8, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0] + [3.0] * 10
    result = signals.classify(losses, early_steps=10)
    assert result.status == "early" and result.early


def test_no_progress():
    result = signals.classify([5.0 + 0.01 * (i % 3) for i in range(60)])
    assert result.status == "no_progress"


def test_stopped_by_the_trainer_is_divergence():
    result = signals.classify(_decay(20), stopped="10 consecutive updates skipped")
    assert result.status == "diverged" and "skipped" in result.message


def test_lr_helpers():
    warm = [0.1 * i for i in range(10)] + [1.0] * 20
    assert signals.warmup_end(warm) == 10
    assert signals.warmup_end([1.0] * 5) == 0
    steps = [1.0] * 10 + [0.1] * 10 + [0.01] * 5
    assert signals.lr_drops(steps) == [10, 20]
    smoothed = signals.ema_smooth([2.0] * 10, beta=0.9)
    assert smoothed == pytest.approx([2.0] * 10)  # bias correction: no ramp from 0
    assert signals.parabola_minimum([-3, -2, -1], [3.0, 2.0, 3.0]) == pytest.approx((-2.0, 2.0))
    assert signals.parabola_minimum([-3, -2, -1], [2.0, 3.0, 2.0]) is None
