"""Lion: the sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    c_t = beta1 m_{t-1} + (1 - beta1) g_t
    p_t = p_{t-1} (1 - lr wd) - lr sign(c_t)
    m_t = beta2 m_{t-1} + (1 - beta2) g_t

Defaults follow the paper and its reference code (google/automl, lion_pytorch.py): lr 1e-4 (3-10x below
AdamW's), betas (0.9, 0.99), weight_decay 0 (the paper uses a 3-10x larger decay than AdamW's when set).
"""

from __future__ import annotations

import torch

from keel.optim.multi_tensor import MultiTensorOptimizer

__all__ = ["Lion"]


class Lion(MultiTensorOptimizer):
    """Lion (Chen et al. 2023): p <- p (1 - lr wd) - lr sign(beta1 m + (1 - beta1) g); m <- beta2 m + (1 - beta2) g.

    State per parameter: `exp_avg` (m; float32 for bfloat16/float16 parameters) and `step`. `fused`, and
    `total_steps` (the run's length if known, which decides whether `fused=None` compiles): see
    `keel.optim.multi_tensor`.
    """

    state_names = ("exp_avg",)

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        fused: bool | None = None,
        total_steps: int | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        super().__init__(params, defaults, fused, total_steps)

    def _scalars(self, group: dict, step: int) -> list[float]:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        return [lr, 1.0 - lr * group["weight_decay"], 1.0 - beta1, 1.0 - beta2]

    @staticmethod
    def _update_foreach(params, grads, states, scalars) -> None:
        lr, decay, one_minus_beta1, one_minus_beta2 = scalars
        (exp_avgs,) = states
        updates = torch._foreach_lerp(exp_avgs, grads, one_minus_beta1)
        torch._foreach_sign_(updates)
        torch._foreach_lerp_(exp_avgs, grads, one_minus_beta2)
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        torch._foreach_add_(params, updates, alpha=-lr)

    @staticmethod
    def _update_tensor(p, g, states, h) -> None:
        (m,) = states
        lr, decay, one_minus_beta1, one_minus_beta2 = h[0], h[1], h[2], h[3]
        m32 = m.to(g.dtype)
        update = torch.sign(m32 + one_minus_beta1 * (g - m32))
        m.copy_(m32 + one_minus_beta2 * (g - m32))
        p.copy_(p.to(g.dtype) * decay - lr * update)
