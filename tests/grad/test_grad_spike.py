"""Loss-spike detector: robust threshold, spikes kept out of the window, state round trip."""

import math
import statistics

import pytest
import torch

from keel.errors import KeelError
from keel.grad import LossSpikeDetector, SpikeConfig


def test_threshold_is_median_plus_factor_sigma():
    d = LossSpikeDetector(window=10, factor=3.0, min_history=5, min_rise=0.0)
    history = [2.0, 2.1, 1.9, 2.2, 1.8, 2.0, 2.05]
    for x in history:
        assert not d.update(x)
    m = statistics.median(history)
    mad = statistics.median(abs(x - m) for x in history)
    assert math.isclose(d.threshold(), m + 3.0 * 1.4826 * mad)


def test_no_detection_before_min_history():
    d = LossSpikeDetector(window=10, min_history=5)
    for x in [1.0, 1.0, 1.0, 1.0]:
        assert not d.update(x)
    assert d.threshold() is None
    assert not d.update(100.0)  # fifth value: still building history, recorded
    assert d.threshold() is not None
    assert d.update(1000.0)


def test_spike_flagged_and_kept_out_of_window():
    d = LossSpikeDetector(window=50, factor=6.0, min_history=20)
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(40, generator=g) * 0.02).tolist()
    assert not any(d.update(3.0 - 0.01 * i + n) for i, n in enumerate(noise))
    size = len(d.losses)
    assert d.update(6.0)
    assert len(d.losses) == size  # the spike did not enter the window
    assert not d.update(2.6)


def test_flat_loss_needs_min_rise():
    d = LossSpikeDetector(window=20, factor=6.0, min_history=5, min_rise=0.05)
    for _ in range(10):
        d.update(1.0)  # MAD = 0
    assert not d.update(1.04)
    assert d.update(1.06)


def test_nonfinite_is_not_a_spike_and_not_recorded():
    d = LossSpikeDetector(window=10, min_history=2)
    for x in [1.0, 1.0, 1.0]:
        d.update(x)
    assert not d.update(float("nan")) and not d.update(float("inf"))
    assert len(d.losses) == 3


def test_state_round_trip(tmp_path):
    d = LossSpikeDetector(window=5, min_history=2)
    for x in [1.0, 2.0, 3.0, 2.5, 2.2, 2.1]:
        d.update(x)
    torch.save(d.state_dict(), tmp_path / "s.pt")
    e = LossSpikeDetector(window=5, min_history=2)
    e.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert list(e.losses) == list(d.losses) and e.threshold() == d.threshold()


def test_bad_arguments():
    with pytest.raises(KeelError):
        LossSpikeDetector(window=5, min_history=10)
    with pytest.raises(ValueError):
        SpikeConfig(window=5, min_history=10)
    with pytest.raises(ValueError):
        SpikeConfig(lr_factor=2.0)
