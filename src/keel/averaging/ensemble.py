"""Ensembles: the average of the members' predicted distributions, scored against each member.

p_ens(y | x) = (1/M) sum_m p_m(y | x), so the ensemble's cross-entropy on a token is
-log p_ens = -(logsumexp_m log p_m(y | x) - log M). Only each member's log-probability of the target is needed,
so members are evaluated one after another and at most one is in memory (snapshot ensembles, Huang et al. 2017;
model ensembles of independent runs, e.g. Lakshminarayanan et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import KeelError

Member = nn.Module | Callable[[], nn.Module]


@torch.no_grad()
def target_log_probs(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
    ignore_index: int = -1,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(target) under `model` for every target of `batches` of ``(inputs, targets)``, as float64.

    ``forward(model, inputs)`` returns the logits (default: ``model(inputs)``); targets below 0 (padding) are
    left out. Works for sequences (logits ``(batch, time, vocab)``) and classifiers (``(batch, classes)``)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else nullcontext():
                logits = model(x) if forward is None else forward(model, x)
            logp = F.log_softmax(logits.float(), dim=-1)
            keep = (y != ignore_index) & (y >= 0)
            picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            out.append(picked[keep].double().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise KeelError("ensemble: the evaluation data holds no batches")
    return torch.cat(out)


def ensemble_log_probs(member_log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' probabilities: logsumexp_m(log p_m) - log M."""
    if not member_log_probs:
        raise KeelError("ensemble: no members given; allowed: one or more")
    stacked = torch.stack(list(member_log_probs))
    return torch.logsumexp(stacked, dim=0) - math.log(stacked.shape[0])


def evaluate_ensemble(
    members: Sequence[Member],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    labels: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Cross-entropy of each member and of the ensemble (mean of the members' distributions) on `batches`.

    A member is a model or a function returning one (then only one member is loaded at a time). Returns
    `members` (label, loss), `ensemble_loss`, `best_member_loss`, `mean_member_loss` and `gain`
    (best member's loss minus the ensemble's; positive means the ensemble is better).
    """
    labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(members))]
    if len(labels) != len(members):
        raise KeelError(f"ensemble: {len(labels)} labels for {len(members)} members")
    per_member, losses = [], []
    for member in members:
        model = member if isinstance(member, nn.Module) else member()
        logp = target_log_probs(model, batches, device=device, autocast=autocast)
        if per_member and logp.shape != per_member[0].shape:
            raise KeelError("ensemble: members were scored on different numbers of tokens")
        per_member.append(logp)
        losses.append(float(-logp.mean()))
        del model
    ensemble = float(-ensemble_log_probs(per_member).mean())
    best = min(losses)
    return {
        "members": list(zip(labels, losses)),
        "ensemble_loss": ensemble,
        "best_member_loss": best,
        "mean_member_loss": sum(losses) / len(losses),
        "gain": best - ensemble,
        "tokens": int(per_member[0].numel()),
    }
