"""What keel's Lightning and HF callbacks share (keel.integrations.callbacks), without either trainer."""

import pytest
import torch
from torch import nn

from keel.errors import KeelError
from keel.integrations.callbacks import clip_config, count, every_steps, start_clipper, swa_phase_lr
from keel.integrations.scheduler import KeelLRScheduler
from keel.schedules import constant, warmup
from keel.timeunits import Timeline


def test_a_run_starts_its_clipper_with_the_schedules_warmup_and_the_norms_carried_over():
    config = clip_config(mode="percentile", window=4, calibration_steps=2, start_after_warmup=True)
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    scheduler = KeelLRScheduler(optimizer, warmup(constant(0.1), 5))
    clipper = start_clipper(config, {"norms": [1.0, 2.0]}, None, scheduler, "keel_scheduler")
    assert clipper.warmup_steps == 5 and list(clipper.norms) == [1.0, 2.0]
    assert start_clipper(config, {"norms": []}, 3, None, "keel_scheduler").warmup_steps == 3
    with pytest.raises(KeelError, match="Clip.start_after_warmup: .*or keel_optimizers$"):
        start_clipper(config, {"norms": []}, None, None, "keel_optimizers")
    with pytest.raises(KeelError, match="mode"):
        clip_config(mode="sometimes")


def test_counts_and_intervals_are_checked_in_one_line():
    with pytest.raises(KeelError, match=r"^UpdateRatio.every: 0; allowed: an int >= 1$"):
        count(0, "UpdateRatio.every")
    with pytest.raises(KeelError, match="CheckpointAverage.last: True"):
        count(True, "CheckpointAverage.last")
    timeline = Timeline.at_rate(100, steps_per_epoch=10)
    assert every_steps(timeline, "1ep", "ema.every") == 10
    with pytest.raises(KeelError, match="ema.every: '0.1%' resolves to 0 steps"):
        every_steps(timeline, "0.1%", "ema.every")


def test_the_swa_phase_takes_the_schedules_lr_at_its_start_and_anneals_to_its_own():
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    scheduler = KeelLRScheduler(optimizer, lambda step: 1.0 - step / 100)
    swa = type("SWABlock", (), {"lr": 0.1, "anneal_strategy": "linear"})()
    phase = {"start": 10, "config": swa, "anneal_steps": 2, "optimizers": [optimizer], "scheduler": scheduler}
    assert swa_phase_lr(9, start_lr=None, **phase) is None and optimizer.param_groups[0]["lr"] == 1.0
    start_lr = swa_phase_lr(11, start_lr=None, **phase)
    assert start_lr == pytest.approx(0.9)  # the schedule's LR at the phase start, not at step 11
    assert optimizer.param_groups[0]["lr"] == pytest.approx((0.9 + 0.1) / 2)
    scheduler.multiplier = 0.5
    swa_phase_lr(20, start_lr=start_lr, **phase)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
