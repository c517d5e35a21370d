"""Ensembles: the average of the members' predicted distributions, scored against each member.

p_ens(y | x) = (1/M) sum_m p_m(y | x), so the ensemble's cross-entropy on a token is
-log p_ens = -(logsumexp_m log p_m(y | x) - log M). Only each member's log-probability of the target is needed,
so members are evaluated one after another and at most one is in memory (snapshot ensembles, Huang et al. 2017;
model ensembles of independent runs, e.g. Lakshminarayanan et al. 2017). A classifier's prediction is the argmax
of that mean distribution, ``argmax_y p_ens(y | x)`` (``predict``; its accuracy in ``evaluate_ensemble``): the
distributions are averaged first, then the most probable class is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
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
    return predictions(model, batches, device=device, autocast=autocast, ignore_index=ignore_index,
                       forward=forward).log_probs


@dataclass
class Predictions:
    """One model's predictions on every target of some batches: ``log_probs`` (log p(target), float64) and, for a
    classifier (logits ``(batch, classes)``), ``probs`` (the predicted distributions, float32, ``(targets,
    classes)``) and ``targets``; None for sequences, whose distributions are too large to keep."""

    log_probs: torch.Tensor
    probs: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def accuracy(self) -> float | None:
        """The share of targets whose most probable class is the target (classifiers; None otherwise)."""
        if self.probs is None:
            return None
        return float((self.probs.argmax(dim=-1) == self.targets).double().mean())


@torch.no_grad()
def predictions(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
    ignore_index: int = -1,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> Predictions:
    """``model``'s ``Predictions`` on every target of ``batches`` (see ``target_log_probs`` for the arguments)."""
    was_training = model.training
    model.eval()
    log_probs, probs, targets = [], [], []
    classifier = True
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else nullcontext():
                logits = model(x) if forward is None else forward(model, x)
            logp = F.log_softmax(logits.float(), dim=-1)
            keep = (y != ignore_index) & (y >= 0)
            picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            log_probs.append(picked[keep].double().cpu())
            classifier = classifier and logits.dim() == 2
            if classifier:
                probs.append(logp[keep].exp().cpu())
                targets.append(y[keep].cpu())
    finally:
        model.train(was_training)
    if not log_probs:
        raise KeelError("ensemble: the evaluation data holds no batches")
    if not classifier:
        return Predictions(torch.cat(log_probs))
    return Predictions(torch.cat(log_probs), torch.cat(probs), torch.cat(targets))


def ensemble_log_probs(member_log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' probabilities: logsumexp_m(log p_m) - log M."""
    if not member_log_probs:
        raise KeelError("ensemble: no members given; allowed: one or more")
    stacked = torch.stack(list(member_log_probs))
    return torch.logsumexp(stacked, dim=0) - math.log(stacked.shape[0])


def ensemble_accuracy(member_probs: Sequence[torch.Tensor], targets: torch.Tensor) -> float:
    """Accuracy of the ensemble: the argmax of the mean of the members' distributions, against ``targets``."""
    if not member_probs:
        raise KeelError("ensemble: no members given; allowed: one or more")
    mean = torch.stack(list(member_probs)).mean(dim=0)
    return float((mean.argmax(dim=-1) == targets).double().mean())


def _load(member: Member) -> nn.Module:
    return member if isinstance(member, nn.Module) else member()


@torch.no_grad()
def predict_proba(
    members: Sequence[Member],
    inputs: Any,
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ensemble's predicted distribution for ``inputs``: ``(1/M) sum_m softmax(logits_m)`` over the last
    dimension, float32. A member is a model or a function returning one (loaded one at a time); ``forward(model,
    inputs)`` returns the logits (default ``model(inputs)``)."""
    if not members:
        raise KeelError("ensemble: no members given; allowed: one or more")
    total = None
    for member in members:
        model = _load(member)
        was_training = model.training
        model.eval()
        try:
            x = inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
            with autocast() if autocast is not None else nullcontext():
                logits = model(x) if forward is None else forward(model, x)
        finally:
            model.train(was_training)
        probs = F.softmax(logits.float(), dim=-1)
        total = probs if total is None else total.add_(probs)
        del model
    return total.div_(len(members))


def predict(members: Sequence[Member], inputs: Any, **options: Any) -> torch.Tensor:
    """The ensemble's prediction for ``inputs``: the class (or token) with the highest mean probability,
    ``argmax_y (1/M) sum_m p_m(y | x)`` (the distributions are averaged first; not a vote, not the mean of the
    logits). ``options`` as for ``predict_proba``."""
    return predict_proba(members, inputs, **options).argmax(dim=-1)


def evaluate_ensemble(
    members: Sequence[Member],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    labels: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Cross-entropy (and for classifiers accuracy) of each member and of the ensemble on `batches`.

    The ensemble predicts the mean of the members' distributions. A member is a model or a function returning one
    (then only one member is loaded at a time). Returns `members` (label, loss), `ensemble_loss`,
    `best_member_loss`, `mean_member_loss` and `gain` (best member's loss minus the ensemble's; positive means the
    ensemble is better); for classifiers also `member_accuracy` (one per member), `ensemble_accuracy` (argmax of
    the mean distribution), `best_member_accuracy` and `accuracy_gain` (ensemble minus best member).
    """
    labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(members))]
    if len(labels) != len(members):
        raise KeelError(f"ensemble: {len(labels)} labels for {len(members)} members")
    per_member, losses, probs, accuracies, targets = [], [], [], [], None
    for member in members:
        model = _load(member)
        found = predictions(model, batches, device=device, autocast=autocast)
        if per_member and found.log_probs.shape != per_member[0].shape:
            raise KeelError("ensemble: members were scored on different numbers of tokens")
        per_member.append(found.log_probs)
        losses.append(float(-found.log_probs.mean()))
        if found.probs is not None:
            probs.append(found.probs)
            accuracies.append(found.accuracy())
            targets = found.targets
        del model
    ensemble = float(-ensemble_log_probs(per_member).mean())
    best = min(losses)
    result = {
        "members": list(zip(labels, losses)),
        "ensemble_loss": ensemble,
        "best_member_loss": best,
        "mean_member_loss": sum(losses) / len(losses),
        "gain": best - ensemble,
        "tokens": int(per_member[0].numel()),
    }
    if len(probs) == len(members):
        accuracy = ensemble_accuracy(probs, targets)
        result.update(member_accuracy=accuracies, ensemble_accuracy=accuracy,
                      best_member_accuracy=max(accuracies), accuracy_gain=accuracy - max(accuracies))
    return result
