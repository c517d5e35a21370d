"""Parity with torch.optim.lr_scheduler, stepping a dummy optimizer, in float64 Python floats.

Conventions: keel's schedule(t) is the LR used for update t (t updates already applied); torch's
scheduler gives it after t calls of scheduler.step(). torch's LinearLR, ExponentialLR, PolynomialLR
and CosineAnnealingLR update the LR recursively, so they agree with keel's closed forms up to
rounding (rel 1e-9). CosineAnnealingLR rises again after T_max (keel's cosine_decay stays at
min_lr), so it is compared up to T_max; CosineAnnealingWarmRestarts allows only whole T_mult.
"""

import pytest
import torch
from torch.optim import lr_scheduler

from keel.schedules import (
    cosine_decay,
    cosine_restarts,
    exponential_decay,
    linear_decay,
    multistep_decay,
    polynomial_decay,
    reduce_on_plateau,
    step_decay,
)


def _torch_lrs(make_scheduler, lr, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = {
    "step": (step_decay(0.1, 0.5, 7), lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 60),
    "multistep": (
        multistep_decay(0.1, [5, 17, 30], rate=0.3),
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[5, 17, 30], gamma=0.3),
        60,
    ),
    "exponential": (exponential_decay(0.1, 0.97), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.97), 200),
    "linear": (
        linear_decay(0.1, 50, end_lr=0.01),
        lambda o: lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=50),
        80,
    ),
    "polynomial": (
        polynomial_decay(0.1, 40, power=2.0),
        lambda o: lr_scheduler.PolynomialLR(o, total_iters=40, power=2.0),
        60,
    ),
    "cosine": (
        cosine_decay(0.1, 100, min_lr=0.001),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=0.001),
        101,
    ),
    "restarts": (
        cosine_restarts(0.1, 10, period_mult=2, min_lr=0.001),
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=0.001),
        160,
    ),
    "restarts_mult1": (
        cosine_restarts(0.1, 13),
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=13),
        100,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_scheduler(name):
    schedule, make_scheduler, steps = CASES[name]
    expected = _torch_lrs(make_scheduler, schedule(0), steps)
    got = [schedule(t) for t in range(steps)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    "options",
    [
        {"factor": 0.5, "patience": 2},
        {"factor": 0.1, "patience": 0, "cooldown": 2, "min_lr": 0.002},
        {"factor": 0.3, "patience": 1, "threshold": 0.05, "threshold_mode": "abs"},
        {"factor": 0.5, "patience": 1, "mode": "max", "threshold": 0.01},
    ],
)
def test_plateau_matches_torch(options):
    metrics = [1.0, 0.9, 0.95, 0.91, 0.92, 0.899, 0.93, 0.94, 0.95, 0.5, 0.6, 0.7, 0.8, 0.9, 0.45, 0.46,
               0.47, 0.48, 0.49, 0.5, 0.51, 0.52, 0.53, 0.54]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, **options)
    ours = reduce_on_plateau(0.1, **options)
    for step, metric in enumerate(metrics):
        assert ours(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step(metric)
        ours.observe(metric)
    assert ours.num_reductions > 0
