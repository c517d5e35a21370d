"""SGD-HD and Adam-HD against the paper's update rules (Baydin et al. 2018, Algorithms 1 and 3), written out by hand
in float64 over one flat parameter vector; the schedule's shape; state_dict round trip; a trainer run."""

import io
import math

import pytest
import torch

import keel.optim as ko
from keel.schedules import set_lr

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.sin(X @ torch.arange(1.0, 6.0, dtype=torch.float64))


def loss_of(flat: torch.Tensor, t: int) -> torch.Tensor:
    """A small two-layer network whose weights are one flat vector (5x4 + 4 + 4x1 + 1 = 29 numbers)."""
    w1, b1, w2, b2 = flat[:20].view(5, 4), flat[20:24], flat[24:28].view(4, 1), flat[28:29]
    rows = slice((t * 16) % 64, (t * 16) % 64 + 16)  # minibatches: the gradients change step to step
    out = torch.tanh(X[rows] @ w1 + b1) @ w2 + b2
    return ((out.squeeze(1) - Y[rows]) ** 2).mean()


def gradient(flat: torch.Tensor, t: int) -> torch.Tensor:
    flat = flat.detach().clone().requires_grad_(True)
    loss_of(flat, t).backward()
    return flat.grad


def start() -> torch.Tensor:
    return torch.randn(29, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5


def run_optimizer(optimizer_class, steps, **kwargs):
    param = torch.nn.Parameter(start())
    optimizer = optimizer_class([param], **kwargs)
    for t in range(steps):
        optimizer.zero_grad()
        loss_of(param, t).backward()
        optimizer.step()
    return param.detach(), optimizer


def reference_sgd_hd(steps, alpha, beta, momentum=0.0, nesterov=False, weight_decay=0.0):
    """Algorithm 1 (SGD-HD), and SGDN-HD: alpha_t = alpha_{t-1} - beta h_t, h_t = g_t . (-u_{t-1})."""
    theta, u_prev, velocity = start(), torch.zeros(29, dtype=torch.float64), None
    for t in range(steps):
        g = gradient(theta, t)
        h = -(g @ u_prev)
        alpha = alpha - beta * h
        d = g + weight_decay * theta
        if momentum:
            velocity = d.clone() if velocity is None else momentum * velocity + d
            d = d + momentum * velocity if nesterov else velocity
        theta = theta - alpha * d
        u_prev = d
    return theta, float(alpha)


def reference_adam_hd(steps, alpha, beta, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """Algorithm 3 (Adam-HD): h_t = g_t . (-m_hat_{t-1} / (sqrt(v_hat_{t-1}) + eps))."""
    theta = start()
    m, v, u_prev = (torch.zeros(29, dtype=torch.float64) for _ in range(3))
    for t in range(1, steps + 1):
        g = gradient(theta, t - 1)
        h = -(g @ u_prev)
        alpha = alpha - beta * h
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps) + weight_decay * theta
        theta = theta - alpha * u
        u_prev = u
    return theta, float(alpha)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.6}, {"momentum": 0.5, "nesterov": True},
                                     {"weight_decay": 0.01}])
def test_sgd_hd_follows_the_papers_rule(options):
    expected, alpha = reference_sgd_hd(40, 0.05, 0.01, **options)
    found, optimizer = run_optimizer(ko.SGDHD, 40, lr=0.05, hypergradient_lr=0.01, **options)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    assert optimizer.alpha == pytest.approx(alpha, rel=1e-12)
    assert optimizer.alpha != 0.05  # the LR moved


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}, {"betas": (0.8, 0.99), "eps": 1e-6}])
def test_adam_hd_follows_the_papers_rule(options):
    reference_options = {"b1": options["betas"][0], "b2": options["betas"][1], "eps": options["eps"]} \
        if "betas" in options else dict(options)
    expected, alpha = reference_adam_hd(40, 0.01, 1e-4, **reference_options)
    found, optimizer = run_optimizer(ko.AdamHD, 40, lr=0.01, hypergradient_lr=1e-4, **options)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    assert optimizer.alpha == pytest.approx(alpha, rel=1e-12)
    assert optimizer.alpha != 0.01


def test_zero_hypergradient_lr_is_the_plain_rule():
    found, _ = run_optimizer(ko.AdamHD, 25, lr=0.01, hypergradient_lr=0.0)
    param = torch.nn.Parameter(start())
    adam = torch.optim.Adam([param], lr=0.01)
    for t in range(25):
        adam.zero_grad()
        loss_of(param, t).backward()
        adam.step()
    torch.testing.assert_close(found, param.detach(), rtol=1e-10, atol=1e-12)


def test_a_schedule_shapes_the_learned_lr_and_the_hypergradient_carries_the_shape():
    """group lr s_t * scale (what keel's trainer sets) -> step alpha_t * (s_t * scale / alpha_0) * u_t; the stored
    u is the derivative of the step with respect to alpha."""
    alpha0, beta, scales = 0.05, 0.01, (1.0, 0.5)
    shape = [1.0 if t < 10 else 0.5 * (1 + math.cos(math.pi * (t - 10) / 20)) for t in range(30)]
    param_a, param_b = torch.nn.Parameter(start()[:20]), torch.nn.Parameter(start()[20:])
    optimizer = ko.SGDHD([{"params": [param_a], "lr_scale": scales[0]}, {"params": [param_b], "lr_scale": scales[1]}],
                         lr=alpha0, hypergradient_lr=beta)
    theta, alpha, u_prev = start(), alpha0, torch.zeros(29, dtype=torch.float64)
    factors = torch.cat([torch.full((20,), scales[0], dtype=torch.float64), torch.full((9,), scales[1], dtype=torch.float64)])
    for t in range(30):
        set_lr(optimizer, alpha0 * shape[t])
        optimizer.zero_grad()
        loss_of(torch.cat([param_a, param_b]), t).backward()
        optimizer.step()
        g = gradient(theta, t)
        alpha = alpha + beta * float(g @ u_prev)
        relative = shape[t] * factors  # group lr / alpha_0
        theta = theta - alpha * relative * g
        u_prev = relative * g
    torch.testing.assert_close(torch.cat([param_a, param_b]).detach(), theta, rtol=1e-12, atol=1e-12)
    assert optimizer.hypergradient_lr_factor == pytest.approx(alpha / alpha0, rel=1e-12)


@pytest.mark.parametrize("name", ["sgd_hd", "adam_hd"])
def test_state_dict_carries_the_learned_lr(name):
    model = torch.nn.Linear(4, 1)
    optimizer = ko.create(name, model, hypergradient_lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    again = ko.create(name, model, hypergradient_lr=1e-2)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert again.alpha == optimizer.alpha != again.initial_lr


def test_registry_checks_the_hyperparameters():
    from keel.errors import KeelError

    assert ko.check_config({"name": "adam_hd"})["hypergradient_lr"] == 1e-7
    assert ko.check_config({"name": "sgd_hd"})["hypergradient_lr"] == 1e-3
    with pytest.raises(KeelError, match="hypergradient_lr"):
        ko.check_config({"name": "sgd_hd", "hypergradient_lr": -1})


def test_trains_in_the_trainer(tmp_path):
    from keel.config import load_config
    from keel.train import train

    torch.set_default_dtype(torch.float32)
    config = load_config(None, ["task=digits", "max_steps=30", "eval_interval=30", "device=cpu", "threads=1",
                                "optimizer={name: adam_hd, lr: 3e-3, hypergradient_lr: 1e-6}"])
    summary = train(config, run_dir=tmp_path / "run", quiet=True)
    assert summary["val_accuracy"] > 0.5
