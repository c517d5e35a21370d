"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA (Pagliardini, Ablin & Grangier 2024).

    m1_t = beta1 m1 + (1 - beta1) g            (fast EMA, bias-corrected)
    m2_t = beta3(t) m2 + (1 - beta3(t)) g      (slow EMA, not bias-corrected)
    v_t  = beta2 v + (1 - beta2) g^2
    p_t  = p (1 - lr wd) - lr (m1_t / (1 - beta1^t) + alpha(t) m2_t) / (sqrt(v_t / (1 - beta2^t)) + eps)

with the paper's warmup schedules (both off by default; the paper sets both to the run length):
    alpha(t) = min(t / T_alpha, 1) alpha
    beta3(t) = min(exp(ln(beta1) ln(beta3) / ((1 - t / T_beta3) ln(beta3) + (t / T_beta3) ln(beta1))), beta3)
beta3(t) grows linearly in half-life from beta1 to beta3. Defaults: betas (0.9, 0.999, 0.9999), alpha 5, eps 1e-8,
weight_decay 0 (decoupled, as in apple/ml-ademamix). apple/ml-ademamix's class defaults to alpha 2.0 and puts
1e-8 inside the logarithm of its beta3 schedule; pytorch-optimizer couples weight decay into the gradient by
default (`weight_decouple=False`) and warms alpha and beta3 over one shared `t_alpha_beta3`.
"""

from __future__ import annotations

import math

import torch

from keel.optim.multi_tensor import MultiTensorOptimizer

__all__ = ["AdEMAMix", "alpha_schedule", "beta3_schedule"]


def alpha_schedule(step: int, alpha: float, warmup: int | None) -> float:
    """alpha(t) = min(t / T, 1) alpha (linear warmup from 0; `warmup=None` keeps alpha)."""
    return alpha if not warmup else min(step / warmup, 1.0) * alpha


def beta3_schedule(step: int, beta1: float, beta3: float, warmup: int | None) -> float:
    """beta3(t): linear in half-life from beta1 at t=0 to beta3 at t=T (`warmup=None` keeps beta3)."""
    if not warmup or step >= warmup:
        return beta3
    fraction = step / warmup
    if beta1 <= 0.0:  # the limit of the formula as beta1 -> 0
        return beta3 ** (1.0 / fraction) if fraction > 0 else 0.0
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log_beta1 * log_beta3 / ((1.0 - fraction) * log_beta3 + fraction * log_beta1)), beta3)


class AdEMAMix(MultiTensorOptimizer):
    """AdEMAMix (Pagliardini et al. 2024): Adam whose numerator adds alpha times a slow EMA of the gradient.

    `betas` = (beta1, beta2, beta3); `alpha_warmup`, `beta3_warmup` in steps (None: no warmup; the paper uses
    the run length, which `keel.optim.create` / `from_config` accept as "100%");
    `t_alpha_beta3` (pytorch-optimizer's name) sets both warmups. State per parameter: `exp_avg` (m1),
    `exp_avg_sq` (v), `exp_avg_slow` (m2), all float32 for bfloat16/float16 parameters, and `step`. `fused`, and
    `total_steps` (the run's length if known, which decides whether `fused=None` compiles): see
    `keel.optim.multi_tensor`.
    """

    state_names = ("exp_avg", "exp_avg_sq", "exp_avg_slow")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        alpha: float = 5.0,
        eps: float = 1e-8,
        alpha_warmup: int | None = None,
        beta3_warmup: int | None = None,
        t_alpha_beta3: int | None = None,
        *,
        fused: bool | None = None,
        total_steps: int | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be three numbers in [0, 1), got {betas}")
        for name, value in (("weight_decay", weight_decay), ("alpha", alpha), ("eps", eps)):
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if t_alpha_beta3 is not None:
            alpha_warmup = alpha_warmup if alpha_warmup is not None else t_alpha_beta3
            beta3_warmup = beta3_warmup if beta3_warmup is not None else t_alpha_beta3
        for name, value in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
            if isinstance(value, str):
                raise ValueError(
                    f"{name} must be a number of steps > 0 or None, got {value!r}; "
                    "keel.optim.create resolves lengths such as '100%' with its `total_steps` or `timeline`"
                )
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a number of steps > 0 or None, got {value}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "alpha": alpha,
            "eps": eps,
            "alpha_warmup": alpha_warmup,
            "beta3_warmup": beta3_warmup,
        }
        super().__init__(params, defaults, fused, total_steps)

    def _scalars(self, group: dict, step: int) -> list[float]:
        beta1, beta2, beta3 = group["betas"]
        lr = float(group["lr"])
        beta3_t = beta3_schedule(step, beta1, beta3, group["beta3_warmup"])
        return [
            lr,
            1.0 - lr * group["weight_decay"],
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            1.0 - beta3_t,
            1.0 - beta1**step,
            math.sqrt(1.0 - beta2**step),
            alpha_schedule(step, group["alpha"], group["alpha_warmup"]),
            group["eps"],
        ]

    @staticmethod
    def _update_foreach(params, grads, states, scalars) -> None:
        lr, decay, one_minus_beta1, beta2, one_minus_beta2 = scalars[:5]
        one_minus_beta3, correction1, sqrt_correction2, alpha, eps = scalars[5:]
        exp_avgs, exp_avg_sqs, exp_avg_slows = states
        torch._foreach_lerp_(exp_avgs, grads, one_minus_beta1)
        torch._foreach_lerp_(exp_avg_slows, grads, one_minus_beta3)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=one_minus_beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, sqrt_correction2)
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, correction1)
        torch._foreach_add_(updates, exp_avg_slows, alpha=alpha)
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        torch._foreach_addcdiv_(params, updates, denominators, value=-lr)

    @staticmethod
    def _update_tensor(p, g, states, h) -> None:
        m1, v, m2 = states
        lr, decay, one_minus_beta1, beta2, one_minus_beta2 = h[0], h[1], h[2], h[3], h[4]
        one_minus_beta3, correction1, sqrt_correction2, alpha, eps = h[5], h[6], h[7], h[8], h[9]
        m1_old, m2_old = m1.to(g.dtype), m2.to(g.dtype)
        m1_new = m1_old + one_minus_beta1 * (g - m1_old)
        m2_new = m2_old + one_minus_beta3 * (g - m2_old)
        v_new = v.to(g.dtype) * beta2 + one_minus_beta2 * g * g
        denominator = torch.sqrt(v_new) / sqrt_correction2 + eps
        update = (m1_new / correction1 + alpha * m2_new) / denominator
        m1.copy_(m1_new)
        m2.copy_(m2_new)
        v.copy_(v_new)
        p.copy_(p.to(g.dtype) * decay - lr * update)
