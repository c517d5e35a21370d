"""``keel diagnose RUN_DIR``: read a finished or running run and report what its curves say.

Four readings, each a function of the run's records (``keel.rundir.metrics.read_metrics``) and its config
(``keel.rundir.read_run_config``):

- learning curves (the training-dynamics notes' step 6 and CS231n's "babysitting the learning process"): too slow
  a fall (LR too low), a fast fall then a plateau (LR too high, add decay), a kink where the LR decays while the
  loss was still falling (decay too early), training improving while validation worsens (overfitting), both
  close and poor against a trivial baseline (underfitting), both still improving at the end (train longer);
- gradient norms: the Tuning Playbook's clip threshold at the 90th percentile of the unclipped norms, and a warning
  when more than half of the updates were clipped;
- update-to-weight ratios per weight (healthy around 1e-3), when the run logged them (``diagnostics``);
- instability events: loss spikes (logged by the spike detector, or found here with the same rule), skipped
  updates and rollbacks, early (during warmup or the first tenth of the run) or sudden (later).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from keel import rundir
from keel.diagnose import signals
from keel.diagnose.clipping import clipping_from, run_clip_harder
from keel.diagnose.findings import Diagnosis, Finding
from keel.diagnose.update_ratio import HEALTHY_RATIO, RECORD_TYPE
from keel.errors import KeelError
from keel.rundir.metrics import read_metrics

MIN_STEPS = 20  # step records for the learning-curve reading
MIN_EVALS = 3  # evaluations for over/underfitting and "train longer"
MIN_NORMS = 10  # gradient norms for the clip threshold


class RunRecords:
    """A run's records split by kind, with the series the readings use. A record whose step or values are not
    numbers (a log edited by hand, or written by another program) is a KeelError naming the record."""

    def __init__(self, records: list[dict[str, Any]]):
        _check_numbers(records)
        self.records = records
        self.steps = [r for r in records if r.get("kind") == "step" and "loss" in r and "step" in r]
        self.evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
        self.events = [r for r in records if r.get("kind") == "event"]
        self.ratios = [r for r in records if r.get("kind") == "diagnostic" and r.get("diagnostic") == RECORD_TYPE]
        self.step_numbers = [int(r["step"]) for r in self.steps]
        self.losses = [float(r["loss"]) for r in self.steps]
        self.lrs = [float(r.get("lr", math.nan)) for r in self.steps]
        self.norms = [float(r["grad_norm"]) for r in self.steps if "grad_norm" in r]


def _check_numbers(records: list[dict[str, Any]]) -> None:
    for number, record in enumerate(records, start=1):
        kind = record.get("kind")
        if kind not in ("step", "eval", "event", "diagnostic"):
            continue
        keys = ["step"]
        if kind == "step":
            keys += [key for key in ("loss", "lr", "grad_norm", "tokens") if key in record]
        elif kind == "eval":
            keys += [key for key in record if key.startswith(("val_", "train_eval_"))]
        for key in keys:
            value = record.get(key)
            if key == "step" and kind != "step" and value is None:
                continue
            if not _is_number(value, integral=key in ("step", "tokens")):
                raise KeelError(f"metrics record {number} ({kind}): {key} is {_shown(value)}; allowed: "
                                f"{'a whole number' if key in ('step', 'tokens') else 'a number'} (a log keel "
                                "train wrote)")
        ratios = record.get("ratios")
        if kind == "diagnostic" and ratios is not None and not (
                isinstance(ratios, dict) and all(_is_number(v) for v in ratios.values())):
            raise KeelError(f"metrics record {number} (diagnostic): ratios is {_shown(ratios)}; allowed: a mapping "
                            "of weight names to numbers (a log keel train wrote)")


def _is_number(value: Any, integral: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= 2**53 or not integral and abs(value) < 1e308
    return not integral or (math.isfinite(value) and value.is_integer() and abs(value) <= 2**53)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_run(run_dir: str | Path, report=lambda message: None) -> tuple[RunRecords, dict[str, Any] | None]:
    """The run's records and its raw config (None when it has none); KeelError when there are no metrics."""
    from keel.config import load_yaml
    from keel.diagnose.readers import read_other_run

    run_dir = Path(run_dir)
    other = read_other_run(run_dir, report)  # a Lightning log or an HF trainer_state.json: keel's records, no config
    if other is not None:
        return RunRecords(other), None
    if not run_dir.is_dir():
        raise KeelError(f"RUN_DIR '{run_dir}' does not exist; allowed: a keel run directory, a Lightning log "
                        "directory or a Hugging Face trainer_state.json")
    path = run_dir / rundir.METRICS
    if not path.is_file():
        raise KeelError(f"'{run_dir}' has no {rundir.METRICS}; allowed: a keel run directory (keel train writes "
                        f"{rundir.METRICS} from its first step), a Lightning log directory (metrics.csv or TensorBoard "
                        "event files) or a Hugging Face output directory (trainer_state.json)")
    try:
        records = RunRecords(read_metrics(path))
    except KeelError as error:
        raise KeelError(f"'{path}': {error}") from None
    if not records.steps:
        raise KeelError(f"'{path}' holds no training step yet; allowed: a run that has logged at least one step")
    try:
        text = rundir.read_run_config(run_dir, report=report)
    except KeelError as error:  # a damaged config: the curves can still be read
        report(f"the run's config is not used: {error}")
        text = None
    raw = None
    if text is not None:
        try:
            raw = load_yaml(text)
        except Exception:  # a damaged config: the curves can still be read
            raw = None
    return records, raw if isinstance(raw, dict) else None


def diagnose_run(run_dir: str | Path, report=lambda message: None) -> tuple[Diagnosis, dict[str, Any] | None]:
    """Every reading of the run in ``run_dir``; returns the diagnosis and the run's raw config."""
    records, raw = load_run(run_dir, report)
    config = _config(raw)
    diagnosis = Diagnosis("run", str(run_dir))
    baseline = _baseline(config)
    planned = config.max_steps if config is not None else None
    context = {"planned_steps": planned, "last_step": records.step_numbers[-1], "baseline": baseline,
               "config": config}
    diagnosis.data["run"] = {"planned_steps": planned, "last_step": records.step_numbers[-1],
                             "baseline": baseline[1] if baseline else None,
                             "baseline_name": baseline[0] if baseline else None}
    learning_curves(diagnosis, records, context)
    evaluations(diagnosis, records, context)
    gradient_norms(diagnosis, records, context)
    update_ratios(diagnosis, records, context)
    instability_events(diagnosis, records, context)
    diagnosis.add(run_clip_harder(diagnosis, records.lrs, records.step_numbers, records.norms, config))
    return diagnosis, raw


def write_plots(run_dir: str | Path, records: RunRecords, raw: dict[str, Any] | None) -> list[Path]:
    """The Playbook's default outputs beside the run: ``grad_norm.png`` (unclipped norm against step and its
    histogram over all steps) and, when logged, ``update_ratio.png``. Returns the files written."""
    from keel.diagnose import plots

    run_dir = Path(run_dir)
    written = []
    steps = [s for s, r in zip(records.step_numbers, records.steps) if "grad_norm" in r]
    if len(signals.finite(records.norms)) >= MIN_NORMS:
        threshold = clip_threshold(raw)
        clipped = [bool(r.get("clipped")) for r in records.steps if "grad_norm" in r]
        png = plots.grad_norm_figure(steps, records.norms, clipped, signals.percentile(records.norms, 90),
                                     threshold, run_dir.name or str(run_dir))
        _write_bytes(run_dir / rundir.GRAD_NORM_PLOT, png)
        written.append(run_dir / rundir.GRAD_NORM_PLOT)
    if records.ratios:
        _write_bytes(run_dir / rundir.UPDATE_RATIO_PLOT, plots.update_ratio_figure(records.ratios, run_dir.name))
        written.append(run_dir / rundir.UPDATE_RATIO_PLOT)
    return written


def clip_threshold(raw: dict[str, Any] | None) -> float | None:
    """The run's gradient-norm clip threshold from its raw config (None without norm clipping, or where the config,
    edited by hand, does not say it as a number)."""
    clip = (raw or {}).get("clip")
    clip = clip if isinstance(clip, dict) else {}
    threshold = clip.get("max_norm") if clip.get("mode", "norm") == "norm" else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return None
    return float(threshold)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a reader never sees half an image."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- context


def _config(raw: dict[str, Any] | None):
    if raw is None:
        return None
    from keel.config import validate

    try:
        return validate(raw)
    except KeelError:
        return None


def _baseline(config) -> tuple[str, float] | None:
    """The trivial baseline a loss is compared with: the task's reference metric (``unigram_baseline`` of a
    language model), else ln(C) for C classes. None when the task cannot be rebuilt."""
    if config is None:
        return None
    from keel import tasks

    try:
        task = tasks.from_config(config)
        reference = task.reference_metrics()
    except Exception:  # noqa: BLE001 - the data may be gone or the task not importable: no baseline then
        return None
    for name, value in reference.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            return name, float(value)
    expected = tasks.expected_initial_loss(task)
    return ("ln(num_classes)", float(expected)) if expected is not None else None


def _early_limit(records: RunRecords, planned: int | None) -> int:
    """Steps that count as "early" (at initialisation): the warmup, or the first tenth of the run, at least 10."""
    warm = signals.warmup_end(records.lrs)
    warm_step = records.step_numbers[warm] if warm < len(records.step_numbers) else 0
    length = planned or (records.step_numbers[-1] + 1)
    return max(10, warm_step, int(0.1 * length))


# ---------------------------------------------------------------------------------------------- readings


def learning_curves(diagnosis: Diagnosis, records: RunRecords, context: dict[str, Any]) -> None:
    """Shape of the training loss: too slow, fast then flat, a kink at an LR drop; or no fall at all."""
    n = len(records.losses)
    if n < MIN_STEPS:
        diagnosis.skip("learning curves", f"the run has {n} step records", f"at least {MIN_STEPS}")
        return
    losses = np.asarray(records.losses, dtype=float)
    steps = records.step_numbers
    if not np.isfinite(losses).all():
        losses = np.where(np.isfinite(losses), losses, np.nan)
        keep = np.isfinite(losses)
        losses, steps = losses[keep], [s for s, k in zip(steps, keep) if k]
        n = len(losses)
        if n < MIN_STEPS:
            diagnosis.skip("learning curves", f"the run has {n} finite losses", f"at least {MIN_STEPS}")
            return
    width = max(3, n // 20)
    start = signals.level(losses, 0.0, max(3, n // 50))
    at20 = signals.level(losses, 0.2, width)
    at50 = signals.level(losses, 0.5, width)
    at80 = signals.level(losses, 0.8, width)
    end = signals.level(losses, 1.0, max(3, n // 10))
    s20, s50, s80 = (steps[int(round(f * (n - 1)))] for f in (0.2, 0.5, 0.8))
    drop = start - end
    config = context["config"]
    lr_values = [lr for lr in records.lrs if math.isfinite(lr)]
    peak_lr = max(lr_values) if lr_values else math.nan
    evidence = {"first_step": steps[0], "loss_first": start, "step_20pct": s20, "loss_20pct": at20,
                "step_80pct": s80, "loss_80pct": at80, "last_step": steps[-1], "loss_last": end}
    noise = signals.noise_scale(losses, max(3, min(10, n // 20)))
    if drop <= max(2 * noise / math.sqrt(max(1, n // 10)), 0.01 * abs(start)):
        diagnosis.add(Finding(
            "loss_not_falling", "error",
            f"the training loss did not fall: {start:.4f} at step {steps[0]}, {end:.4f} at step {steps[-1]}",
            evidence, "check the LR and the model: `keel diagnose --config CONFIG` runs the sanity checks (initial "
            "loss, overfitting one batch) and sweeps the LR"))
        return
    first_fifth = (start - at20) / drop
    last_fifth = (at80 - end) / drop
    second_half = (at50 - end) / drop
    warm = signals.warmup_end(records.lrs)
    lr_late = signals.level(records.lrs, 1.0, max(3, n // 10)) if lr_values else math.nan
    evidence_shape = {**evidence, "fraction_of_fall_in_first_20pct": first_fifth,
                      "fraction_of_fall_in_last_20pct": last_fifth, "peak_lr": peak_lr, "lr_last": lr_late}
    lr_now = config.optimizer.lr if config is not None else None
    if first_fifth < 0.35 and last_fifth >= 0.15 and warm < 0.2 * n:
        changes = {"optimizer.lr": _round(float(lr_now) * 3)} if isinstance(lr_now, (int, float)) else {}
        diagnosis.add(Finding(
            "lr_too_low", "warning",
            f"the loss falls slowly and almost linearly: {first_fifth:.0%} of its fall came in the first 20% of the "
            f"steps and {last_fifth:.0%} in the last 20% (a well-set LR gives most of the fall early)",
            evidence_shape, "raise the learning rate (about 3x: optimizer.lr "
            f"{_round(float(lr_now) * 3) if isinstance(lr_now, (int, float)) else '3x'}), or sweep it with "
            "`keel diagnose --config`", changes))
    elif first_fifth > 0.85 and second_half < 0.05 and math.isfinite(lr_late) and lr_late >= 0.5 * peak_lr:
        constant = config is not None and config.schedule.get("name") == "constant"
        if constant:
            warmup = config.schedule.get("warmup", 0) or 0
            changes = {"schedule": {"name": "cosine", "warmup": warmup, "min_lr": _round(peak_lr / 10)}}
            advice = "add a decay: schedule cosine to a tenth of the peak LR, or lower the LR"
        else:
            changes = {"optimizer.lr": _round(float(lr_now) / 3)} if isinstance(lr_now, (int, float)) else {}
            advice = "lower the LR (about 3x) or decay it earlier"
        diagnosis.add(Finding(
            "lr_too_high_plateau", "warning",
            f"the loss fell fast ({first_fifth:.0%} of its fall in the first 20% of the steps) then stayed flat "
            f"({second_half:.0%} in the second half) while the LR stayed at {lr_late:.3g} (peak {peak_lr:.3g})",
            evidence_shape, advice, changes))
    for index in signals.lr_drops(records.lrs, after=warm)[:3]:
        _kink(diagnosis, records, index)


def _kink(diagnosis: Diagnosis, records: RunRecords, index: int) -> None:
    """A sharp fall of the loss right where the LR drops, while the loss was still falling before it."""
    losses, steps, lrs = records.losses, records.step_numbers, records.lrs
    n = len(losses)
    window = max(5, n // 20)
    if index < 2 * window or index + window > n:
        return
    before = float(np.median(losses[index - window:index]))
    earlier = float(np.median(losses[index - 2 * window:index - window]))
    after = float(np.median(losses[index + window // 2:index + window]))
    noise = signals.noise_scale(losses, 5) / math.sqrt(window)
    trend = earlier - before  # fall over one window before the LR drop
    fall = before - after
    if fall > 3 * max(trend, 0) and fall > 3 * noise and fall > 0.01 * abs(before) and trend > 2 * noise:
        step = steps[index]
        diagnosis.add(Finding(
            "decay_too_early", "warning",
            f"a kink: the loss fell by {fall:.4f} right after the LR dropped from {lrs[index - 1]:.3g} to "
            f"{lrs[index]:.3g} at step {step}, while it was still falling by {trend:.4f} per {window} steps before",
            {"decay_step": step, "lr_before": lrs[index - 1], "lr_after": lrs[index],
             "loss_before": before, "loss_after": after, "fall_per_window_before": trend, "window_steps": window},
            f"decay later: the loss was still improving at the higher LR, so the decay at step {step} came too "
            f"early; move it later (for instance to step {2 * step}) or use a schedule that holds the peak longer "
            "(wsd, cosine)"))


def evaluations(diagnosis: Diagnosis, records: RunRecords, context: dict[str, Any]) -> None:
    """Validation against the fixed training slice: overfitting, underfitting, still improving."""
    evals = [r for r in records.evals if math.isfinite(r.get("val_loss", math.nan))]
    if len(evals) < MIN_EVALS:
        diagnosis.skip("over/underfitting", f"the run has {len(evals)} evaluations", f"at least {MIN_EVALS}")
        return
    val = np.array([r["val_loss"] for r in evals])
    train = np.array([r.get("train_eval_loss", math.nan) for r in evals])
    steps = [int(r["step"]) for r in evals]
    best = int(np.argmin(val))
    last = len(val) - 1
    tol = max(0.01 * abs(val[best]), 2e-3)
    accuracy = {k: evals[last][k] for k in evals[last] if "accuracy" in k}
    if best < last and val[last] - val[best] > tol and np.isfinite(train).all() and train[last] < train[best] - tol / 2:
        diagnosis.add(Finding(
            "overfitting", "warning",
            f"validation loss rose from {val[best]:.4f} (step {steps[best]}) to {val[last]:.4f} (step {steps[last]}) "
            f"while the training-slice loss kept falling ({train[best]:.4f} -> {train[last]:.4f})",
            {"best_step": steps[best], "best_val_loss": float(val[best]), "last_step": steps[last],
             "last_val_loss": float(val[last]), "train_eval_loss_at_best": float(train[best]),
             "train_eval_loss_last": float(train[last]), **accuracy},
            f"keep the weights of step {steps[best]} (early_stopping.patience stops there and restores them); "
            "regularise more (weight decay, dropout) or train on more data",
            {"early_stopping.patience": 3}))
        return
    baseline = context["baseline"]
    gap = float(val[last] - train[last]) if np.isfinite(train[last]) else math.nan
    if baseline is not None and math.isfinite(gap) and abs(gap) <= 0.05 * abs(val[last]) and (
            val[last] >= 0.9 * baseline[1]):
        diagnosis.add(Finding(
            "underfitting", "warning",
            f"validation ({val[last]:.4f}) and training-slice ({train[last]:.4f}) losses are close and both near the "
            f"trivial baseline {baseline[0]} = {baseline[1]:.4f}",
            {"step": steps[last], "val_loss": float(val[last]), "train_eval_loss": float(train[last]),
             "gap": gap, baseline[0]: baseline[1], **accuracy},
            "the model fits the training data no better than the validation data: give it more capacity (width, "
            "depth), train longer or at a higher LR, and regularise less (weight decay, dropout)"))
    planned = context["planned_steps"]
    finished = planned is not None and records.step_numbers[-1] + 1 >= planned
    earlier = int(np.searchsorted(steps, 0.75 * steps[last]))
    earlier = min(earlier, last - 1)
    improved_val = val[earlier] - val[last]
    improved_train = train[earlier] - train[last] if np.isfinite(train).all() else improved_val
    if finished and best == last and improved_val > max(0.005 * abs(val[last]), tol / 2) and improved_train > 0:
        changes = {"max_steps": 2 * planned} if planned else {}
        diagnosis.add(Finding(
            "train_longer", "info",
            f"both losses were still improving at the end: validation {val[earlier]:.4f} -> {val[last]:.4f} and "
            f"training slice {train[earlier]:.4f} -> {train[last]:.4f} from step {steps[earlier]} to {steps[last]}",
            {"from_step": steps[earlier], "to_step": steps[last], "val_loss_from": float(val[earlier]),
             "val_loss_to": float(val[last]), "train_eval_loss_from": float(train[earlier]),
             "train_eval_loss_to": float(train[last]), **accuracy},
            f"train longer: max_steps {2 * planned if planned else '2x'} (or `keel train --resume RUN max_steps=... "
            "resume_policy=new_decay` to continue this run)", changes))


def gradient_norms(diagnosis: Diagnosis, records: RunRecords, context: dict[str, Any]) -> None:
    """The Playbook's clip threshold (90th percentile of unclipped norms) and how often the run clipped."""
    norms = signals.finite(records.norms)
    if len(norms) < MIN_NORMS:
        diagnosis.skip("gradient norms", f"the run has {len(norms)} finite gradient norms", f"at least {MIN_NORMS}")
        return
    p50, p90, p99 = (float(np.percentile(norms, q)) for q in (50, 90, 99))
    clipped = [bool(r.get("clipped")) for r in records.steps if "grad_norm" in r]
    fraction = sum(clipped) / len(clipped) if clipped else 0.0
    config = context["config"]
    clip = config.clip if config is not None else None
    clip_text = f"{clip.mode} (max_norm {clip.max_norm})" if clip is not None else "unknown"
    evidence = {"updates": int(len(norms)), "from_step": records.step_numbers[0],
                "to_step": records.step_numbers[-1], "median": p50, "p90": p90, "p99": p99, "max": float(norms.max()),
                "clipped_updates": int(sum(clipped)), "clipped_fraction": fraction, "clip": clip_text}
    threshold = _round(p90)
    diagnosis.data["grad_norm"] = {"p90": p90, "clipped_fraction": fraction}
    if fraction > 0.5:
        diagnosis.add(Finding(
            "clipping_most_updates", "warning",
            f"{sum(clipped)} of {len(clipped)} updates ({fraction:.0%}) were clipped ({clip_text}): clipping more "
            "than half of the updates is a strange way of lowering the learning rate (Tuning Playbook)",
            evidence, f"raise the clip threshold to the 90th percentile of the norms, clip.max_norm {threshold}, "
            "or lower the learning rate instead", {"clip.mode": "norm", "clip.max_norm": threshold}))
    else:
        diagnosis.add(Finding(
            "clip_threshold", "info",
            f"gradient norms over {len(norms)} updates: median {p50:.4g}, 90th percentile {p90:.4g}, max "
            f"{norms.max():.4g}; {fraction:.0%} clipped ({clip_text})",
            evidence, f"if you clip, clip at the 90th percentile (Tuning Playbook): clip.mode norm, clip.max_norm "
            f"{threshold}; clip.mode percentile tracks it online"))


def update_ratios(diagnosis: Diagnosis, records: RunRecords, context: dict[str, Any], warn: bool = True) -> None:
    """Median ||ΔW||/||W|| per weight over the second half of the measured steps, against the healthy ~1e-3
    (``warn=False``: weights outside the healthy band are reported as info, for a run's first steps only)."""
    if not records.ratios:
        diagnosis.skip("update ratios", "the run did not log update-to-weight ratios",
                       "diagnostics.update_ratio_every: N in the run's config", bad_input=False)
        return
    last = records.ratios[-1]["step"]
    late = [r for r in records.ratios if r["step"] >= last / 2] if len(records.ratios) >= 4 else records.ratios
    names = list(dict.fromkeys(name for r in late for name in r["ratios"]))
    medians = {name: float(np.median([r["ratios"][name] for r in late if name in r["ratios"]])) for name in names}
    diagnosis.data["update_ratio"] = {"medians": medians, "from_step": late[0]["step"], "to_step": last}
    low, high = HEALTHY_RATIO
    too_low = {k: v for k, v in medians.items() if v < low}
    too_high = {k: v for k, v in medians.items() if v > high}
    values = list(medians.values())
    common = {"from_step": late[0]["step"], "to_step": last, "measurements": len(late)}
    diagnosis.add(Finding(
        "update_ratio", "info",
        f"update-to-weight ratios ||ΔW||/||W|| (median per weight, steps {late[0]['step']}-{last}): "
        f"{min(values):.2e} to {max(values):.2e}, median {np.median(values):.2e} (healthy: around 1e-3)",
        {**common, "lowest": min(medians, key=medians.get), "lowest_ratio": min(values),
         "highest": max(medians, key=medians.get), "highest_ratio": max(values)},
        "none needed when the ratios sit within a decade of 1e-3"))
    if too_low:
        diagnosis.add(Finding(
            "update_ratio_low", "warning" if warn else "info",
            f"{len(too_low)} weight(s) update by less than {low:g} of their norm per step: they barely learn",
            {**common, **{k: v for k, v in sorted(too_low.items(), key=lambda kv: kv[1])[:8]}},
            "the LR is too low for these weights: raise optimizer.lr, or give them a higher LR multiplier "
            "(optimizer.lr_scale patterns)"))
    if too_high:
        diagnosis.add(Finding(
            "update_ratio_high", "warning" if warn else "info",
            f"{len(too_high)} weight(s) change by more than {high:g} of their norm per step: each update rewrites "
            "them", {**common, **{k: v for k, v in sorted(too_high.items(), key=lambda kv: -kv[1])[:8]}},
            "the LR is too high for these weights: lower optimizer.lr, or lengthen the warmup if it is early"))


def instability_events(diagnosis: Diagnosis, records: RunRecords, context: dict[str, Any]) -> None:
    """Spikes, skipped updates, rollbacks and stops, early (at initialisation) or sudden (mid-run)."""
    from keel.grad import LossSpikeDetector
    from keel.grad.config import SpikeConfig

    planned = context["planned_steps"]
    limit = _early_limit(records, planned)
    found: list[dict[str, Any]] = []
    for event in records.events:
        if event.get("event") in ("spike", "skipped", "rollback", "stopped", "nonfinite"):
            value = event.get("spike_loss", event.get("loss"))
            step = int(event.get("step", 0))
            same = next((e for e in found if e["step"] == step and e["event"] == event["event"]), None)
            if same is not None:  # repeated skips at one step (the step does not advance): counted once
                same["count"] = same.get("count", 1) + 1
                continue
            found.append({"step": step, "event": event["event"],
                          **({"loss": value} if isinstance(value, (int, float)) else {})})
    logged_spikes = {e["step"] for e in found if e["event"] == "spike"}
    spike = SpikeConfig()
    detector = LossSpikeDetector(spike.window, spike.factor, spike.min_history, spike.min_rise)
    for step, loss in zip(records.step_numbers, records.losses):
        if not math.isfinite(loss):
            continue
        if detector.is_spike(loss) and step not in logged_spikes:
            found.append({"step": step, "event": "loss_spike", "loss": loss, "threshold": detector.threshold()})
        detector.update(loss)
    if not found:
        return
    warm = signals.warmup_end(records.lrs)
    p90 = diagnosis.data.get("grad_norm", {}).get("p90")
    stopped = any(e["event"] == "stopped" for e in found)
    early = [e for e in found if e["step"] < limit]
    sudden = [e for e in found if e["step"] >= limit]
    if early:
        current = records.step_numbers[warm] if warm else 0
        length = planned or records.step_numbers[-1] + 1
        warmup = max(2 * current, 10, int(math.ceil(0.05 * length)))
        diagnosis.add(Finding(
            "instability_early", "error" if stopped and early[-1]["event"] == "stopped" else "warning",
            f"{len(early)} instability event(s) in the first {limit} steps (at initialisation): "
            + ", ".join(_describe_event(e) for e in early[:6]),
            {"early_until_step": limit, "warmup_steps": current, "events": early[:20]},
            f"early instability is what warmup fixes (Tuning Playbook): lengthen the warmup to {warmup} steps, and "
            "check with `keel diagnose --config` which warmup the LR needs",
            {"schedule.warmup": warmup}))
    if sudden:
        config = context["config"]
        # events that came while the config clipped are clip_harder's to answer; before clipping began (calibration,
        # start_after_warmup) clipping at the P90 from the start is the remedy
        clipping = config is not None and config.clip.mode in ("norm", "percentile") and any(
            e["step"] >= clipping_from(config.clip, records.lrs, records.step_numbers) for e in sudden)
        changes = {"clip.mode": "norm", "clip.max_norm": _round(p90)} if p90 and not clipping else {}
        diagnosis.add(Finding(
            "instability_sudden", "error" if stopped and sudden[-1]["event"] == "stopped" else "warning",
            f"{len(sudden)} instability event(s) mid-run: "
            + ", ".join(_describe_event(e) for e in sudden[:6]),
            {"after_step": limit, "events": sudden[:20], **({"grad_norm_p90": p90} if p90 else {})},
            "sudden instability (Tuning Playbook remedies): clip at the 90th percentile of gradient norms"
            + (f" (clip.max_norm {_round(p90)})" if p90 else "")
            + ", lower the LR, try another optimizer, or for keel's GPT model.norm_position residual "
              "(x + Norm(f(x))) or model.zero_init_residual true", changes))


def _describe_event(event: dict[str, Any]) -> str:
    count = f" x{event['count']}" if event.get("count", 1) > 1 else ""
    return f"{event['event']}{count} at step {event['step']}"


def _round(value: float) -> float:
    """Two significant digits: what a person would write in a config."""
    if not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.2g}")
