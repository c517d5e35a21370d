"""Clip harder when instability persists with clipping (the Tuning Playbook, "gradient clipping").

The Playbook picks a clip threshold at the 90th percentile of the unclipped gradient norms, and goes on: "if we try
gradient clipping and the instability issues remain, we can try it harder (i.e. make the threshold smaller)", but
"extremely aggressive gradient clipping is in essence a strange way of reducing the learning rate ... we would
usually consider having >50% of the updates getting clipped somehow as extremely aggressive ... then we might as
well reduce the learning rate". The rule keel applies, for a run (or a probe) whose instability came while it
clipped:

- ``clip.mode: norm`` at threshold ``c``: the 90th percentile of the unclipped norms when it is below ``c``;
  otherwise (``c`` already at or below it) ``c / 2``; and when the new threshold would clip more than half of the
  updates, no tighter clip but a lower LR (``optimizer.lr / 2``);
- ``clip.mode: percentile`` at ``p``: 90 when ``p`` is above it, else halfway to the median, ``(p + 50) / 2``
  (90 -> 70 -> 60 -> 55); below 55 that would clip about half of the updates: a lower LR instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from keel.diagnose.findings import Finding

#: Clipping more than this share of the updates is "extremely aggressive" (the Playbook): lower the LR instead.
AGGRESSIVE = 0.5
PERCENTILE = 90.0


def _round(value: float) -> float:
    """Two significant digits: what a person would write in a config."""
    return float(f"{value:.2g}") if math.isfinite(value) and value != 0 else value


def tighter_threshold(norms: list[float], max_norm: float) -> tuple[float | None, str]:
    """The next threshold for ``clip.mode: norm`` (``None``: clipping harder would be extremely aggressive) and
    how it was chosen: ``p90`` or ``half``."""
    finite = np.asarray([n for n in norms if math.isfinite(n)], dtype=float)
    if not len(finite):
        return None, "no finite norm"
    p90 = _round(float(np.percentile(finite, PERCENTILE)))
    threshold, basis = (p90, "p90") if p90 < max_norm else (_round(max_norm / 2), "half")
    if float(np.mean(finite > threshold)) > AGGRESSIVE:
        return None, basis
    return threshold, basis


def tighter_percentile(percentile: float) -> float | None:
    """The next ``clip.percentile`` for ``clip.mode: percentile`` (``None``: at or near the median already)."""
    if percentile > PERCENTILE:
        return PERCENTILE
    tighter = (percentile + 50.0) / 2
    return tighter if tighter >= 55.0 else None


def clip_harder(clip: Any, norms: list[float], lr: float | None, events: list[dict[str, Any]]) -> Finding | None:
    """The ``clip_harder`` finding for instability ``events`` (each with its ``step``) that came while ``clip``
    (a ``ClipConfig``) was clipping, from the run's unclipped ``norms``; None when the clip mode has no such rule
    (``none``, ``value``, ``agc``) or there is no event."""
    if clip is None or clip.mode not in ("norm", "percentile") or not events:
        return None
    finite = [n for n in norms if math.isfinite(n)]
    evidence: dict[str, Any] = {"clip_mode": clip.mode, "events": events[:10], "first_event_step": events[0]["step"],
                                "updates": len(finite)}
    if finite:
        evidence.update({"median_norm": float(np.median(finite)), "p90": float(np.percentile(finite, PERCENTILE))})
    lower_lr = ({"optimizer.lr": _round(lr / 2)} if lr is not None and math.isfinite(lr) and lr > 0 else {})
    lr_text = f"optimizer.lr {lower_lr['optimizer.lr']}" if lower_lr else "a lower optimizer.lr"
    if clip.mode == "norm":
        threshold, basis = tighter_threshold(finite, clip.max_norm)
        now = f"clipping at max_norm {clip.max_norm:g}"
        evidence.update({"max_norm": clip.max_norm,
                         "clipped_fraction": float(np.mean(np.asarray(finite) > clip.max_norm)) if finite else None})
        if threshold is not None:
            evidence.update({"new_max_norm": threshold, "rule": basis})
            how = ("the 90th percentile of the unclipped norms" if basis == "p90" else
                   f"half the threshold: it is already at or below the 90th percentile, {evidence['p90']:.3g}")
            changes = {"clip.mode": "norm", "clip.max_norm": threshold}
            recommendation = f"clip harder (Tuning Playbook): clip.max_norm {threshold:g}, {how}"
        else:
            evidence["rule"] = f"{basis}: would clip over {AGGRESSIVE:.0%} of the updates"
            changes, recommendation = lower_lr, (
                f"a tighter clip would clip over half of the updates, 'a strange way of reducing the learning rate' "
                f"(Tuning Playbook): lower the LR instead, {lr_text}")
    else:
        tighter = tighter_percentile(clip.percentile)
        now = f"clipping at the {clip.percentile:g}th percentile of recent norms"
        evidence["percentile"] = clip.percentile
        if tighter is not None:
            evidence["new_percentile"] = tighter
            changes = {"clip.mode": "percentile", "clip.percentile": tighter}
            recommendation = f"clip harder (Tuning Playbook): clip.percentile {tighter:g}"
        else:
            changes, recommendation = lower_lr, (
                f"the percentile is near the median already: a tighter clip would clip over half of the updates; "
                f"lower the LR instead, {lr_text}")
    steps = ", ".join(str(e["step"]) for e in events[:6])
    return Finding("clip_harder", "warning", f"instability persists with {now}: {len(events)} event(s) while "
                   f"clipping (steps {steps})", evidence, recommendation, changes)


def clip_start(clip: Any, warmup_steps: int) -> int:
    """The first step ``clip`` clips at: after the warmup with ``start_after_warmup``, after the calibration
    updates in ``percentile`` mode."""
    start = warmup_steps if clip.start_after_warmup else 0
    return start + (clip.calibration_steps if clip.mode == "percentile" else 0)


def clipping_from(clip: Any, lrs: list[float], step_numbers: list[int]) -> int:
    """``clip_start`` for a run's records: its warmup's end read from the LRs it logged."""
    from keel.diagnose import signals

    warm = signals.warmup_end(lrs)
    return clip_start(clip, step_numbers[warm] if warm and step_numbers else 0)


def run_clip_harder(diagnosis: Any, lrs: list[float], step_numbers: list[int], norms: list[float],
                    config: Any) -> Finding | None:
    """``clip_harder`` for a run: the events of its ``instability_early`` and ``instability_sudden`` findings that
    came while its config clipped."""
    if config is None:
        return None
    start = clipping_from(config.clip, lrs, step_numbers)
    events = sorted((e for f in diagnosis.findings if f.kind in ("instability_early", "instability_sudden")
                     for e in f.evidence.get("events", []) if e["step"] >= start), key=lambda e: e["step"])
    lr = config.optimizer.lr
    return clip_harder(config.clip, norms, lr if isinstance(lr, (int, float)) else None, events)
