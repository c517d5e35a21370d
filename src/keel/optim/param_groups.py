"""Parameter groups: no weight decay on biases, norms and embeddings, LR multipliers, layer-wise LR decay, freezing
(for good, or until a step: `unfreeze`).

Every helper here reads a model's parameter names and modules and returns plain torch param-group dicts
(`{"params": [...], "param_names": [...], "weight_decay": ..., "lr_scale": ...}`) that any
`torch.optim.Optimizer` accepts. `lr_scale` is keel's per-group LR multiplier:
`keel.schedules.set_lr(optimizer, lr)` sets `group["lr"] = lr * group["lr_scale"]`.

Depth (for layer-wise LR decay and freezing by depth): the first integer component of a parameter's name is its
block index (`blocks.3.attn.weight` -> block 3, depth 4). Parameters named before the first block (embeddings) have
depth 0, those after the last block (final norm, output head) depth `num_blocks + 1`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from keel.errors import KeelError

__all__ = [
    "NO_DECAY_DEFAULT",
    "PARAM_CATEGORIES",
    "build_param_groups",
    "freeze",
    "layer_depths",
    "parameter_categories",
    "unfreeze",
]

#: Parameters that get no weight decay unless configured otherwise.
NO_DECAY_DEFAULT: tuple[str, ...] = ("bias", "norm", "embedding")
#: The categories `parameter_categories` assigns; `no_decay` entries are these or name patterns.
PARAM_CATEGORIES: tuple[str, ...] = ("bias", "norm", "embedding", "1d")

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
    batch_norms = (nn.modules.batchnorm._NormBase,)
    return isinstance(module, norm_types + batch_norms) or "norm" in type(module).__name__.lower()


def parameter_categories(model: nn.Module) -> dict[str, set[str]]:
    """Map each trainable parameter name to its categories: `bias`, `norm`, `embedding`, `1d`.

    `bias`: the name ends in `bias`; `norm`: owned by a normalisation module (LayerNorm, RMSNorm, BatchNorm,
    GroupNorm, or any module whose class name contains "Norm"); `embedding`: owned by an `nn.Embedding` (a weight
    tied to an output head counts as an embedding); `1d`: fewer than two dimensions.
    """
    owners: dict[int, set[str]] = {}
    for module in model.modules():
        kind = "embedding" if isinstance(module, nn.Embedding) else "norm" if _is_norm(module) else None
        if kind is None:
            continue
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(kind)
    categories = {}
    for name, p in model.named_parameters():
        cats = set(owners.get(id(p), ()))
        if name.rsplit(".", 1)[-1].endswith("bias"):
            cats.add("bias")
        if p.ndim < 2:
            cats.add("1d")
        categories[name] = cats
    return categories


def layer_depths(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """Depth of each parameter name and the number of blocks.

    Block `i` (the first integer component of the name) has depth `i + 1`; names without one have depth 0 if
    they come before the first block in registration order (embeddings), else `num_blocks + 1` (final norm, head).
    """
    indices = {}
    for name in names:
        match = _BLOCK_INDEX.search(name)
        indices[name] = int(match.group(1)) if match else None
    found = [i for i in indices.values() if i is not None]
    num_blocks = max(found) + 1 if found else 0
    depths, seen_block = {}, False
    for name in names:
        i = indices[name]
        if i is not None:
            seen_block = True
            depths[name] = i + 1
        else:
            depths[name] = num_blocks + 1 if seen_block else 0
    return depths, num_blocks


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*{pattern}*")


def freeze(
    model: nn.Module, patterns: Iterable[str] = (), depth: int = 0, *, key: str = "freeze"
) -> list[str]:
    """Freeze parameters (`requires_grad = False`) by name pattern or by depth; returns the frozen names.

    A pattern is an fnmatch glob, also matched anywhere in the name (`"embed"` matches `tok_embed.weight`).
    `depth=k` freezes every parameter of depth < k: `1` the embeddings, `3` the embeddings and blocks 0 and 1.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [n for n, _ in model.named_parameters()]
    depths, num_blocks = layer_depths(names)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise KeelError(f"{key}_depth: {depth!r} is not a depth; allowed: an integer >= 0")
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            raise KeelError(f"{key}: pattern {pattern!r} matches no parameter; names look like {names[:3]}")
    frozen = []
    for name, p in model.named_parameters():
        if depths[name] < depth or any(_matches(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    no_decay: Iterable[str] = NO_DECAY_DEFAULT,
    lr_scales: Mapping[str, float] | None = None,
    layer_lr_decay: float | None = None,
    freeze_patterns: Iterable[str] = (),
    freeze_depth: int = 0,
    depth_fn: Callable[[Sequence[str]], tuple[dict[str, int], int]] = layer_depths,
    split: Callable[[str, torch.Tensor], str] | None = None,
    unfreeze_at: int | None = None,
) -> list[dict]:
    """Param groups for `model`: weight decay except on `no_decay`, LR multipliers, layer decay, freezing.

    - `no_decay`: categories (`bias`, `norm`, `embedding`, `1d`) or name patterns whose parameters get
      `weight_decay = 0`; `()` decays everything.
    - `lr_scales`: `{name pattern: multiplier}`; the last matching pattern wins.
    - `layer_lr_decay`: `d` in (0, 1] multiplies the LR of a parameter at depth `k` by `d ** (num_blocks + 1 - k)`
      (BEiT / ELECTRA layer-wise LR decay: the head trains at the full LR, each block below at `d` times the one
      above); combined multiplicatively with `lr_scales`.
    - `freeze_patterns`, `freeze_depth`: see `freeze`; frozen parameters join no group.
    - `split(name, param) -> str`: an optional extra label (e.g. Muon vs AdamW); it is stored as `group["kind"]`.
    - `unfreeze_at`: the frozen parameters join groups of their own, with the settings their group would have and
      `group["unfreeze_at"] = unfreeze_at` (a step), still frozen: `unfreeze(optimizer, step)` lets them train
      from that step on.

    Parameters that already have `requires_grad=False` are left out. Groups with equal settings are merged, in
    the order their first parameter appears in `model.named_parameters()`.
    """
    no_decay = [no_decay] if isinstance(no_decay, str) else list(no_decay)
    frozen = set(freeze(model, freeze_patterns, freeze_depth)) if unfreeze_at is not None else set()
    if unfreeze_at is None:
        freeze(model, freeze_patterns, freeze_depth)
    categories = parameter_categories(model)
    names = [n for n, _ in model.named_parameters()]
    for pattern in lr_scales or {}:
        if not any(_matches(n, pattern) for n in names):
            raise KeelError(f"lr_scales: pattern {pattern!r} matches no parameter; names look like {names[:3]}")
    depths, num_blocks = depth_fn(names)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and name not in frozen:
            continue
        decays = not any(entry in categories[name] or _matches(name, entry) for entry in no_decay)
        scale = 1.0
        for pattern, value in (lr_scales or {}).items():
            if _matches(name, pattern):
                scale = float(value)
        if layer_lr_decay is not None:
            scale *= float(layer_lr_decay) ** (num_blocks + 1 - depths[name])
        kind = split(name, p) if split is not None else None
        group_key = (kind, decays, scale, name in frozen)
        if group_key not in groups:
            group = {"params": [], "param_names": [], "weight_decay": weight_decay if decays else 0.0}
            group["lr_scale"] = scale
            if kind is not None:
                group["kind"] = kind
            if name in frozen:
                group["unfreeze_at"] = int(unfreeze_at)
            groups[group_key] = group
        groups[group_key]["params"].append(p)
        groups[group_key]["param_names"].append(name)
    if not any("unfreeze_at" not in g for g in groups.values()):
        raise KeelError("model: no trainable parameters (all are frozen or the model has none)")
    return list(groups.values())


def unfreeze(optimizer: torch.optim.Optimizer, step: int) -> int:
    """Let the parameters of groups with an ``unfreeze_at`` step train from that step on: ``requires_grad`` is
    ``step >= unfreeze_at`` (``step``: updates already applied). Returns how many parameters changed.

    Train a new head on frozen features, then fine-tune the whole network, in one run: until ``unfreeze_at`` the
    frozen parameters get no gradient, so no update, no weight decay and no optimizer state (keel's and torch's
    optimizers skip parameters without a gradient); from then on they train with their group's settings (LR scale,
    weight decay, optimizer), their optimizer state starting there. Call it before each forward pass, and after a
    resume (the step decides, so a resumed run freezes exactly as the uninterrupted one did).
    """
    changed = 0
    for group in optimizer.param_groups:
        at = group.get("unfreeze_at")
        if at is None:
            continue
        trainable = step >= at
        for p in group["params"]:
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)
                changed += 1
    return changed
