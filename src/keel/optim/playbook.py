"""RMSProp, Adam and NAdam exactly as the Deep Learning Tuning Playbook's FAQ writes them (``form: playbook``).

torch's RMSprop, Adam and NAdam differ from the Playbook's rules (docs/optimizers.md lists where); these classes are
the Playbook's own, for comparisons that must use its conventions. With ``eta_t`` the learning rate of step ``t``
(``t`` counting from 0) and ``g_t`` the gradient (plus ``weight_decay * theta`` when set):

RMSProp::

    v_0 = 1, m_0 = 0
    v_{t+1} = rho v_t + (1 - rho) g_t^2
    m_{t+1} = gamma m_t + eta_t / sqrt(v_{t+1} + eps) g_t        (the LR inside the momentum buffer)
    theta_{t+1} = theta_t - m_{t+1}

Adam (the paper's "efficient" form: eps is added before the bias correction ``b``, Kingma & Ba's eps-hat, where
torch adds it to ``sqrt(v_hat)`` after it)::

    m_0 = v_0 = 0
    m_{t+1} = beta1 m_t + (1 - beta1) g_t
    v_{t+1} = beta2 v_t + (1 - beta2) g_t^2
    b_{t+1} = sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))
    theta_{t+1} = theta_t - eta_t m_{t+1} / (sqrt(v_{t+1}) + eps) b_{t+1}

NAdam (Adam's moments and ``b``; the numerator looks one step ahead)::

    m_0 = v_0 = 0
    m_{t+1} = beta1 m_t + (1 - beta1) g_t
    v_{t+1} = beta2 v_t + (1 - beta2) g_t^2
    b_{t+1} = sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))
    theta_{t+1} = theta_t - eta_t (beta1 m_{t+1} + (1 - beta1) g_t) / (sqrt(v_{t+1}) + eps) b_{t+1}

Written in keel because no library implements these forms; plain per-tensor loops (they exist for fidelity, not
speed). Source: google-research/tuning_playbook, FAQ "What are the update rules for all the popular optimization
algorithms?".
"""

from __future__ import annotations

import math

import torch

from keel.optim.closure import closure_loss


def _coupled_grads(optimizer: torch.optim.Optimizer):
    """(group, parameter, gradient + weight_decay * parameter, its state) for every parameter with a gradient: the
    Playbook's rules take L2 weight decay into the gradient."""
    for group in optimizer.param_groups:
        wd = group["weight_decay"]
        for p in group["params"]:
            if p.grad is not None:
                yield group, p, (p.grad if wd == 0 else p.grad.add(p, alpha=wd)), optimizer.state[p]


class PlaybookRMSProp(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, rho: float = 0.99, momentum: float = 0.0, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "rho": rho, "momentum": momentum, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, p, grad, state in _coupled_grads(self):
            lr, rho, gamma, eps = group["lr"], group["rho"], group["momentum"], group["eps"]
            if not state:
                state["v"] = torch.ones_like(p, memory_format=torch.preserve_format)
                state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            v, m = state["v"], state["m"]
            v.mul_(rho).addcmul_(grad, grad, value=1 - rho)
            m.mul_(gamma).addcdiv_(grad, v.add(eps).sqrt_(), value=lr)
            p.sub_(m)
        return loss


class PlaybookAdam(torch.optim.Optimizer):
    """The Playbook's Adam; ``PlaybookNAdam`` shares its moments and bias correction and changes the numerator."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @staticmethod
    def numerator(m: torch.Tensor, grad: torch.Tensor, beta1: float) -> torch.Tensor:
        """Adam's ``m_{t+1}``."""
        return m

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, p, grad, state in _coupled_grads(self):
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t1 = int(state["step"].item())  # t + 1
            m, v = state["m"], state["v"]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            b = math.sqrt(1 - beta2**t1) / (1 - beta1**t1)
            p.addcdiv_(self.numerator(m, grad, beta1), v.sqrt().add_(eps), value=-lr * b)
        return loss


class PlaybookNAdam(PlaybookAdam):
    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @staticmethod
    def numerator(m: torch.Tensor, grad: torch.Tensor, beta1: float) -> torch.Tensor:
        """NAdam's ``beta1 m_{t+1} + (1 - beta1) g_t``."""
        return m.mul(beta1).add_(grad, alpha=1 - beta1)
