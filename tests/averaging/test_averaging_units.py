"""EMA, Polyak and SWA units: formula parity in float64, swapping, state and resume, BatchNorm recompute."""

import io
import math

import pytest
import torch
from torch import nn

from keel.averaging import EMA, SWA, Polyak, recompute_batchnorm, swa_learning_rate
from keel.averaging.ema import half_life_to_decay
from keel.errors import KeelError


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_ema(sequence, decay_of_k):
    """shadow <- shadow - (1 - d_k) * (shadow - w_k); the first update sets shadow = w_1."""
    shadow = None
    for k, w in enumerate(sequence, start=1):
        if shadow is None:
            shadow = {n: t.clone() for n, t in w.items()}
            continue
        d = decay_of_k(k)
        shadow = {n: shadow[n] - (1 - d) * (shadow[n] - w[n]) if t.is_floating_point() else w[n].clone()
                  for n, t in w.items()}
    return shadow


def run_updates(unit, model, steps, first_seed=1):
    seen = []
    for i in range(steps):
        perturb(model, first_seed + i)
        seen.append(weights(model))
        unit.update()
    return seen


@pytest.mark.parametrize(
    "kwargs, decay_of_k",
    [
        ({"decay": 0.9}, lambda k: 0.9),
        ({"decay": 0.9999, "dynamic_decay": True}, lambda k: min(0.9999, (1 + k) / (10 + k))),
        ({"decay": 0.95, "dynamic_decay": True}, lambda k: min(0.95, (1 + k) / (10 + k))),
        ({"decay": 0.999, "warmup_gamma": 1.0, "warmup_power": 0.75},
         lambda k: min(0.999, 1 - (1 + (k - 1) / 1.0) ** -0.75)),
        ({"half_life": 3.0}, lambda k: 0.5 ** (1 / 3.0)),
    ],
    ids=["fixed", "opennmt-dynamic", "opennmt-dynamic-capped", "warmup", "half-life"],
)
def test_ema_matches_formula_in_float64(kwargs, decay_of_k):
    model = tiny_model()
    ema = EMA(model, **kwargs)
    seen = run_updates(ema, model, 25)
    expected = reference_ema(seen, decay_of_k)
    assert ema.num_updates == 25
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-12, atol=1e-12)


def test_opennmt_dynamic_decay_values():
    # k counts update() calls: the first sets the shadow, the second uses d = min(decay, 3 / 12) = 0.25.
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMA(model, decay=0.9999, dynamic_decay=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()
    assert ema.shadow["weight"].item() == 1.0
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update()
    assert ema.shadow["weight"].item() == pytest.approx(1.0 - 0.75 * (1.0 - 3.0), abs=1e-15)
    assert [ema.decay_at(k) for k in (1, 2, 90)] == [2 / 11, 3 / 12, 91 / 100]
    assert ema.decay_at(10**6) == 0.9999


def test_half_life_halves_influence():
    assert half_life_to_decay(100, every=1) ** 100 == pytest.approx(0.5)
    assert half_life_to_decay(100, every=4) ** 25 == pytest.approx(0.5)


def test_polyak_is_the_arithmetic_mean():
    model = tiny_model()
    polyak = Polyak(model)
    seen = run_updates(polyak, model, 9)
    for name in dict(model.named_parameters()):
        mean = sum(w[name] for w in seen) / len(seen)
        torch.testing.assert_close(polyak.shadow[name], mean, rtol=1e-12, atol=1e-12)


def test_buffers_averaged_or_copied():
    model = tiny_model()
    ema = EMA(model, decay=0.5, include_buffers=False)
    bn = model[1]
    for i in range(3):
        with torch.no_grad():
            bn.running_mean.fill_(float(i))
            bn.num_batches_tracked.fill_(10 + i)
        ema.update()
    assert torch.equal(ema.shadow["1.running_mean"], bn.running_mean)
    assert ema.shadow["1.num_batches_tracked"].item() == 12

    model = tiny_model()
    ema = EMA(model, decay=0.5, include_buffers=True)
    for i in range(3):
        with torch.no_grad():
            model[1].running_mean.fill_(float(i))
        ema.update()
    assert ema.shadow["1.running_mean"][0].item() == pytest.approx(0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 2)


def test_swap_is_exact_and_round_trips_bitwise():
    model = tiny_model(torch.float32)
    ema = EMA(model, decay=0.9)
    run_updates(ema, model, 4)
    raw, averaged = weights(model), {k: v.clone() for k, v in ema.shadow.items()}
    with ema.swapped():
        for name, value in model.state_dict().items():
            assert torch.equal(value, averaged[name]), name
        with pytest.raises(RuntimeError):
            ema.update()
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    for name, value in ema.shadow.items():
        assert torch.equal(value, averaged[name]), name


def test_fp32_shadow_for_bf16_weights():
    model = tiny_model(torch.bfloat16)
    ema = EMA(model, decay=0.9, dtype="float32")
    assert all(t.dtype == torch.float32 for n, t in ema.shadow.items() if "num_batches" not in n)
    seen = run_updates(ema, model, 6)
    expected = reference_ema([{k: v.float() if v.is_floating_point() else v for k, v in w.items()} for w in seen],
                             lambda k: 0.9)
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-6)
    raw = weights(model)
    with ema.swapped():
        assert torch.equal(model[0].weight, ema.shadow["0.weight"].bfloat16())
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name])


def test_copy_to_and_export(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model(torch.float32)
    ema = EMA(model, decay=0.8)
    run_updates(ema, model, 3)
    other = tiny_model(torch.float32, seed=5)
    ema.copy_to(other)
    for name, value in other.state_dict().items():
        assert torch.equal(value, ema.shadow[name])
    ema.export(tmp_path / "ema.safetensors")
    loaded = load_file(str(tmp_path / "ema.safetensors"))
    assert loaded.keys() == ema.shadow.keys()
    for name, value in loaded.items():
        assert torch.equal(value, ema.shadow[name])


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [EMA, Polyak], ids=["ema", "polyak"])
def test_resume_from_state_dict_is_bitwise(cls):
    kwargs = {"decay": 0.999, "dynamic_decay": True} if cls is EMA else {}
    model_a = tiny_model(torch.float32)
    a = cls(model_a, **kwargs)
    run_updates(a, model_a, 10)

    model_b = tiny_model(torch.float32)
    b = cls(model_b, **kwargs)
    run_updates(b, model_b, 5)
    state, model_state = save_and_load(b.state_dict()), weights(model_b)
    model_c = tiny_model(torch.float32, seed=9)
    model_c.load_state_dict(model_state)
    c = cls(model_c, **kwargs)
    c.load_state_dict(state)
    assert c.num_updates == 5
    run_updates(c, model_c, 5, first_seed=6)
    for name, value in a.shadow.items():
        assert torch.equal(value, c.shadow[name]), name


def test_load_state_dict_names_the_mismatch():
    ema = EMA(tiny_model(), decay=0.9)
    state = ema.state_dict()
    bad = {"num_updates": 1, "shadow": {**state["shadow"], "0.weight": torch.zeros(5, 5, dtype=torch.float64)}}
    with pytest.raises(KeelError, match="0.weight"):
        ema.load_state_dict(bad)
    with pytest.raises(KeelError, match="decay"):
        EMA(tiny_model(), decay=1.5)
    with pytest.raises(KeelError, match="dynamic_decay and half_life"):
        EMA(tiny_model(), dynamic_decay=True, half_life=10)


def test_swa_batchnorm_recompute_matches_torch_update_bn():
    from torch.optim.swa_utils import AveragedModel, update_bn

    torch.manual_seed(0)
    model = tiny_model(torch.float32)
    swa = SWA(model)
    reference = AveragedModel(model)
    for i in range(4):
        perturb(model, i)
        swa.update()
        reference.update_parameters(model)
    data = [torch.randn(8, 3) for _ in range(5)]
    assert swa.update_batchnorm(data) == 1
    update_bn(data, reference)
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(swa.shadow[name], value, rtol=1e-6, atol=1e-6)
    # the model's own statistics are untouched
    assert model[1].num_batches_tracked.item() == 0


def test_recompute_batchnorm_without_batchnorm_is_a_no_op():
    model = nn.Linear(2, 2)
    assert recompute_batchnorm(model, [torch.randn(3, 2)]) == 0


def test_swa_learning_rate():
    kw = {"start": 10, "start_lr": 1.0, "swa_lr": 0.1}
    assert swa_learning_rate(9, **kw, anneal_steps=4) is None
    assert swa_learning_rate(10, **kw, anneal_steps=4) == 1.0
    assert swa_learning_rate(12, **kw, anneal_steps=4, strategy="linear") == pytest.approx(0.55)
    assert swa_learning_rate(12, **kw, anneal_steps=4, strategy="cos") == pytest.approx(0.55)
    assert swa_learning_rate(11, **kw, anneal_steps=4) == pytest.approx(0.1 * 0.5 * (1 - math.cos(math.pi / 4))
                                                                       + 1.0 * (1 - 0.5 * (1 - math.cos(math.pi / 4))))
    assert swa_learning_rate(14, **kw, anneal_steps=4) == pytest.approx(0.1)
    assert swa_learning_rate(10, **kw) == 0.1
    with pytest.raises(KeelError, match="anneal_strategy"):
        swa_learning_rate(10, **kw, strategy="step")


def test_plain_loop_example():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    with ema.swapped():
        averaged_loss = nn.functional.mse_loss(model(x), y).item()
    assert math.isfinite(averaged_loss)
