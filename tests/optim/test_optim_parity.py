"""Parity in float64: torch's optimizers against the update rules as the literature writes them, and keel's Lion,
AdEMAMix and SOAP against pytorch-optimizer and the papers' reference formulas.

The literature forms are the Deep Learning Tuning Playbook's FAQ ("What are the update rules for all the popular
optimization algorithms?"). Where torch's convention differs (RMSProp, Adam's epsilon, NAdam), the test pins torch
to its own documented formula and shows exactly which term differs from the Playbook's.
"""

import math

import pytest
import torch

import keel.optim as ko

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

STEPS = 100
SHAPES = [(6, 10), (10,), (12, 5), (3, 4, 5)]


def gradients(shape, steps=STEPS, seed=2):
    """A fixed sequence of float64 gradients (noise plus a pull toward zero-mean)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def lr_at(t):
    """A varying learning rate eta_t, so that where the LR enters a rule matters."""
    return 0.05 * (1.0 + 0.5 * math.cos(t / 7.0))


def run_torch(name, steps=STEPS, vary_lr=True, **hparams):
    """Run keel.optim.create(name) on one float64 tensor with the fixed gradients + 0.1 theta; return theta."""
    theta = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).requires_grad_(True)
    opt = ko.create(name, [theta], lr=lr_at(0), **hparams)
    for t, g in enumerate(gradients((24,), steps)):
        if vary_lr:
            opt.param_groups[0]["lr"] = lr_at(t)
        theta.grad = g + 0.1 * theta.detach()
        opt.step()
    return theta.detach()


def run_formula(update, steps=STEPS, vary_lr=True):
    """Run a formula `update(theta, grad, lr, t, state) -> theta` (t counts from 0) with the same gradients."""
    theta = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64)
    state = {}
    for t, g in enumerate(gradients((24,), steps)):
        theta = update(theta, g + 0.1 * theta, lr_at(t) if vary_lr else lr_at(0), t, state)
    return theta


def assert_same(a, b, atol=1e-12):
    assert (a - b).abs().max().item() <= atol


# --- the Playbook's update rules, as written ---


def playbook_sgd(theta, grad, lr, t, state):
    return theta - lr * grad


def playbook_momentum(gamma):
    def update(theta, grad, lr, t, state):
        state["v"] = gamma * state.get("v", torch.zeros_like(theta)) + grad
        return theta - lr * state["v"]

    return update


def playbook_nesterov(gamma):
    def update(theta, grad, lr, t, state):
        state["v"] = gamma * state.get("v", torch.zeros_like(theta)) + grad
        return theta - lr * (gamma * state["v"] + grad)

    return update


def playbook_rmsprop(rho, gamma, eps, v0=1.0):
    """v_0 = 1, m_0 = 0; v <- rho v + (1 - rho) g^2; m <- gamma m + eta / sqrt(v + eps) g; theta <- theta - m."""

    def update(theta, grad, lr, t, state):
        state["v"] = rho * state.get("v", torch.full_like(theta, v0)) + (1 - rho) * grad**2
        state["m"] = gamma * state.get("m", torch.zeros_like(theta)) + lr / torch.sqrt(state["v"] + eps) * grad
        return theta - state["m"]

    return update


def torch_rmsprop_formula(rho, gamma, eps):
    """torch's documented RMSprop: v_0 = 0; buf <- gamma buf + g / (sqrt(v) + eps); theta <- theta - eta buf."""

    def update(theta, grad, lr, t, state):
        state["v"] = rho * state.get("v", torch.zeros_like(theta)) + (1 - rho) * grad**2
        scaled = grad / (torch.sqrt(state["v"]) + eps)
        if gamma > 0:
            state["buf"] = gamma * state.get("buf", torch.zeros_like(theta)) + scaled
            scaled = state["buf"]
        return theta - lr * scaled

    return update


def playbook_adam(beta1, beta2, eps):
    """theta <- theta - alpha m / (sqrt(v) + eps) b, b = sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))."""

    def update(theta, grad, lr, t, state):
        state["m"] = beta1 * state.get("m", torch.zeros_like(theta)) + (1 - beta1) * grad
        state["v"] = beta2 * state.get("v", torch.zeros_like(theta)) + (1 - beta2) * grad**2
        b = math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
        return theta - lr * state["m"] / (torch.sqrt(state["v"]) + eps) * b

    return update


def adam_paper_algorithm1(beta1, beta2, eps):
    """Kingma & Ba, Algorithm 1: theta <- theta - alpha m_hat / (sqrt(v_hat) + eps) (eps after bias correction)."""

    def update(theta, grad, lr, t, state):
        state["m"] = beta1 * state.get("m", torch.zeros_like(theta)) + (1 - beta1) * grad
        state["v"] = beta2 * state.get("v", torch.zeros_like(theta)) + (1 - beta2) * grad**2
        m_hat = state["m"] / (1 - beta1 ** (t + 1))
        v_hat = state["v"] / (1 - beta2 ** (t + 1))
        return theta - lr * m_hat / (torch.sqrt(v_hat) + eps)

    return update


def playbook_nadam(beta1, beta2, eps):
    """theta <- theta - alpha (beta1 m + (1 - beta1) g) / (sqrt(v) + eps) b."""

    def update(theta, grad, lr, t, state):
        state["m"] = beta1 * state.get("m", torch.zeros_like(theta)) + (1 - beta1) * grad
        state["v"] = beta2 * state.get("v", torch.zeros_like(theta)) + (1 - beta2) * grad**2
        b = math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
        return theta - lr * (beta1 * state["m"] + (1 - beta1) * grad) / (torch.sqrt(state["v"]) + eps) * b

    return update


def dozat_nadam(beta1, beta2, eps, psi):
    """Dozat (2016) as torch documents it: mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), bias corrections by prod(mu).

    torch keeps the running product of mu in a float32 scalar tensor even for float64 parameters; so does this.
    """

    def update(theta, grad, lr, t, state):
        step = t + 1
        mu = beta1 * (1 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
        state["prod"] = (torch.tensor(state.get("prod", 1.0), dtype=torch.float32) * mu).item()
        state["m"] = beta1 * state.get("m", torch.zeros_like(theta)) + (1 - beta1) * grad
        state["v"] = beta2 * state.get("v", torch.zeros_like(theta)) + (1 - beta2) * grad**2
        denominator = torch.sqrt(state["v"] / (1 - beta2**step)) + eps
        theta = theta - lr * (1 - mu) / (1 - state["prod"]) * grad / denominator
        return theta - lr * mu_next / (1 - state["prod"] * mu_next) * state["m"] / denominator

    return update


def test_sgd_matches_the_playbook():
    assert_same(run_torch("sgd"), run_formula(playbook_sgd))


def test_heavy_ball_momentum_matches_the_playbook():
    assert_same(run_torch("momentum", momentum=0.9), run_formula(playbook_momentum(0.9)))


def test_nesterov_matches_the_playbook():
    assert_same(run_torch("nesterov", momentum=0.9), run_formula(playbook_nesterov(0.9)))


def test_rmsprop_is_torchs_convention_and_differs_from_the_playbook_in_three_places():
    torch_run = run_torch("rmsprop", alpha=0.9, momentum=0.5, eps=1e-3)
    # torch: v_0 = 0, eps added to sqrt(v), the LR multiplies the momentum buffer
    assert_same(torch_run, run_formula(torch_rmsprop_formula(0.9, 0.5, 1e-3)))
    # the Playbook: v_0 = 1, eps inside the square root, the LR inside the momentum buffer
    assert (torch_run - run_formula(playbook_rmsprop(0.9, 0.5, 1e-3))).abs().max() > 1e-2
    # with v_0 = 0, eps = 0 and a constant LR the two conventions are the same rule
    same_torch = run_torch("rmsprop", alpha=0.9, momentum=0.5, eps=0.0, vary_lr=False)
    same_playbook = run_formula(playbook_rmsprop(0.9, 0.5, 0.0, v0=0.0), vary_lr=False)
    assert_same(same_torch, same_playbook, atol=1e-10)


def test_adam_matches_the_paper_and_the_playbook_up_to_where_eps_sits():
    torch_run = run_torch("adam", betas=(0.9, 0.999), eps=1e-8)
    assert_same(torch_run, run_formula(adam_paper_algorithm1(0.9, 0.999, 1e-8)))
    # the Playbook adds eps before the bias correction b (Kingma & Ba's "eps hat"): equal at eps = 0 ...
    assert_same(run_torch("adam", eps=0.0), run_formula(playbook_adam(0.9, 0.999, 0.0)), atol=1e-10)
    # ... and visibly different when eps matters
    big = run_torch("adam", eps=0.1)
    assert (big - run_formula(playbook_adam(0.9, 0.999, 0.1))).abs().max() > 1e-3


def test_nadam_is_dozats_with_momentum_schedule_and_differs_from_the_playbook():
    torch_run = run_torch("nadam", betas=(0.9, 0.999), eps=1e-8)
    assert_same(torch_run, run_formula(dozat_nadam(0.9, 0.999, 1e-8, psi=4e-3)))
    # torch's mu_t schedule starts near beta1 / 2: far from the Playbook's constant beta1
    assert (torch_run - run_formula(playbook_nadam(0.9, 0.999, 1e-8))).abs().max() > 1e-2
    # with the schedule switched off (mu_t = beta1) only the bias correction of the m-term differs:
    # torch divides beta1 m by 1 - beta1^(t+1), the Playbook by 1 - beta1^t
    constant = run_torch("nadam", eps=0.0, momentum_decay=1e9)
    assert_same(constant, run_formula(dozat_nadam(0.9, 0.999, 0.0, psi=1e9)))
    gap = (constant - run_formula(playbook_nadam(0.9, 0.999, 0.0))).abs().max()
    assert 1e-6 < gap < 0.1


# --- keel's own optimizers against pytorch-optimizer and the papers ---


def run_pair(make, shapes=SHAPES, steps=STEPS, dtype=torch.float64):
    torch.manual_seed(1)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    opt = make(params)
    sequences = [gradients(s, steps, seed=10 + i) for i, s in enumerate(shapes)]
    for t in range(steps):
        for p, seq in zip(params, sequences):
            p.grad = seq[t].to(dtype) + 0.5 * p.detach()
        opt.step()
    return [p.detach() for p in params]


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_matches_pytorch_optimizer(weight_decay):
    ours = run_pair(lambda ps: ko.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay, fused=False))
    theirs = run_pair(lambda ps: pytorch_optimizer.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay))
    assert max_difference(ours, theirs) <= 1e-6


def test_lion_matches_the_paper():
    def lion_paper(theta, grad, lr, t, state):
        m = state.get("m", torch.zeros_like(theta))
        update = torch.sign(0.9 * m + 0.1 * grad) + 0.5 * theta
        state["m"] = 0.99 * m + 0.01 * grad
        return theta - lr * update

    theta = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).requires_grad_(True)
    opt = ko.Lion([theta], lr=0.01, betas=(0.9, 0.99), weight_decay=0.5, fused=False)
    for t, g in enumerate(gradients((24,))):
        opt.param_groups[0]["lr"] = 0.01
        theta.grad = g + 0.1 * theta.detach()
        opt.step()
    assert_same(theta.detach(), run_formula(lambda th, gr, lr, t, st: lion_paper(th, gr, 0.01, t, st)))


@pytest.mark.parametrize(
    "hparams",
    [{}, {"weight_decay": 0.1, "alpha": 8.0, "t_alpha_beta3": 60}, {"betas": (0.8, 0.99, 0.999), "t_alpha_beta3": 30}],
)
def test_ademamix_matches_pytorch_optimizer(hparams):
    ours = run_pair(lambda ps: ko.AdEMAMix(ps, lr=1e-3, fused=False, **hparams))
    theirs = run_pair(
        lambda ps: pytorch_optimizer.AdEMAMix(ps, lr=1e-3, weight_decouple=True, **({"alpha": 5.0} | hparams))
    )
    assert max_difference(ours, theirs) <= 1e-6


def test_ademamix_matches_the_reference_schedules_and_update():
    """apple/ml-ademamix: half-life-linear beta3 warmup, linear alpha warmup, decoupled decay scaled by the LR."""

    def reference_beta3(step, beta_start, beta_end, warmup, eps=1e-8):
        def half_life(beta):
            return math.log(0.5) / math.log(beta + eps) - 1

        if step < warmup:
            a = step / warmup
            return math.pow(0.5, 1 / ((1 - a) * half_life(beta_start) + a * half_life(beta_end) + 1))
        return beta_end

    for step in [1, 5, 50, 99, 100, 150]:
        ours = ko.ademamix.beta3_schedule(step, 0.9, 0.9999, 100)
        # the same schedule; the reference's 1e-8 inside the logarithm moves beta3 by < 1e-5
        assert ours == pytest.approx(reference_beta3(step, 0.9, 0.9999, 100, eps=0.0), abs=1e-12)
        assert ours == pytest.approx(reference_beta3(step, 0.9, 0.9999, 100), abs=1e-5)
        assert ko.ademamix.alpha_schedule(step, 5.0, 100) == pytest.approx(min(step / 100, 1.0) * 5.0)

    def reference(theta, grad, lr, t, state):
        step = t + 1
        beta1, beta2, beta3, alpha, wd = 0.9, 0.999, 0.9999, 5.0, 0.1
        b3 = ko.ademamix.beta3_schedule(step, beta1, beta3, 40)
        a = ko.ademamix.alpha_schedule(step, alpha, 40)
        state["m1"] = beta1 * state.get("m1", torch.zeros_like(theta)) + (1 - beta1) * grad
        state["m2"] = b3 * state.get("m2", torch.zeros_like(theta)) + (1 - b3) * grad
        state["v"] = beta2 * state.get("v", torch.zeros_like(theta)) + (1 - beta2) * grad**2
        denominator = torch.sqrt(state["v"]) / math.sqrt(1 - beta2**step) + 1e-8
        update = (state["m1"] / (1 - beta1**step) + a * state["m2"]) / denominator + wd * theta
        return theta - lr * update

    theta = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).requires_grad_(True)
    opt = ko.AdEMAMix([theta], lr=lr_at(0), weight_decay=0.1, alpha_warmup=40, beta3_warmup=40, fused=False)
    for t, g in enumerate(gradients((24,))):
        opt.param_groups[0]["lr"] = lr_at(t)
        theta.grad = g + 0.1 * theta.detach()
        opt.step()
    assert_same(theta.detach(), run_formula(reference), atol=1e-10)


@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"precondition_frequency": 3, "weight_decay": 0.0},
        {"max_precondition_dim": 8, "betas": (0.9, 0.99), "shampoo_beta": 0.8},
        {"precondition_1d": True, "correct_bias": False},
    ],
)
def test_soap_matches_pytorch_optimizer(hparams):
    """Within 1e-7: pytorch-optimizer computes its QR refresh in float32 even for float64 parameters."""
    ours = run_pair(lambda ps: ko.SOAP(ps, lr=3e-3, **hparams))
    theirs = run_pair(lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3, **hparams))
    assert max_difference(ours, theirs) <= 1e-6


def test_soap_merge_dims_matches_pytorch_optimizer():
    # pytorch-optimizer merges 1-D tensors into shape [1] (an error), so only N-D shapes here
    shapes = [(6, 10), (12, 5), (3, 4, 5), (2, 3, 4, 5)]
    hparams = {"merge_dims": True, "max_precondition_dim": 30}
    ours = run_pair(lambda ps: ko.SOAP(ps, **hparams), shapes=shapes)
    theirs = run_pair(lambda ps: pytorch_optimizer.SOAP(ps, **hparams), shapes=shapes)
    assert max_difference(ours, theirs) <= 1e-6
    assert ko.soap.merged_shape((2, 3, 4, 5), 30) == (24, 5)
    assert ko.soap.merged_shape((64, 3, 3, 3), 10000) == (1728,)
    assert ko.soap.merged_shape((50000, 768), 10000) == (50000, 768)


def test_soap_difference_from_pytorch_optimizer_is_only_its_float32_qr():
    class Float64QR(pytorch_optimizer.SOAP):
        def get_orthogonal_matrix_qr(self, state, *args, **kwargs):
            real_to = torch.Tensor.to

            def keep_float64(tensor, *a, **k):
                if a and a[0] is torch.float32 and tensor.dtype == torch.float64:
                    return tensor
                return real_to(tensor, *a, **k)

            torch.Tensor.to = keep_float64
            try:
                return super().get_orthogonal_matrix_qr(state, *args, **kwargs)
            finally:
                torch.Tensor.to = real_to

    ours = run_pair(lambda ps: ko.SOAP(ps, precondition_frequency=5))
    theirs = run_pair(lambda ps: Float64QR(ps, precondition_frequency=5))
    assert max_difference(ours, theirs) <= 1e-12


def test_soap_first_step_only_initialises():
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    before = p.detach().clone()
    opt = ko.SOAP([p], weight_decay=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), before)
    state = opt.state[p]
    assert state["step"] == 0 and state["GG"][0].shape == (4, 4) and state["GG"][1].shape == (3, 3)
    for q in state["Q"]:
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype))


# --- form: playbook: the Playbook's rules as written, run through keel's registry ---


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_rmsprop_playbook_form_is_the_playbook_rule(gamma):
    ours = run_torch("rmsprop", form="playbook", alpha=0.95, momentum=gamma, eps=1e-6)
    assert_same(ours, run_formula(playbook_rmsprop(0.95, gamma, 1e-6)))
    assert (ours - run_torch("rmsprop", alpha=0.95, momentum=gamma, eps=1e-6)).abs().max() > 1e-3  # torch differs


def test_nadam_playbook_form_is_the_playbook_rule():
    ours = run_torch("nadam", form="playbook", betas=(0.9, 0.99), eps=1e-7)
    assert_same(ours, run_formula(playbook_nadam(0.9, 0.99, 1e-7)))
    assert (ours - run_torch("nadam", betas=(0.9, 0.99), eps=1e-7)).abs().max() > 1e-3


@pytest.mark.parametrize("eps", [1e-8, 0.1])
def test_adam_playbook_form_is_the_playbook_rule(eps):
    """eps before the bias correction (the Playbook's, Kingma & Ba's eps-hat), weight decay in the gradient."""
    ours = run_torch("adam", form="playbook", betas=(0.9, 0.99), eps=eps)
    assert_same(ours, run_formula(playbook_adam(0.9, 0.99, eps)))
    if eps == 0.1:  # torch adds eps after the bias correction: visibly different where eps matters
        assert (ours - run_torch("adam", betas=(0.9, 0.99), eps=eps)).abs().max() > 1e-3
    with_decay = run_torch("adam", form="playbook", weight_decay=0.05, eps=eps)
    assert_same(with_decay, run_formula(lambda th, g, lr, t, st, f=playbook_adam(0.9, 0.999, eps):
                                        f(th, g + 0.05 * th, lr, t, st)))


def test_adam_playbook_form_refuses_amsgrad():
    from keel.errors import KeelError

    with pytest.raises(KeelError, match="optimizer.amsgrad"):
        ko.create("adam", [torch.zeros(3, requires_grad=True)], form="playbook", amsgrad=True)
    assert ko.check_config({"name": "adam", "form": "playbook"})["form"] == "playbook"
    with pytest.raises(KeelError, match="form"):
        ko.check_config({"name": "adamw", "form": "playbook"})  # only Adam, RMSProp and NAdam have the form


def test_playbook_forms_resume_exactly():
    theta = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).requires_grad_(True)
    for name in ("rmsprop", "adam", "nadam"):
        a = theta.detach().clone().requires_grad_(True)
        b = theta.detach().clone().requires_grad_(True)
        opt_a = ko.create(name, [a], lr=0.05, form="playbook")
        opt_b = ko.create(name, [b], lr=0.05, form="playbook")
        grads = gradients((24,), 20)
        for t, g in enumerate(grads):
            if t == 10:  # b's optimizer is rebuilt from a state dict mid-run
                saved = opt_b.state_dict()
                opt_b = ko.create(name, [b], lr=0.05, form="playbook")
                opt_b.load_state_dict(saved)
            for p, opt in ((a, opt_a), (b, opt_b)):
                p.grad = g.clone()
                opt.step()
        assert torch.equal(a, b)
