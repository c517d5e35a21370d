"""Muon for hidden weight matrices and AdamW for everything else, as one optimizer (torch's Muon and AdamW).

Muon (Jordan et al. 2024, github.com/KellerJordan/Muon) orthogonalises the momentum of a 2-D weight with
Newton-Schulz iterations: B_t = mu B_{t-1} + g_t; O_t = NS_5(g_t + mu B_t) (Nesterov);
p <- p (1 - lr wd) - lr sqrt(max(1, rows / cols)) O_t. It only applies to hidden matrices: embeddings, the output
head, biases and norm gains use AdamW, each with its own LR. This is the hybrid the Muon repository recommends
(`MuonWithAuxAdam`), built here on `torch.optim.Muon` and `torch.optim.AdamW` rather than rewritten.
`torch.optim.Muon` first shipped in torch 2.9; with an older torch, building it raises a KeelError saying so.

Two ways to run the Newton-Schulz iterations, the same update:

- **one matrix at a time** (`torch.optim.Muon` itself): in bfloat16, on every device; the path on the CPU.
- **batched** (`batched=True`, the default on CUDA): the matrices of one shape are stacked (a tall matrix
  transposed, so W (3072 x 768) and W (768 x 3072) share one stack) and orthogonalised by one chain of batched
  products, `ns_steps` x (A = X X^T; B = b A + c A A; X = a X + B X), each product a single `baddbmm` with its
  scale and sum in the same kernel, so the iteration makes no elementwise pass of its own; A = X X^T is computed
  once per iteration and serves both of its products. At GPT-2-small shapes the 48 hidden matrices become 3 stacks
  (768 x 768, 768 x 2304, 768 x 3072) instead of 48 chains of small products: one launch per product instead of
  48, and products large enough to fill a GPU. The stack's dtype is `ns_dtype` (bfloat16, as torch's; float32 for
  accuracy, with full float32 products on CUDA whatever the run's `tf32`). The same arithmetic as torch's, in
  another order: in bfloat16 the two paths' updates differ by rounding (`tests/optim/test_muon_batched.py` states
  the tolerance).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from keel.errors import KeelError
from keel.optim.closure import closure_loss
from keel.optim.torch_kernels import choose_kernels, plain_on_cuda
from keel.precision import cuda_tf32

__all__ = ["MAX_NS_STEPS", "MUON_TORCH_VERSION", "NS_DTYPES", "MuonWithAdamW", "muon_missing", "muon_split",
           "newton_schulz"]

#: The first torch release with `torch.optim.Muon` (keel's floor is older).
MUON_TORCH_VERSION = "2.9"
#: torch.optim.Muon refuses 100 or more Newton-Schulz steps ("for computational efficiency"); keel says so up front.
MAX_NS_STEPS = 99
#: The dtypes the batched Newton-Schulz iterations may run in.
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def muon_missing() -> str | None:
    """None if this torch has `torch.optim.Muon`; otherwise a sentence saying which torch version is needed."""
    if hasattr(torch.optim, "Muon"):
        return None
    return (
        f"needs torch >= {MUON_TORCH_VERSION} (torch.optim.Muon), but this is torch {torch.__version__}; "
        f"upgrade torch (pip install 'torch>={MUON_TORCH_VERSION}') or choose another optimizer"
    )

_ADAMW_KEYS = {
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}
_MUON_KEYS = {
    "momentum": 0.95,
    "nesterov": True,
    "ns_coefficients": (3.4445, -4.775, 2.0315),
    "eps": 1e-7,
    "ns_steps": 5,
    "adjust_lr_fn": None,
}

#: Parameter names that always go to AdamW even when 2-D: the output head and embeddings by name.
HEAD_PATTERNS = ("lm_head", "head", "embed", "wte", "wpe", "classifier", "output")


def muon_split(model: nn.Module):
    """A labeller `(name, param) -> "muon" | "adamw"`: Muon for 2-D hidden matrices, AdamW for the rest.

    AdamW gets parameters with fewer or more than 2 dimensions, parameters owned by an `nn.Embedding` (and
    any output head tied to one), and 2-D parameters whose name contains one of `HEAD_PATTERNS`.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}

    def label(name: str, p: torch.Tensor) -> str:
        parts = name.lower().split(".")
        named_head = any(pattern in part for part in parts[:-1] for pattern in HEAD_PATTERNS)
        if p.ndim != 2 or id(p) in embedding_ids or named_head:
            return "adamw"
        return "muon"

    return label


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on groups with `kind == "muon"`, AdamW on the others; one optimizer, one state_dict.

    Each group carries the settings of its own algorithm (`lr`, `weight_decay`, and Muon's `momentum`,
    `nesterov`, `ns_steps`, ... or AdamW's `betas`, `eps`). Steps delegate to `torch.optim.Muon` and
    `torch.optim.AdamW`, which operate on this optimizer's own group dicts and state.

    params: group dicts, each with `kind` ("muon" or "adamw"); tensors and groups without a kind are split by
    shape (2-D -> Muon, the rest -> AdamW), which cannot tell an embedding or output head from a hidden matrix:
    pass a model to `keel.optim.create("muon", model)` for that.

    `adam_fused` / `adam_foreach`: torch AdamW's `fused` / `foreach` for the AdamW groups; left null, they are
    chosen for the parameters' devices (`keel.optim.torch_kernels`: the fused kernel on CPU).

    `batched`: the Newton-Schulz iterations batched over matrices of one shape (true), or torch's Muon one matrix
    at a time (false); null: batched where every Muon parameter is a plain tensor on a CUDA device. `ns_dtype`:
    the dtype of the batched iterations ("bfloat16", as torch's, or "float32"; float32 needs the batched path).
    Both paths keep the same state (`momentum_buffer`), so a run may resume on either.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_weight_decay: float = 0.01,
        adam_fused: bool | None = None,
        adam_foreach: bool | None = None,
        batched: bool | None = None,
        ns_dtype: str = "bfloat16",
    ) -> None:
        missing = muon_missing()
        if missing is not None:
            raise KeelError(f"MuonWithAdamW {missing}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps <= MAX_NS_STEPS:
            raise ValueError(f"ns_steps must be an integer in [1, {MAX_NS_STEPS}], got {ns_steps!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")
        if batched not in (None, True, False):
            raise ValueError(f"batched must be true, false or null (auto), got {batched!r}")
        if batched is False and ns_dtype != "bfloat16":
            raise ValueError(f"ns_dtype {ns_dtype!r} needs the batched path (torch's Muon runs in bfloat16); got "
                             "batched false")
        self.batched = batched
        self.ns_dtype = ns_dtype
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        split = []
        for group in groups:  # groups without a kind: 2-D parameters to Muon, the rest to AdamW
            tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
            if "kind" in group:
                split.append(dict(group, params=tensors))
                continue
            split.append(dict(group, params=[p for p in tensors if p.ndim == 2], kind="muon"))
            split.append(dict(group, params=[p for p in tensors if p.ndim != 2], kind="adamw"))
        groups = split
        adam_params = [p for g in groups if g.get("kind", "muon") == "adamw" for p in g["params"]]
        kernels = choose_kernels(torch.optim.AdamW, adam_params, fused=adam_fused, foreach=adam_foreach)
        self._adam_kernels = kernels
        built = []
        for group in groups:
            group = dict(group)
            if not list(group["params"]):
                continue
            kind = group.setdefault("kind", "muon")
            if kind == "muon":
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon applies to 2-D parameters only; got shape {tuple(p.shape)}")
                settings = dict(_MUON_KEYS, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
                settings["adjust_lr_fn"] = adjust_lr_fn
                settings["weight_decay"] = weight_decay
            elif kind == "adamw":
                settings = dict(_ADAMW_KEYS, betas=tuple(adam_betas), eps=adam_eps) | kernels
                settings["weight_decay"] = adam_weight_decay
                # the AdamW groups follow the schedule at adam_lr / lr times the Muon LR
                ratio = adam_lr / lr if lr > 0 else 1.0
                group["lr_scale"] = group.get("lr_scale", 1.0) * ratio
                if "lr" in group:
                    group["lr"] = group["lr"] * ratio
                if group.get("weight_decay", None) == 0.0:
                    settings["weight_decay"] = 0.0
                group.pop("weight_decay", None)
            else:
                raise ValueError(f"group kind must be 'muon' or 'adamw', got {kind!r}")
            for k, v in settings.items():
                group.setdefault(k, v)
            built.append(group)
        super().__init__(built, {"lr": lr, "lr_scale": 1.0})
        self._muon = torch.optim.Muon([torch.zeros(1, 1, requires_grad=True)])
        self._adamw = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])

    def kernels(self) -> dict:
        """The implementation this optimizer runs, as chosen for its parameters (``keel.optim.chosen_kernels``)."""
        return {"batched": self.uses_batched(), "ns_dtype": self.ns_dtype,
                **{f"adam_{k}": v for k, v in self._adam_kernels.items()}}

    def uses_batched(self) -> bool:
        """Whether the Muon groups step through the batched Newton-Schulz path (see `batched`)."""
        if self.batched is not None:
            return self.batched
        if self.ns_dtype != "bfloat16":
            return True
        return plain_on_cuda([p for g in self.param_groups if g["kind"] == "muon" for p in g["params"]])

    @torch.no_grad()
    def step(self, closure=None):
        """One update: Muon's on the Muon groups, AdamW's on the others."""
        loss = closure_loss(closure)
        batched = self.uses_batched()
        for inner, kind in ((self._muon, "muon"), (self._adamw, "adamw")):
            groups = [g for g in self.param_groups if g["kind"] == kind]
            if not groups:
                continue
            if kind == "muon" and batched:
                self._step_batched(groups)
                continue
            inner.param_groups = groups
            inner.state = self.state
            inner.step()
        return loss

    def _step_batched(self, groups: list[dict]) -> None:
        """Muon's update with the Newton-Schulz iterations batched over matrices of one shape.

        Per group, as torch's Muon: B <- B + (1 - mu)(g - B) (`lerp`), the Nesterov input g + mu (B - g); the
        inputs of every group are stacked by (shape with rows <= cols, device, NS settings) in `ns_dtype`,
        orthogonalised together, and applied per matrix: p <- p (1 - lr wd), then p <- p - lr_adjusted O.
        """
        dtype = NS_DTYPES[self.ns_dtype]
        stacks: dict[tuple, list[tuple[torch.Tensor, dict, torch.Tensor, bool]]] = {}
        for group in groups:
            params, grads, buffers = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                buffers.append(state["momentum_buffer"])
            if not params:
                continue
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            settings = (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"])
            for p, grad, buffer in zip(params, grads, buffers):
                rows, cols = p.shape
                transposed = rows > cols
                key = ((cols, rows) if transposed else (rows, cols), p.device, settings)
                stacks.setdefault(key, []).append((p, group, grad, buffer, transposed))
        for ((rows, cols), device, (coefficients, steps, eps)), members in stacks.items():
            stack = torch.empty((len(members), rows, cols), dtype=dtype, device=device)
            for i, (_, group, grad, buffer, transposed) in enumerate(members):
                into = stack[i].mT if transposed else stack[i]
                if group["nesterov"]:  # g + mu (B - g), computed in float32 and rounded once into the stack
                    torch.lerp(grad, buffer, group["momentum"], out=into)
                else:
                    into.copy_(buffer)
            # float32 is asked for accuracy: full float32 products on CUDA too, whatever the run's `tf32` says
            with cuda_tf32(False) if dtype == torch.float32 else contextlib.nullcontext():
                orthogonal = newton_schulz(stack, coefficients, steps, eps)
            for i, (p, group, _, _, transposed) in enumerate(members):
                lr, weight_decay = group["lr"], group["weight_decay"]
                update = orthogonal[i].mT if transposed else orthogonal[i]
                p.mul_(1 - lr * weight_decay)
                p.add_(update, alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def newton_schulz(
    stack: torch.Tensor,
    coefficients: tuple[float, float, float] = _MUON_KEYS["ns_coefficients"],
    steps: int = 5,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Orthogonalise each matrix of `stack` (..., rows, cols; rows <= cols) by `steps` quintic Newton-Schulz
    iterations, in the stack's dtype: X <- X / max(||X||_F, eps); then X <- a X + (b A + c A^2) X, A = X X^T.

    Jordan et al. 2024 (the coefficients (3.4445, -4.775, 2.0315) make the iteration's slope at 0 large, so small
    singular values grow fast; the result is U S' V^T with S' in about [0.7, 1.2], not exactly U V^T). The same
    iteration as `torch.optim.Muon`'s, batched: each product is one `baddbmm` over the whole stack.
    """
    if stack.shape[-2] > stack.shape[-1]:
        raise ValueError(f"newton_schulz takes rows <= cols (transpose tall matrices); got {tuple(stack.shape)}")
    a, b, c = coefficients
    shape = stack.shape
    x = stack.reshape(-1, shape[-2], shape[-1])
    norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / norms.clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return x.reshape(shape)


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's LR for a matrix of `shape`: lr sqrt(max(1, rows / cols)) (original), lr 0.2 sqrt(max(rows, cols))
    (match_rms_adamw), as `torch.optim.Muon`."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr
