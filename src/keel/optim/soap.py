"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024, "SOAP: Improving and Stabilizing
Shampoo using Adam"; reference code github.com/nikhilvyas/SOAP).

For a weight W (m x n) with gradient G, SOAP keeps Shampoo's statistics L = EMA(G G^T), R = EMA(G^T G) (decay
`shampoo_beta`) and their eigenbases Q_L, Q_R, and runs Adam on the rotated gradient G' = Q_L^T G Q_R:

    m' = beta1 m' + (1 - beta1) G'           v = beta2 v + (1 - beta2) G'^2
    W <- W - lr sqrt(1 - beta2^t) / (1 - beta1^t) Q_L (m' / (sqrt(v) + eps)) Q_R^T
    W <- W (1 - lr wd)                         (decoupled weight decay, after the update, as in the reference)
    L, R <- shampoo_beta L + (1 - shampoo_beta) G G^T, ... (after the update: the current gradient never enters
                                                           its own projection)

Every `precondition_frequency` steps the eigenbases are refreshed by one power iteration and a QR decomposition
(Q <- qr(L Q sorted by the estimated eigenvalues)), and v is permuted to the new order; the very first call only
initialises L, R and their eigenbases (torch.linalg.eigh) and leaves the weights unchanged. A dimension larger than
`max_precondition_dim` is not rotated (identity); `merge_dims` first merges consecutive dimensions while their
product stays <= `max_precondition_dim`; 1-D parameters are rotated only with `precondition_1d`. Each tensor is
Adam with an identity basis where nothing is rotated.

keel keeps the first moment m' in the rotated basis (as the reference does) and moves it to the new basis only
when the basis changes, so a step costs two rotations instead of three. Defaults follow the paper and reference:
lr 3e-3, betas (0.95, 0.95), shampoo_beta = beta2, eps 1e-8, weight_decay 0.01, precondition_frequency 10,
max_precondition_dim 10000. The reference names the latter `max_precond_dim` and writes `shampoo_beta=-1` for
"use beta2"; keel (like pytorch-optimizer) writes `None`.
"""

from __future__ import annotations

import math

import torch

from keel.optim.closure import closure_loss

__all__ = ["SOAP", "merged_shape"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product stays <= `max_dim` (the reference's rule)."""
    out, current = [], 1
    for size in shape:
        product = current * size
        if product > max_dim:
            if current > 1:
                out.append(current)
                current = size
            else:
                out.append(size)
                current = 1
        else:
            current = product
    if current > 1 or not out:
        out.append(current)
    return tuple(out)


def _rotate(x: torch.Tensor, bases: list, back: bool) -> torch.Tensor:
    """x multiplied along each dimension i by Q_i^T (`back=False`) or Q_i (`back=True`); None bases are skipped."""
    if x.ndim == 2:
        left, right = bases
        if left is not None:
            x = (left @ x) if back else (left.T @ x)
        if right is not None:
            x = (x @ right.T) if back else (x @ right)
        return x
    for i, q in enumerate(bases):
        if q is not None:
            x = torch.movedim(torch.tensordot(x, q, dims=([i], [1 if back else 0])), -1, i)
    return x


class SOAP(torch.optim.Optimizer):
    """SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's preconditioner, refreshed every few steps.

    State per parameter: `step` (Adam updates applied), `exp_avg` (in the rotated basis), `exp_avg_sq`,
    `GG` (Shampoo's statistics per dimension, None where not rotated) and `Q` (their eigenbases). State is kept
    in float32 for bfloat16/float16 parameters, in the parameter's dtype otherwise.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
            raise ValueError(f"shampoo_beta must be in [0, 1) or None, got {shampoo_beta}")
        if not (precondition_frequency >= 1 and max_precondition_dim >= 1):
            raise ValueError("precondition_frequency and max_precondition_dim must be >= 1")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": int(precondition_frequency),
            "max_precondition_dim": int(max_precondition_dim),
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)

    @staticmethod
    def _shape(p: torch.Tensor, group: dict) -> tuple[int, ...]:
        if p.ndim > 1 and group["merge_dims"]:
            return merged_shape(tuple(p.shape), group["max_precondition_dim"])
        return tuple(p.shape)

    def _init_state(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        shape = self._shape(p, group)
        limit = group["max_precondition_dim"]
        rotated = [size <= limit for size in shape]
        if p.ndim <= 1:
            rotated = [group["precondition_1d"] and size <= limit for size in shape]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        state["GG"] = [grad.new_zeros(size, size) if r else None for size, r in zip(shape, rotated)]
        self._accumulate(state, grad.reshape(shape), group)
        state["Q"] = [None if gg is None else self._eigenbasis(gg) for gg in state["GG"]]

    @staticmethod
    def _eigenbasis(gg: torch.Tensor) -> torch.Tensor:
        """Eigenvectors of a statistic, by decreasing eigenvalue (torch.linalg.eigh, in float64 on failure)."""
        eye = torch.eye(gg.shape[0], dtype=gg.dtype, device=gg.device)
        try:
            _, q = torch.linalg.eigh(gg + 1e-30 * eye)
        except RuntimeError:
            _, q = torch.linalg.eigh(gg.double() + 1e-30 * eye.double())
            q = q.to(gg.dtype)
        return torch.flip(q, dims=[1])

    @staticmethod
    def _accumulate(state: dict, grad: torch.Tensor, group: dict) -> None:
        """GG_i <- shampoo_beta GG_i + (1 - shampoo_beta) (G contracted with itself over every dim but i)."""
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        for i, gg in enumerate(state["GG"]):
            if gg is None:
                continue
            if grad.ndim == 1:
                outer = grad.unsqueeze(1) @ grad.unsqueeze(0)
            elif grad.ndim == 2:
                outer = grad @ grad.T if i == 0 else grad.T @ grad
            else:
                other = [d for d in range(grad.ndim) if d != i]
                outer = torch.tensordot(grad, grad, dims=(other, other))
            gg.lerp_(outer, 1.0 - beta)

    @staticmethod
    def _refresh(state: dict, shape: tuple[int, ...]) -> None:
        """One power iteration and QR per rotated dim; v follows the new order; m' moves to the new basis."""
        exp_avg = _rotate(state["exp_avg"].reshape(shape), state["Q"], back=True)
        exp_avg_sq = state["exp_avg_sq"].reshape(shape)
        bases = []
        for i, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
            if gg is None:
                bases.append(None)
                continue
            product = gg @ q
            estimated = (q * product).sum(dim=0)
            order = torch.argsort(estimated, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(i, order)
            bases.append(torch.linalg.qr(product.index_select(1, order))[0])
        state["Q"] = bases
        state["exp_avg_sq"] = exp_avg_sq.reshape(state["exp_avg_sq"].shape).contiguous()
        state["exp_avg"] = _rotate(exp_avg, bases, back=False).reshape(state["exp_avg"].shape).contiguous()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that float32 state of bfloat16/float16 parameters stays float32 (exact resume)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            if p.dtype not in _LOW_PRECISION or saved_id not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][saved_id].items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
                elif isinstance(value, list):
                    self.state[p][key] = [None if v is None else v.to(device=p.device, copy=True) for v in value]

    @torch.no_grad()
    def step(self, closure=None):
        """One SOAP update of every parameter with a gradient (the first call per parameter only initialises)."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params, grads, rotated_grads, exp_avgs, exp_avg_sqs, shapes = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("SOAP supports dense real gradients only")
                dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
                grad = p.grad.to(dtype)
                state = self.state[p]
                if "step" not in state:
                    self._init_state(p, grad, group)
                    continue  # the first gradient only initialises the preconditioner
                shape = self._shape(p, group)
                state["step"] += 1
                params.append(p)
                grads.append(grad)
                shapes.append(shape)
                rotated_grads.append(_rotate(grad.reshape(shape), state["Q"], back=False).reshape(grad.shape))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if not params:
                continue
            torch._foreach_lerp_(exp_avgs, rotated_grads, 1.0 - beta1)
            torch._foreach_mul_(rotated_grads, rotated_grads)
            torch._foreach_lerp_(exp_avg_sqs, rotated_grads, 1.0 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, group["eps"])
            ratios = torch._foreach_div(exp_avgs, denominators)
            lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
            for p, grad, ratio, shape in zip(params, grads, ratios, shapes):
                state = self.state[p]
                step = state["step"]
                size = lr
                if group["correct_bias"]:
                    size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = _rotate(ratio.reshape(shape), state["Q"], back=True).reshape(p.shape)
                if p.dtype in _LOW_PRECISION:
                    work = p.float().add_(update, alpha=-size)
                    if group["weight_decay"] > 0:
                        work.mul_(decay)
                    p.copy_(work)
                else:
                    p.add_(update, alpha=-size)
                    if group["weight_decay"] > 0:
                        p.mul_(decay)
                self._accumulate(state, grad.reshape(shape), group)
                if step % group["precondition_frequency"] == 0:
                    self._refresh(state, shape)
        return loss
