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
when the basis changes, so a step costs two rotations instead of three.

Two ways to run it, the same rule:

- **one parameter at a time** (`batched=False`, the path on the CPU): each rotation, statistic and refresh is a
  product of its own; `tests/optim/test_optim_parity.py` holds it to pytorch-optimizer in float64.
- **batched** (`batched=True`, the default on CUDA): parameters whose (merged) shape is 2-D are stacked by shape, and
  their state lives in one tensor per stack (the state dict holds views of it): a step's rotations and statistics
  are batched products over the stack (`torch.bmm`), its Adam part one elementwise pass per stack, and the refresh
  one batched power iteration, sort and `torch.linalg.qr` per factor of the stack. Other shapes take the first path.

`matmul_precision`: the precision of those products. "highest" (the state's dtype, as the reference runs them),
"tf32" (float32 products on TF32 tensor cores: inputs rounded to 10 mantissa bits, sums in float32; on the CPU
the rounding is emulated) or "bfloat16" (inputs and outputs in bfloat16). null: "tf32" on CUDA, "highest"
elsewhere. TF32's input rounding (relative 2^-11) is far below what SOAP already approximates: the eigenbasis is
one power iteration from the last one and lags the statistics by up to `precondition_frequency` steps;
`tests/optim/test_soap_batched.py` measures the difference on a small problem against the float64 run. The QR
decompositions and the first eigendecompositions stay in the state's own precision. Defaults follow the paper
and reference:
lr 3e-3, betas (0.95, 0.95), shampoo_beta = beta2, eps 1e-8, weight_decay 0.01, precondition_frequency 10,
max_precondition_dim 10000. The reference names the latter `max_precond_dim` and writes `shampoo_beta=-1` for
"use beta2"; keel (like pytorch-optimizer) writes `None`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from keel.optim.closure import closure_loss
from keel.optim.torch_kernels import plain_on_cuda
from keel.precision import cuda_tf32

__all__ = ["MATMUL_PRECISIONS", "SOAP", "merged_shape"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: What `matmul_precision` may be (null: tf32 on CUDA, highest elsewhere).
MATMUL_PRECISIONS = ("highest", "tf32", "bfloat16")


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


def _apply(p: torch.Tensor, update: torch.Tensor, size: float, decay: float | None) -> None:
    """``p <- (p - size * update) * decay`` (no decay when None), in float32 for low-precision weights."""
    work = p.float() if p.dtype in _LOW_PRECISION else p
    work.add_(update, alpha=-size)
    if decay is not None:
        work.mul_(decay)
    if work is not p:
        p.copy_(work)


def _rotate(x: torch.Tensor, bases: list, back: bool, mm: Callable = torch.matmul, stacked: bool = False
            ) -> torch.Tensor:
    """x multiplied along each dimension i by Q_i^T (`back=False`) or Q_i (`back=True`); None bases are skipped.
    A 2-D x, or a stack of them (`stacked`, with stacked bases), is rotated by `mm`."""
    if x.ndim == 2 or stacked:
        left, right = bases
        if left is not None:
            x = mm(left, x) if back else mm(left.mT, x)
        if right is not None:
            x = mm(x, right.mT) if back else mm(x, right)
        return x
    for i, q in enumerate(bases):
        if q is not None:
            x = torch.movedim(torch.tensordot(x, q, dims=([i], [1 if back else 0])), -1, i)
    return x


def _round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """A float32 tensor rounded to TF32's 10 mantissa bits (to nearest, ties to even), as tensor cores read it."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x)


def _product(precision: str, emulate_tf32: bool) -> Callable:
    """The matrix product of `matmul_precision` (2-D or stacked operands): torch.matmul as it is ("highest", and
    "tf32" on CUDA where the flag is set around the step), with TF32-rounded inputs ("tf32" on the CPU), or in
    bfloat16."""
    if precision == "bfloat16":
        return lambda a, b: torch.matmul(a.bfloat16(), b.bfloat16()).to(a.dtype)
    if precision == "tf32" and emulate_tf32:
        return lambda a, b: torch.matmul(_round_to_tf32(a), _round_to_tf32(b))
    return torch.matmul


class _Stack:
    """Parameters of one group with the same 2-D (merged) shape, state dtype, device and step count; their SOAP
    state in stacked tensors, which the state dict holds views of."""

    def __init__(self, optimizer: "SOAP", group: dict, params: list, shape: tuple[int, int]) -> None:
        self.group, self.params, self.shape = group, params, shape
        states = [optimizer.state[p] for p in params]
        self.exp_avg = torch.stack([s["exp_avg"].reshape(shape) for s in states])
        self.exp_avg_sq = torch.stack([s["exp_avg_sq"].reshape(shape) for s in states])
        self.gg = [None if states[0]["GG"][d] is None else torch.stack([s["GG"][d] for s in states]) for d in (0, 1)]
        self.q = [None if states[0]["Q"][d] is None else torch.stack([s["Q"][d] for s in states]) for d in (0, 1)]
        for i, (p, state) in enumerate(zip(params, states)):  # the state dict sees the stacks through views
            state["exp_avg"] = self.exp_avg[i].view(state["exp_avg"].shape)
            state["exp_avg_sq"] = self.exp_avg_sq[i].view(state["exp_avg_sq"].shape)
            state["GG"] = [None if t is None else t[i] for t in self.gg]
            state["Q"] = [None if t is None else t[i] for t in self.q]


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
        *,
        batched: bool | None = None,
        matmul_precision: str | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
            raise ValueError(f"shampoo_beta must be in [0, 1) or None, got {shampoo_beta}")
        if not (precondition_frequency >= 1 and max_precondition_dim >= 1):
            raise ValueError("precondition_frequency and max_precondition_dim must be >= 1")
        if batched not in (None, True, False):
            raise ValueError(f"batched must be true, false or null (auto), got {batched!r}")
        if matmul_precision is not None and matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} or null, got "
                             f"{matmul_precision!r}")
        self.batched = batched
        self.matmul_precision = matmul_precision
        self._stacks: dict | None = None  # the batched path's stacks, rebuilt when the parameters change
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
    def _accumulate(state: dict, grad: torch.Tensor, group: dict, mm: Callable = torch.matmul) -> None:
        """GG_i <- shampoo_beta GG_i + (1 - shampoo_beta) (G contracted with itself over every dim but i)."""
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        for i, gg in enumerate(state["GG"]):
            if gg is None:
                continue
            if grad.ndim == 1:
                outer = mm(grad.unsqueeze(1), grad.unsqueeze(0))
            elif grad.ndim == 2:
                outer = mm(grad, grad.T) if i == 0 else mm(grad.T, grad)
            else:
                other = [d for d in range(grad.ndim) if d != i]
                outer = torch.tensordot(grad, grad, dims=(other, other))
            gg.lerp_(outer, 1.0 - beta)

    @staticmethod
    def _refresh(state: dict, shape: tuple[int, ...], mm: Callable = torch.matmul) -> None:
        """One power iteration and QR per rotated dim; v follows the new order; m' moves to the new basis."""
        exp_avg = _rotate(state["exp_avg"].reshape(shape), state["Q"], back=True, mm=mm)
        exp_avg_sq = state["exp_avg_sq"].reshape(shape)
        bases = []
        for i, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
            if gg is None:
                bases.append(None)
                continue
            product = mm(gg, q)
            estimated = (q * product).sum(dim=0)
            order = torch.argsort(estimated, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(i, order)
            bases.append(torch.linalg.qr(product.index_select(1, order))[0])
        state["Q"] = bases
        state["exp_avg_sq"] = exp_avg_sq.reshape(state["exp_avg_sq"].shape).contiguous()
        state["exp_avg"] = _rotate(exp_avg, bases, back=False, mm=mm).reshape(state["exp_avg"].shape).contiguous()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that float32 state of bfloat16/float16 parameters stays float32 (exact resume)."""
        super().load_state_dict(state_dict)
        self._stacks = None
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

    def kernels(self) -> dict:
        """The implementation this optimizer runs, as chosen for its parameters (``keel.optim.chosen_kernels``)."""
        return {"batched": self.uses_batched(), "matmul_precision": self.products()}

    def uses_batched(self) -> bool:
        """Whether steps go through the batched path (see `batched`): null means where every parameter is a plain
        tensor on a CUDA device."""
        if self.batched is not None:
            return self.batched
        return plain_on_cuda([p for g in self.param_groups for p in g["params"]])

    def products(self) -> str:
        """The precision of the matrix products this optimizer runs (`matmul_precision`, null resolved)."""
        if self.matmul_precision is not None:
            return self.matmul_precision
        params = [p for g in self.param_groups for p in g["params"]]
        return "tf32" if params and params[0].device.type == "cuda" else "highest"

    @torch.no_grad()
    def step(self, closure=None):
        """One SOAP update of every parameter with a gradient (the first call per parameter only initialises)."""
        loss = closure_loss(closure)
        precision = self.products()
        params = [p for g in self.param_groups for p in g["params"]]
        on_cuda = bool(params) and params[0].device.type == "cuda"
        tf32 = cuda_tf32(precision == "tf32") if on_cuda and precision != "bfloat16" else contextlib.nullcontext()
        mm = _product(precision, emulate_tf32=not on_cuda)
        with tf32:
            if self.uses_batched():
                self._step_batched(mm)
            else:
                self._stacks = None  # this path replaces state tensors: stacks are rebuilt if batched again
                self._step_per_parameter(mm)
        return loss

    def _step_batched(self, mm: Callable) -> None:
        """Stacks of same-shape 2-D parameters step together; the others (and a parameter's first, initialising
        call) take the per-parameter path."""
        stacks, stacked_ids = self._current_stacks()
        rest = {id(p) for g in self.param_groups for p in g["params"] if p.grad is not None} - stacked_ids
        if rest:
            self._step_per_parameter(mm, only=rest)
        for stack in stacks:
            self._step_stack(stack, mm)

    def _current_stacks(self) -> tuple[list[_Stack], set[int]]:
        """The stacks for this step's parameters with gradients, rebuilt when those (or their state) changed."""
        signature = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                signature.append((id(p), p.grad is not None, "step" in state))
        signature = tuple(signature)
        if self._stacks is not None and self._stacks[0] == signature:
            return self._stacks[1], self._stacks[2]
        stacks, ids = [], set()
        for group in self.param_groups:
            members: dict[tuple, list] = {}
            for p in group["params"]:
                state = self.state.get(p, {})
                shape = self._shape(p, group)
                if p.grad is None or "step" not in state or len(shape) != 2:
                    continue
                rotated = tuple(q is not None for q in state["Q"])
                key = (shape, rotated, state["exp_avg"].dtype, p.device, state["step"])
                members.setdefault(key, []).append(p)
            for (shape, *_), params in members.items():
                stacks.append(_Stack(self, group, params, shape))
                ids.update(id(p) for p in params)
        self._stacks = (signature, stacks, ids)
        return stacks, ids

    def _step_stack(self, stack: _Stack, mm: Callable) -> None:
        """The per-parameter step of `_step_per_parameter`, for a whole stack: the same operations, batched."""
        group, params = stack.group, stack.params
        beta1, beta2 = group["betas"]
        grads = torch.stack([p.grad.reshape(stack.shape) for p in params]).to(stack.exp_avg.dtype)
        for p in params:
            self.state[p]["step"] += 1
        step = self.state[params[0]]["step"]
        rotated = _rotate(grads, stack.q, back=False, mm=mm, stacked=True)
        stack.exp_avg.lerp_(rotated, 1.0 - beta1)
        rotated.mul_(rotated)
        stack.exp_avg_sq.lerp_(rotated, 1.0 - beta2)
        ratio = stack.exp_avg / stack.exp_avg_sq.sqrt().add_(group["eps"])
        update = _rotate(ratio, stack.q, back=True, mm=mm, stacked=True)
        lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step) if group["correct_bias"] else lr
        for p, u in zip(params, update):
            _apply(p, u.view(p.shape), size, decay if group["weight_decay"] > 0 else None)
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
        left, right = stack.gg
        if left is not None:
            left.lerp_(mm(grads, grads.mT), 1.0 - beta)
        if right is not None:
            right.lerp_(mm(grads.mT, grads), 1.0 - beta)
        if step % group["precondition_frequency"] == 0:
            self._refresh_stack(stack, mm)

    @staticmethod
    def _refresh_stack(stack: _Stack, mm: Callable) -> None:
        """`_refresh` for a stack: per factor one batched power iteration, sort and QR."""
        exp_avg = _rotate(stack.exp_avg, stack.q, back=True, mm=mm, stacked=True)
        exp_avg_sq = stack.exp_avg_sq
        bases = []
        for dim, (gg, q) in enumerate(zip(stack.gg, stack.q), start=1):
            if gg is None:
                bases.append(None)
                continue
            product = mm(gg, q)
            estimated = (q * product).sum(dim=1)
            order = torch.argsort(estimated, dim=1, descending=True)
            index = order[:, :, None] if dim == 1 else order[:, None, :]
            exp_avg_sq = torch.gather(exp_avg_sq, dim, index.expand_as(exp_avg_sq))
            product = torch.gather(product, 2, order[:, None, :].expand_as(product))
            bases.append(torch.linalg.qr(product)[0])
        stack.exp_avg_sq.copy_(exp_avg_sq)
        stack.exp_avg.copy_(_rotate(exp_avg, bases, back=False, mm=mm, stacked=True))
        for q, new in zip(stack.q, bases):
            if q is not None:
                q.copy_(new)

    def _step_per_parameter(self, mm: Callable, only: set[int] | None = None) -> None:
        """Each parameter with its own products (`only`: the ids of the parameters to step; None: all)."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params, grads, rotated_grads, exp_avgs, exp_avg_sqs, shapes = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None or (only is not None and id(p) not in only):
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
                rotated_grads.append(_rotate(grad.reshape(shape), state["Q"], back=False, mm=mm).reshape(grad.shape))
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
                update = _rotate(ratio.reshape(shape), state["Q"], back=True, mm=mm).reshape(p.shape)
                _apply(p, update, size, decay if group["weight_decay"] > 0 else None)
                self._accumulate(state, grad.reshape(shape), group, mm)
                if step % group["precondition_frequency"] == 0:
                    self._refresh(state, shape, mm)
