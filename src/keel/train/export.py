"""Which weights a run exports, and the final result that describes them.

``model.safetensors`` in the run directory holds one *weight set* of one step. A weight set is ``raw`` (the trained
weights) or an average kept by an averaging callback, named after it (``ema``, ``polyak``, ``swa``). An evaluation
record scores the raw weights under ``val_loss``, ``val_accuracy``, ... and set ``name`` under ``val_loss_<name>``,
``val_accuracy_<name>``, ...; a checkpoint holds set ``name`` as ``<name>.safetensors`` and the raw weights as
``model.safetensors`` (``raw.safetensors`` where its ``model.safetensors`` holds an average).

What is exported (``ExportRequest``, filled in by callbacks):

- by default the raw weights of the last step;
- ``weights``: a set fixed by the config (``ema.checkpoint_weights: ema``: what every checkpoint holds, OpenNMT-tf's
  mode);
- ``step`` with ``metric`` and ``mode``: early stopping's best checkpoint, and there the set that scores best by
  ``metric`` (the set the summary's ``best: <set> weights`` names), unless ``weights`` fixes it.

The summary then reports the exported weights' metrics as ``val_loss``, ``val_accuracy``, ... (``weights`` and
``weights_step`` say which), each average's at that step under its own suffix, the raw weights' as ``val_loss_raw``
... when they are not the ones exported, and the last evaluation as ``last`` when it is another step's or set's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

RAW = "raw"
_NOT_METRICS = ("step", "tokens", "kind")


@dataclass
class ExportRequest:
    """What callbacks ask the trainer to export (see the module docstring); the defaults export the raw weights of
    the last step."""

    weights: str | None = None  # a set fixed by the config; None: raw, or the best set at `step`
    step: int | None = None  # a checkpoint's step (early stopping's best); None: the last step
    metric: str = "val_loss"  # how the sets compare
    mode: str = "min"


def set_metrics(record: dict[str, Any], name: str, sets: list[str]) -> dict[str, Any]:
    """The metrics of weight set ``name`` in an evaluation record, under their plain names (``val_loss``, ...)."""
    if name == RAW:
        return {k: v for k, v in record.items()
                if k not in _NOT_METRICS and not any(k.endswith(f"_{s}") for s in sets)}
    suffix = f"_{name}"
    return {k[: -len(suffix)]: v for k, v in record.items() if k.endswith(suffix) and k not in _NOT_METRICS}


def base_metric(metric: str, sets: list[str]) -> str:
    """``val_loss_ema`` -> ``val_loss``: the metric that compares sets, whichever set a callback tracks."""
    for name in sets:
        if metric.endswith(f"_{name}"):
            return metric[: -len(name) - 1]
    return metric


def scores(record: dict[str, Any], sets: list[str], metric: str) -> dict[str, float]:
    """Each set's finite value of ``metric`` in ``record``, raw first."""
    out = {}
    for name in [RAW, *sets]:
        value = set_metrics(record, name, sets).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def best_of(values: dict[str, float], mode: str) -> str:
    """The set with the best value (the first of equals: raw before the averages)."""
    pick = min if mode == "min" else max
    target = pick(values.values())
    return next(name for name, value in values.items() if value == target)


def checkpoint_file(step_dir: Path, name: str) -> Path:
    """The file of weight set ``name`` in a checkpoint directory (``keel.rundir.checkpoint_weights``)."""
    from keel import rundir

    return rundir.checkpoint_weights(step_dir, name)


@dataclass(frozen=True)
class Choice:
    """The exported weights: the set, its step, that step's evaluation record (None if there is none), the metric
    the sets were compared by, and each set's value of it there."""

    weights: str
    step: int
    record: dict[str, Any] | None
    metric: str
    scored: dict[str, float]


def choose(request: ExportRequest, evals: list[dict[str, Any]], sets: list[str], last_step: int,
           step_dir: Callable[[int], Path]) -> Choice:
    """The weights to export for ``request``. ``step_dir(step)`` is the checkpoint directory of a step; a set is a
    candidate only where that checkpoint holds its file."""
    step = last_step if request.step is None else request.step
    record = next((r for r in reversed(evals) if r.get("step") == step), None)
    metric = base_metric(request.metric, sets)
    scored = scores(record, sets, metric) if record is not None else {}
    if request.weights is not None:
        name = request.weights
    elif request.step is None:
        name = RAW
    else:
        candidates = {name: value for name, value in scored.items()
                      if name == RAW or checkpoint_file(step_dir(step), name).is_file()}
        name = best_of(candidates, request.mode) if candidates else RAW
    return Choice(name, step, record, metric, scored)


def describe(summary: dict[str, Any], choice: Choice, sets: list[str], last: dict[str, Any] | None) -> None:
    """Put the exported weights' metrics into ``summary`` (see the module docstring)."""
    summary["weights"], summary["weights_step"] = choice.weights, choice.step
    record = choice.record
    if record is None or (choice.weights == RAW and last is not None and last.get("step") == choice.step):
        return  # the raw weights of the last evaluation: the summary holds them already
    if last is not None:
        for key in last:
            if key not in _NOT_METRICS:
                summary.pop(key, None)
        summary["last"] = {k: v for k, v in last.items() if k not in ("tokens", "kind")}
    summary.update({k: v for k, v in record.items() if k not in _NOT_METRICS})  # each average at that step
    if choice.weights != RAW:  # the raw weights' metrics move to <key>_raw; the plain keys are the set's alone
        raw = set_metrics(record, RAW, sets)
        for key in raw:
            summary.pop(key, None)
        summary.update({f"{k}_{RAW}": v for k, v in raw.items()})
        summary.update(set_metrics(record, choice.weights, sets))


def finish(trainer, summary: dict[str, Any], evals: list[dict[str, Any]]) -> str:
    """Put the weights ``trainer.export`` asks for into the trainer's model (read from their checkpoint) and their
    metrics into ``summary``; print which set scored best where there are several. Returns a note for the final
    line ("" for the raw weights of the last step)."""
    from keel import rundir
    from keel.safetensors_io import SafetensorsReader

    sets = [cb.name for cb in trainer.callbacks if getattr(cb, "weight_set", False)]
    run = rundir.RunDir(trainer.run_dir)
    last_step = trainer.state.step
    choice = trainer.dist.from_main(  # rank 0's view of the checkpoints decides for every rank
        lambda: choose(trainer.export, evals, sets, last_step, run.checkpoint))
    step_dir = run.checkpoint(choice.step)
    if choice.weights != RAW and not trainer.dist.from_main(checkpoint_file(step_dir, choice.weights).is_file):
        # e.g. an average that had not started by then: the checkpoint holds the raw weights alone
        trainer.say(f"{choice.weights} weights: {step_dir} holds none; exporting its raw weights")
        choice = replace(choice, weights=RAW)
    if (choice.weights, choice.step) != (RAW, last_step):
        with SafetensorsReader(checkpoint_file(step_dir, choice.weights)) as reader:
            weights = {name: reader.read(name) for name in reader.tensors}
        trainer.dist.load_model_state_dict(trainer.model, weights)
    describe(summary, choice, sets, evals[-1] if evals else None)
    if len(choice.scored) > 1:
        metric, best = choice.metric, best_of(choice.scored, trainer.export.mode)
        summary["best_weights"] = best
        shown = ", ".join(f"{metric if n == RAW else f'{metric}_{n}'} {v:.4f}" for n, v in choice.scored.items())
        where = "" if best == choice.weights else (
            f" ({checkpoint_file(step_dir, best).relative_to(run.path)}); "
            f"{rundir.MODEL_WEIGHTS} holds the {choice.weights} weights")
        when = "final" if choice.step == last_step else f"step {choice.step}"
        trainer.say(f"{when} {shown}; best: {best} weights{where}")
    if (choice.weights, choice.step) == (RAW, last_step):
        return ""
    return f" ({choice.weights} weights of step {choice.step}, exported)"
