"""Clipping math: norm bounds, idempotence, percentile threshold, start-after-warmup boundary."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.errors import KeelError
from keel.grad import (
    ClipConfig,
    Clipper,
    adaptive_clip,
    clip_by_global_norm,
    clip_by_value,
    global_norm,
    unitwise_norm,
)


def params_with_grads(seed=0, scale=10.0, shapes=((8, 4), (8,), (3, 8, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        params.append(p)
    return params


def flat_grad(params):
    return torch.cat([p.grad.flatten() for p in params])


def test_global_norm_is_l2_of_concatenated_grads():
    params = params_with_grads()
    assert torch.allclose(global_norm(params), flat_grad(params).norm(), rtol=1e-6)


def test_global_norm_without_grads_is_zero():
    assert float(global_norm([torch.nn.Parameter(torch.ones(3))])) == 0.0


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-2, 1e2), seed=st.integers(0, 1000))
def test_clip_by_global_norm_bounds_and_is_idempotent(scale, max_norm, seed):
    params = params_with_grads(seed, scale)
    before = flat_grad(params).clone()
    returned = clip_by_global_norm(params, max_norm)
    assert math.isclose(float(returned), float(before.norm()), rel_tol=1e-5)  # the unclipped norm
    after = flat_grad(params).clone()
    assert float(after.norm()) <= max_norm * (1 + 1e-5)
    # direction kept; untouched when already within the threshold
    if float(before.norm()) <= max_norm:
        assert torch.equal(after, before)
    else:
        assert torch.allclose(after, before * (max_norm / before.norm()), rtol=1e-5, atol=1e-7)
    clip_by_global_norm(params, max_norm)
    assert torch.allclose(flat_grad(params), after, rtol=1e-6, atol=0)


def test_clip_by_global_norm_leaves_nonfinite_grads_alone():
    params = params_with_grads()
    params[0].grad[0, 0] = float("nan")
    before = flat_grad(params).clone()
    norm = clip_by_global_norm(params, 1.0)
    assert not torch.isfinite(norm)
    assert torch.equal(flat_grad(params).nan_to_num(), before.nan_to_num())


def test_clip_by_value_bounds_and_reports():
    params = params_with_grads(scale=3.0)
    assert clip_by_value(params, 1.0)
    assert float(flat_grad(params).abs().max()) <= 1.0
    snapshot = flat_grad(params).clone()
    assert not clip_by_value(params, 1.0)
    assert torch.equal(flat_grad(params), snapshot)


def test_adaptive_clip_unitwise_ratio():
    params = params_with_grads(scale=1.0)
    weights = [p.detach().clone() for p in params]
    clipping, eps = 0.05, 1e-3
    assert adaptive_clip(params, clipping, eps)
    for p, w in zip(params, weights):
        ratio = unitwise_norm(p.grad) / unitwise_norm(w).clamp_min(eps)
        assert float(ratio.max()) <= clipping * (1 + 1e-5)
    snapshot = flat_grad(params).clone()
    adaptive_clip(params, clipping, eps)  # clipping twice changes nothing (up to rounding)
    assert torch.allclose(flat_grad(params), snapshot, rtol=1e-6, atol=0)


def test_adaptive_clip_keeps_small_units():
    w = torch.nn.Parameter(torch.tensor([[10.0, 0.0], [0.001, 0.0]]))
    w.grad = torch.tensor([[0.01, 0.0], [1.0, 0.0]])
    adaptive_clip([w], clipping=0.01, eps=1e-3)
    assert torch.equal(w.grad[0], torch.tensor([0.01, 0.0]))  # ratio 0.001 <= 0.01: untouched
    # row 2: max(||W||, eps) = 1e-3 -> allowed grad norm 1e-5
    assert math.isclose(float(w.grad[1].norm()), 1e-5, rel_tol=1e-5)


def test_unitwise_norm_shapes():
    assert unitwise_norm(torch.ones(5)).shape == ()
    assert unitwise_norm(torch.ones(4, 3)).shape == (4, 1)
    assert unitwise_norm(torch.ones(4, 3, 2, 2)).shape == (4, 1, 1, 1)


def test_clipper_norm_reports_unclipped_norm():
    params = params_with_grads()
    expected = float(flat_grad(params).norm())
    result = Clipper(ClipConfig(mode="norm", max_norm=0.5))(params, step=0)
    assert math.isclose(result.norm, expected, rel_tol=1e-5) and result.clipped
    assert float(global_norm(params)) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["norm", "value", "agc", "percentile", "none"])
def test_clipper_start_after_warmup_boundary(mode):
    """Clipping applies from step == warmup_steps on (step = updates already applied)."""
    warmup = 5
    clipper = Clipper(ClipConfig(mode=mode, max_norm=0.1, max_value=0.1, calibration_steps=1, window=100,
                                 start_after_warmup=True), warmup_steps=warmup)
    if mode == "percentile":
        clipper.load_state_dict({"norms": [0.1] * 100})
    for step, expect_clipped in [(0, False), (warmup - 1, False), (warmup, mode != "none"), (warmup + 1, mode != "none")]:
        params = params_with_grads(seed=step)
        before = flat_grad(params).clone()
        result = clipper(params, step)
        assert result.clipped == expect_clipped, (step, result)
        assert math.isclose(result.norm, float(before.norm()), rel_tol=1e-5)
        if not expect_clipped:
            assert torch.equal(flat_grad(params), before)
    assert clipper.active(warmup) and not clipper.active(warmup - 1)


def test_clipper_without_start_after_warmup_clips_at_step_zero():
    result = Clipper(ClipConfig(max_norm=0.1), warmup_steps=100)(params_with_grads(), step=0)
    assert result.clipped


def test_percentile_threshold_from_known_history():
    history = [float(x) for x in range(1, 21)]  # 1..20
    clipper = Clipper(ClipConfig(mode="percentile", percentile=90, window=20, calibration_steps=5))
    clipper.load_state_dict({"norms": history})
    assert math.isclose(clipper.threshold(), float(np.percentile(history, 90)), rel_tol=1e-12)  # 18.1
    params = params_with_grads(scale=100.0)
    unclipped = float(flat_grad(params).norm())
    result = clipper(params, step=20)
    assert result.clipped and math.isclose(result.threshold, 18.1, rel_tol=1e-12)
    assert math.isclose(float(global_norm(params)), 18.1, rel_tol=1e-5)
    # the unclipped norm enters the window, the oldest drops out
    assert list(clipper.norms) == pytest.approx(history[1:] + [unclipped], rel=1e-6)


def test_percentile_calibration_then_clipping():
    clipper = Clipper(ClipConfig(mode="percentile", percentile=50, window=4, calibration_steps=3))
    results = []
    for step, scale in enumerate([1.0, 1.0, 1.0, 1000.0]):
        params = params_with_grads(seed=0, scale=scale)
        results.append(clipper(params, step))
    assert [r.clipped for r in results] == [False, False, False, True]
    assert [r.threshold for r in results[:3]] == [None, None, None]
    assert math.isclose(results[3].threshold, results[0].norm, rel_tol=1e-6)  # median of three equal norms
    assert len(clipper.norms) == 4


def test_percentile_window_ignores_nonfinite_and_survives_state_round_trip(tmp_path):
    clipper = Clipper(ClipConfig(mode="percentile", window=5, calibration_steps=2))
    params = params_with_grads()
    params[0].grad[0, 0] = float("inf")
    result = clipper(params, 0)
    assert not result.clipped and not math.isfinite(result.norm) and len(clipper.norms) == 0
    for step in range(3):
        clipper(params_with_grads(seed=step), step)
    torch.save(clipper.state_dict(), tmp_path / "c.pt")
    other = Clipper(ClipConfig(mode="percentile", window=5, calibration_steps=2))
    other.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert list(other.norms) == list(clipper.norms) and other.threshold() == clipper.threshold()


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError):
        ClipConfig(mode="nrm")
    with pytest.raises(ValueError):
        ClipConfig(max_nrm=1.0)
    with pytest.raises(ValueError):
        ClipConfig(mode="percentile", window=10, calibration_steps=20)
    with pytest.raises(KeelError):
        clip_by_global_norm(params_with_grads(), 0.0)
    with pytest.raises(KeelError):
        Clipper(ClipConfig(), warmup_steps=-1)
