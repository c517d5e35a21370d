"""Hypergradient descent: SGD and Adam that learn their learning rate online (Baydin et al. 2018, "Online Learning
Rate Adaptation with Hypergradient Descent", ICLR; arXiv:1703.04782).

The update of step t is ``p_t = p_{t-1} - alpha_t u_t`` with ``u_t`` the rule's direction (SGD: the gradient;
Adam: ``m_hat_t / (sqrt(v_hat_t) + eps)``). The derivative of the loss at ``p_{t-1}`` with respect to the learning
rate of the previous step is ``h_t = g_t . (-u_{t-1})``, so before each update the LR takes one gradient step of
its own (the paper's Algorithms 1-3)::

    h_t     = -g_t . u_{t-1}                (u_0 = 0: the first step uses alpha_0)
    alpha_t = alpha_{t-1} - beta h_t        = alpha_{t-1} + beta g_t . u_{t-1}
    p_t     = p_{t-1} - alpha_t u_t

SGD-HD: ``u_t = g_t`` (``+ wd p_{t-1}`` with weight decay; with ``momentum`` the heavy-ball or Nesterov direction,
as the paper's SGDN-HD). Adam-HD: ``u_t = m_hat_t / (sqrt(v_hat_t) + eps)`` (``+ wd p_{t-1}``: decoupled weight
decay, AdamW's). The dot product runs over every parameter of every group: one LR for the model, as in the paper.

**With a schedule.** ``alpha`` is the learned *peak* LR, starting at the ``lr`` the optimizer was built with
(``alpha_0``). A group's LR each step is ``group["lr"] * alpha_t / alpha_0``: whatever sets ``group["lr"]`` (keel's
trainer, from the schedule, times the group's ``lr_scale``) gives the shape, and hypergradient descent scales it.
The hypergradient then carries that shape: ``u`` is stored as ``(group_lr / alpha_0) * direction``, the exact
derivative of the step with respect to ``alpha``. With ``group["lr"]`` left at ``alpha_0`` (a constant schedule,
or no trainer) this is the paper's rule exactly. ``optimizer.hypergradient_lr_factor`` is ``alpha_t / alpha_0``.

Defaults follow the paper's experiments: ``hypergradient_lr`` (beta) 1e-3 for SGD-HD and 1e-7 for Adam-HD. alpha
is not clipped: a too large beta drives it negative, as in the paper's method.
"""

from __future__ import annotations

from typing import Any

import torch

from keel.optim.closure import closure_loss

__all__ = ["AdamHD", "SGDHD"]


class _HypergradientOptimizer(torch.optim.Optimizer):
    """The shared part: the learned ``alpha``, the global dot product and the state_dict that carries both."""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        lr = defaults["lr"]
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0 (alpha_0, the LR hypergradient descent starts from), got {lr}")
        if not defaults["hypergradient_lr"] >= 0.0:
            raise ValueError(f"hypergradient_lr must be >= 0, got {defaults['hypergradient_lr']}")
        if not defaults["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        super().__init__(params, defaults)
        self.initial_lr = float(lr)  # alpha_0
        self.alpha = float(lr)  # alpha_t, the learned peak LR

    @property
    def hypergradient_lr_factor(self) -> float:
        """alpha_t / alpha_0: what hypergradient descent multiplies the scheduled LR by."""
        return self.alpha / self.initial_lr

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hypergradient"] = {"alpha": self.alpha, "initial_lr": self.initial_lr}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("hypergradient", None)
        super().load_state_dict(state_dict)
        if saved is not None:
            self.alpha, self.initial_lr = float(saved["alpha"]), float(saved["initial_lr"])

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    yield group, p

    def _hypergradient_step(self) -> None:
        """alpha_t = alpha_{t-1} + beta g_t . u_{t-1}, over every parameter (u_{t-1} stored as ``previous``)."""
        dot = None
        for group, p in self._params_with_grad():
            previous = self.state[p].get("previous")
            if previous is None:
                continue
            term = torch.dot(p.grad.reshape(-1).to(previous.dtype), previous.reshape(-1))
            dot = term if dot is None else dot + term
        if dot is not None:
            self.alpha += self.defaults["hypergradient_lr"] * float(dot)

    def _apply(self, group: dict, p: torch.Tensor, direction: torch.Tensor) -> None:
        """p <- p - (group lr * alpha / alpha_0) direction; remember (group lr / alpha_0) direction as u."""
        shape = float(group["lr"]) / self.initial_lr
        self.state[p]["previous"] = direction.mul(shape)
        p.add_(direction.to(p.dtype), alpha=-shape * self.alpha)


class SGDHD(_HypergradientOptimizer):
    """SGD-HD (Baydin et al. 2018, Algorithm 1; SGDN-HD with ``nesterov``): SGD whose LR follows its hypergradient.

    ``alpha_t = alpha_{t-1} + beta g_t . u_{t-1}``; ``p_t = p_{t-1} - alpha_t u_t``, ``u_t = g_t + wd p_{t-1}``
    (torch's coupled weight decay), or with ``momentum`` mu: ``v_t = mu v_{t-1} + u_t`` and the direction ``v_t``
    (``u_t + mu v_t`` with ``nesterov``), as in torch.optim.SGD. State per parameter: ``previous`` (u_{t-1} times the
    schedule's shape) and ``momentum_buffer``; the optimizer's ``alpha`` is in ``state_dict()["hypergradient"]``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        hypergradient_lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum <= 0.0:
            raise ValueError("nesterov needs a momentum > 0")
        super().__init__(params, {"lr": lr, "hypergradient_lr": hypergradient_lr, "momentum": momentum,
                                  "nesterov": nesterov, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self._hypergradient_step()
        for group, p in list(self._params_with_grad()):
            direction = p.grad.clone()
            if group["weight_decay"]:
                direction.add_(p, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = direction.clone()
                else:
                    buffer.mul_(momentum).add_(direction)
                direction = direction.add(buffer, alpha=momentum) if group["nesterov"] else buffer.clone()
            self._apply(group, p, direction)
        return loss


class AdamHD(_HypergradientOptimizer):
    """Adam-HD (Baydin et al. 2018, Algorithm 3): Adam whose LR follows its hypergradient.

    ``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2``, ``u_t = m_t/(1 - b1^t) / (sqrt(v_t/(1 - b2^t)) + eps)``
    ``+ wd p_{t-1}`` (decoupled weight decay); ``alpha_t = alpha_{t-1} + beta g_t . u_{t-1}``;
    ``p_t = p_{t-1} - alpha_t u_t``. State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``previous``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        hypergradient_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "hypergradient_lr": hypergradient_lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self._hypergradient_step()
        for group, p in list(self._params_with_grad()):
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            grad = p.grad
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            m_hat = exp_avg / (1.0 - beta1**step)
            v_hat = exp_avg_sq / (1.0 - beta2**step)
            direction = m_hat.div_(v_hat.sqrt_().add_(group["eps"]))
            if group["weight_decay"]:
                direction.add_(p, alpha=group["weight_decay"])
            self._apply(group, p, direction)
        return loss
