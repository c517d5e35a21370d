"""Every registered optimizer: lowers a small regression loss at its default LR, resumes bitwise from a saved
state_dict, and (for keel's own) handles bfloat16 parameters; the fused path equals the eager one."""

import io

import pytest
import torch
from torch import nn

import keel.optim as ko
from keel.optim.multi_tensor import SMALL_NUMEL, _make_list_update, compiler_available

requires_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
NAMES = [pytest.param(n, marks=requires_muon) if n == "muon" else n for n in ko.names()]


def regression_problem(seed=0, n=256, features=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def train(model, opt, steps, x, y, start=0):
    losses = []
    for t in range(start, start + steps):
        rows = slice((t * 64) % 256, (t * 64) % 256 + 64)
        loss = nn.functional.mse_loss(model(x[rows].to(next(model.parameters()).dtype)), y[rows].to(loss_dtype(model)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def loss_dtype(model):
    return next(model.parameters()).dtype


def full_loss(model, x, y):
    with torch.no_grad():
        dtype = loss_dtype(model)
        return nn.functional.mse_loss(model(x.to(dtype)).float(), y).item()


@pytest.mark.parametrize("name", NAMES)
def test_lowers_a_small_regression_loss_at_its_default_lr(name):
    x, y = regression_problem()
    model = mlp()
    opt = ko.create(name, model)
    before = full_loss(model, x, y)
    train(model, opt, 200, x, y)
    after = full_loss(model, x, y)
    assert after < 0.8 * before, (name, before, after)


def resume_hparams(name):
    # cross SOAP's eigenbasis refreshes and AdEMAMix's warmups around the save point
    return {"soap": {"precondition_frequency": 3}, "ademamix": {"t_alpha_beta3": 5}}.get(name, {})


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_mid_run_continues_bitwise(name):
    x, y = regression_problem()
    hparams = resume_hparams(name)
    model = mlp()
    opt = ko.create(name, model, **hparams)
    train(model, opt, 7, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    uninterrupted = train(model, opt, 8, x, y, start=7)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = mlp(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = ko.create(name, resumed_model, **hparams)
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed = train(resumed_model, resumed_opt, 8, x, y, start=7)

    assert resumed == uninterrupted
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["lion", "ademamix", "soap", "adamw"])
def test_bfloat16_parameters_train_and_resume(name):
    x, y = regression_problem()
    model32 = mlp()
    model16 = mlp().to(torch.bfloat16)
    model32.load_state_dict({k: v.float() for k, v in model16.state_dict().items()})
    opt32, opt16 = ko.create(name, model32, lr=1e-3), ko.create(name, model16, lr=1e-3)
    before = full_loss(model16, x, y)
    train(model32, opt32, 30, x, y)
    train(model16, opt16, 30, x, y)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    assert full_loss(model16, x, y) < before
    for p32, p16 in zip(model32.parameters(), model16.parameters()):
        assert (p32 - p16.float()).abs().max() < 0.05
    if name != "adamw":  # keel's own keep float32 state for low-precision parameters, also through a resume
        state = opt16.state[model16[0].weight]
        assert state["exp_avg"].dtype == torch.float32
        if name == "soap":
            assert state["Q"][0].dtype == torch.float32
        buffer = io.BytesIO()
        torch.save(opt16.state_dict(), buffer)
        buffer.seek(0)
        again = ko.create(name, model16, lr=1e-3)
        again.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(again.state[model16[0].weight]["exp_avg"], state["exp_avg"])
        assert again.state[model16[0].weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_exact_float32_averages(cls, fused, dtype, monkeypatch):
    """A constant gradient g for t steps: every average reaches its closed form (1 - beta^t) g (or g^2 for the
    second moment) to float32 accuracy. In bfloat16 state, (1 - beta) g falls below half an ulp and the
    averages stall (AdEMAMix's slow EMA at 0.03 instead of 0.39 after 5000 steps)."""
    monkeypatch.setattr(cls, "_compiled", _make_list_update(cls._update_tensor))  # the fused rule, uncompiled
    steps = 3000
    g = torch.tensor([1.0, -0.3, 2e-3, 7.0]).to(dtype)
    p = torch.zeros(4, dtype=dtype, requires_grad=True)
    opt = cls([p], lr=1e-3, fused=fused)
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    g64 = g.double()
    if cls is ko.Lion:
        expected = {"exp_avg": (1 - 0.99**steps) * g64}
    else:
        expected = {
            "exp_avg": (1 - 0.9**steps) * g64,
            "exp_avg_sq": (1 - 0.999**steps) * g64**2,
            "exp_avg_slow": (1 - 0.9999**steps) * g64,
        }
    saved = opt.state_dict()
    resumed = cls([p], lr=1e-3, fused=fused)
    resumed.load_state_dict(saved)
    for optimizer in (opt, resumed):
        for name, exact in expected.items():
            state = optimizer.state[p][name]
            assert state.dtype == torch.float32, name
            assert torch.allclose(state.double(), exact, rtol=1e-4, atol=0), (name, state, exact)
    assert p.dtype == dtype


@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_equals_the_foreach_path(cls, dtype, monkeypatch):
    """The per-tensor rule that torch.compile fuses, run uncompiled: same result as the foreach ops."""
    monkeypatch.setattr(cls, "_compiled", _make_list_update(cls._update_tensor))
    shapes = [(300, 300), (7,), (5, 3), (70000,), (4,)]  # large ones alone, small ones gathered
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s).to(dtype).requires_grad_(True) for s in shapes]
        groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "lr": 3e-3}]
        opt = cls(groups, lr=1e-3, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            opt.step()
        results.append([p.detach().float() for p in params])
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(*results):
        assert (a - b).abs().max() <= tolerance


def test_fused_auto_stays_eager_for_small_models():
    opt = ko.create("lion", mlp())
    assert opt.fused is None and not opt._use_fused()
    assert ko.create("lion", mlp(), fused=True)._use_fused()


def test_fused_auto_compiles_only_where_the_run_repays_the_compile(monkeypatch):
    from keel.optim import multi_tensor

    monkeypatch.setattr(multi_tensor, "compiler_available", lambda: True)
    assert multi_tensor.FUSED_MIN_NUMEL == 10_000_000
    assert multi_tensor.compile_pays(10_800_000) and not multi_tensor.compile_pays(5_000_000)
    assert not multi_tensor.compile_pays(10_800_000, total_steps=1000)  # nanoGPT-char, a short run
    assert multi_tensor.compile_pays(124_000_000, total_steps=1000)  # GPT-2 small
    assert multi_tensor.compile_pays(1_000_000, total_steps=10**6)
    opt = ko.create("ademamix", mlp(), total_steps=10**12)  # the trainer passes its run length
    assert opt.total_steps == 10**12 and opt.fused is None and opt._use_fused()
    assert not ko.create("ademamix", mlp(), total_steps=10**12, fused=False)._use_fused()
    assert ko.create("lion", mlp()).total_steps is None
    monkeypatch.setattr(multi_tensor, "compiler_available", lambda: False)
    assert not multi_tensor.compile_pays(124_000_000, total_steps=10**6)


def test_a_compile_says_so_on_stderr_once_per_set_of_shapes(monkeypatch, capsys):
    cls = ko.Lion
    update = _make_list_update(cls._update_tensor)  # stands in for torch.compile's wrapper: nothing compiles
    monkeypatch.setattr(cls, "_compiled", update)
    monkeypatch.setattr(cls, "_compiled_here", update)
    monkeypatch.setattr(cls, "_compiled_for", frozenset())
    params = [torch.randn(300, 300, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = cls(params, lr=1e-3, fused=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("keel: Lion is compiling its fused update with torch.compile (2 tensors, 0.1M elements)")
    assert lines[1].startswith("keel: Lion compiled in ")
    again = [torch.randn(300, 300, requires_grad=True), torch.randn(7, requires_grad=True)]
    for p in again:
        p.grad = torch.ones_like(p)
    cls(again, lr=1e-3, fused=True).step()
    assert capsys.readouterr().err == ""  # the same shapes again: torch reuses the compiled code


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler on the PATH")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_path_equals_the_foreach_path_on_a_tiny_problem(monkeypatch):
    """Really compiles AdEMAMix's rule (about 10 s, nearly all of it the C++ compiler's fixed cost): one tensor
    passed as it is, and small float32 and bfloat16 tensors through their flat buffers; warmups make the
    per-step scalars change. Same parameters and state as the eager path, to float tolerance."""
    cls = ko.AdEMAMix
    monkeypatch.setattr(cls, "_compiled", None)  # compile here, and leave no compiled function behind
    monkeypatch.setattr(cls, "_compile_failed", False)
    tensors = [((SMALL_NUMEL,), torch.float32), ((5, 3), torch.float32), ((7,), torch.bfloat16)]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(shape).to(dtype).requires_grad_(True) for shape, dtype in tensors]
        opt = cls(params, lr=1e-3, weight_decay=0.1, t_alpha_beta3=4, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            opt.step()
        results.append([[p.detach().clone(), *(opt.state[p][n].clone() for n in cls.state_names)] for p in params])
    assert not cls._compile_failed and cls._compiled is not None and opt._plan is not None
    for eager, compiled in zip(*results):
        assert compiled[0].dtype == eager[0].dtype and compiled[1].dtype == eager[1].dtype
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
def test_compiled_path_equals_the_foreach_path(cls):
    """Really compiles (tens of seconds on two cores)."""
    shapes = [(300, 300), (7,), (5, 3), (70000,), (4,)]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_(True) for s in shapes]
        opt = cls([{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}], lr=1e-3, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        results.append([p.detach() for p in params])
    assert not cls._compile_failed
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-6


def test_param_without_gradient_is_untouched_and_late_starters_get_their_own_step():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = ko.AdEMAMix([a, b], lr=0.1, fused=False)
    a.grad = torch.ones(3)
    opt.step()
    first_update_of_a = a.detach().clone()
    assert torch.equal(b, torch.zeros(3)) and opt.state[a]["step"] == 1 and b not in opt.state
    b.grad = torch.ones(3)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    assert torch.equal(b.detach(), first_update_of_a)  # bias-corrected by its own step count


@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
def test_fused_path_follows_parameters_that_skip_steps(cls, monkeypatch):
    """The fused path's cached plan is rebuilt when the set of parameters with gradients changes."""
    monkeypatch.setattr(cls, "_compiled", _make_list_update(cls._update_tensor))
    shapes = [(300, 300), (7,), (70000,), (4,)]
    skips = {1: [1], 2: [0, 3], 4: [2]}  # step -> parameters without a gradient
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_(True) for s in shapes]
        opt = cls(params, lr=1e-3, weight_decay=0.1, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for step in range(7):
            for i, p in enumerate(params):
                p.grad = None if i in skips.get(step, []) else torch.randn(p.shape, generator=generator)
            opt.step()
        results.append(([p.detach().clone() for p in params], [opt.state[p]["step"] for p in params]))
    (eager, eager_steps), (fused_params, fused_steps) = results
    assert eager_steps == fused_steps == [6, 6, 6, 6]
    for a, b in zip(eager, fused_params):
        assert (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("cls", [ko.Lion, ko.AdEMAMix])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_in_cache_sized_runs_equals_one_foreach_call_bitwise(cls, dtype, monkeypatch):
    """On CPU the eager path runs the foreach ops over runs of tensors (large ones alone) to keep temporaries in
    cache; the same ops on the whole list give the same bits."""
    from keel.optim import multi_tensor

    tensors = [torch.zeros(SMALL_NUMEL), torch.zeros(9), torch.zeros(9), torch.zeros(SMALL_NUMEL), torch.zeros(9)]
    assert [len(tensors[s]) for s in multi_tensor._chunks(tensors, fast_foreach=False)] == [1, 3, 1]
    assert [len(tensors[s]) for s in multi_tensor._chunks(tensors, fast_foreach=True)] == [5]
    shapes = [(300, 300), (7,), (5, 3), (70000,), (4,)]
    results = []
    for whole in (False, True):
        if whole:
            monkeypatch.setattr(multi_tensor, "fast_foreach_devices", lambda: {"cpu"})
        torch.manual_seed(0)
        params = [torch.randn(s).to(dtype).requires_grad_(True) for s in shapes]
        opt = cls(params, lr=1e-3, weight_decay=0.1, fused=False)
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype)
            opt.step()
        results.append([p.detach() for p in params] + [opt.state[p][n] for p in params for n in cls.state_names])
    for a, b in zip(*results):
        assert torch.equal(a, b)
