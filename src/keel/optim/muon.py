"""Muon for hidden weight matrices and AdamW for everything else, as one optimizer (torch's Muon and AdamW).

Muon (Jordan et al. 2024, github.com/KellerJordan/Muon) orthogonalises the momentum of a 2-D weight with
Newton-Schulz iterations: B_t = mu B_{t-1} + g_t; O_t = NS_5(g_t + mu B_t) (Nesterov);
p <- p (1 - lr wd) - lr sqrt(max(1, rows / cols)) O_t. It only applies to hidden matrices: embeddings, the output
head, biases and norm gains use AdamW, each with its own LR. This is the hybrid the Muon repository recommends
(`MuonWithAuxAdam`), built here on `torch.optim.Muon` and `torch.optim.AdamW` rather than rewritten.
`torch.optim.Muon` first shipped in torch 2.9; with an older torch, building it raises a KeelError saying so.
"""

from __future__ import annotations

import torch
from torch import nn

from keel.errors import KeelError
from keel.optim.closure import closure_loss
from keel.optim.torch_kernels import choose_kernels

__all__ = ["MUON_TORCH_VERSION", "MuonWithAdamW", "muon_missing", "muon_split"]

#: The first torch release with `torch.optim.Muon` (keel's floor is older).
MUON_TORCH_VERSION = "2.9"


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
    chosen for the parameters' devices (`keel.optim.torch_kernels`: the fused kernel on CPU). torch's Muon has
    one implementation.
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
    ) -> None:
        missing = muon_missing()
        if missing is not None:
            raise KeelError(f"MuonWithAdamW {missing}")
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

    @torch.no_grad()
    def step(self, closure=None):
        """One update: Muon's on the Muon groups, AdamW's on the others."""
        loss = closure_loss(closure)
        for inner, kind in ((self._muon, "muon"), (self._adamw, "adamw")):
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state
            if inner.param_groups:
                inner.step()
        return loss
