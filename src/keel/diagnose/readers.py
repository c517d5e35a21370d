"""Runs keel did not train, read as keel's records: Lightning log directories and Hugging Face ``trainer_state.json``.

``keel diagnose`` and ``keel report`` read a keel run's ``metrics.jsonl``; ``read_other_run(path)`` gives them the
same record kinds for a run of another trainer, so the learning-curve, gradient-norm, update-ratio and instability
readings apply unchanged:

- **Lightning, CSVLogger** (``metrics.csv``): each row holds what one ``log_metrics`` call wrote at Lightning's
  ``step`` (the optimizer steps already made). A training row is keel's ``step`` record of that update; a validation
  row is written at the step of the last training update, so its ``eval`` record has one step more (the updates
  applied), as keel's. Rows of one step are merged (``LearningRateMonitor`` writes its own).
- **Lightning, TensorBoardLogger** (``events.out.tfevents.*``; or any ``SummaryWriter`` run with the same tags):
  scalars by tag and step, read with tensorboard's ``EventAccumulator`` (``pip install 'keel[tensorboard]'``).
- **Hugging Face Trainer** (``trainer_state.json``, its ``log_history``): a training entry (``loss``,
  ``learning_rate``, ``grad_norm``; ``step`` counts the updates made, the loss averaged over ``logging_steps``) is a
  ``step`` record of the last update it covers; ``eval_loss`` is an ``eval`` record.

Names: the training loss is ``train_loss_step``, ``train_loss``, ``loss`` or ``train/loss``; validation loss
``val_loss``, ``val/loss``, ``valid_loss``, ``validation_loss`` or ``eval_loss`` (and ``*_<name>`` for averaged
weights: ``val_loss_ema``); the LR ``lr``, ``learning_rate`` or ``LearningRateMonitor``'s ``lr-<name>``; the
unclipped gradient norm ``grad_norm`` (keel's ``Clip``/``GradNorm``, the Trainer's) or Lightning's
``grad_2.0_norm_total``; keel's callbacks add ``clipped``, ``skipped``, ``seq_len`` and ``update_ratio/<weight>``.
A non-finite training loss or gradient norm is an instability ``event`` (``nonfinite``), as keel's own skips are.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from keel import rundir
from keel.diagnose.update_ratio import RECORD_TYPE
from keel.errors import KeelError

LOSS = ("train_loss_step", "train_loss", "loss_step", "loss", "training_loss", "train/loss")
VAL_LOSS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch", "eval_loss", "eval/loss")
LR = ("lr", "learning_rate", "train/learning_rate")
GRAD_NORM = ("grad_norm", "grad_2.0_norm_total", "train/grad_norm")
PASSED = ("clipped", "seq_len")  # keel's callbacks' keys, taken as they are
RATIO_PREFIX = "update_ratio/"
_VERSION = re.compile(r"version_(\d+)")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def find_other_run(path: str | Path) -> tuple[str, Path] | None:
    """``(kind, file or folder)`` of the Lightning or Hugging Face log at ``path``, or None (a keel run directory, or
    nothing known). ``path`` may be the log itself, its folder, a Lightning root (``version_N`` folders, the newest
    taken) or an HF ``output_dir`` (its own ``trainer_state.json``, else the newest ``checkpoint-N``'s)."""
    path = Path(path)
    if path.is_file():
        if path.name == "trainer_state.json":
            return "hf", path
        if path.name == "metrics.csv":
            return "lightning-csv", path
        if path.name.startswith("events.out.tfevents."):
            return "tensorboard", path.parent
        return None
    if not path.is_dir() or rundir.RunDir(path).metrics.exists():  # a keel run: keel's own reader
        return None
    if (path / "trainer_state.json").is_file():
        return "hf", path / "trainer_state.json"
    if (path / "metrics.csv").is_file():
        return "lightning-csv", path / "metrics.csv"
    if any(path.glob("events.out.tfevents.*")):
        return "tensorboard", path
    checkpoints = _newest(path, _CHECKPOINT, "trainer_state.json")
    if checkpoints is not None:
        return "hf", checkpoints / "trainer_state.json"
    for root in (path, path / "lightning_logs"):
        version = _newest(root, _VERSION, None)
        if version is not None:
            return find_other_run(version)
    return None


def _newest(root: Path, pattern: re.Pattern, required: str | None) -> Path | None:
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.fullmatch(p.name))
             and (required is None or (p / required).is_file())]
    return max(found)[1] if found else None


def read_other_run(path: str | Path, report=lambda message: None) -> list[dict[str, Any]] | None:
    """keel's records of the Lightning or Hugging Face run at ``path`` (None when it is not one: a keel run
    directory is read by keel's own reader). KeelError when the log cannot be read or holds no training loss."""
    found = find_other_run(path)
    if found is None:
        return None
    kind, source = found
    what = {"hf": "Hugging Face trainer_state.json", "lightning-csv": "Lightning CSV log",
            "tensorboard": "TensorBoard event files"}[kind]
    report(f"reading {what} {source}")
    if kind == "hf":
        records = hf_records(_read_json(source))
    else:
        rows = read_csv_rows(source) if kind == "lightning-csv" else read_tensorboard_rows(source)
        records = lightning_records(rows)
    if not any(r["kind"] == "step" for r in records):
        raise KeelError(f"'{source}' ({what}) holds no training loss; allowed: a log with the training loss under "
                        f"one of {', '.join(LOSS)} (e.g. self.log('train_loss', loss) in training_step)")
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KeelError(f"'{path}' is not a readable trainer_state.json ({type(error).__name__}); allowed: the "
                        "Trainer's trainer_state.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("log_history"), list):
        raise KeelError(f"'{path}' has no log_history list; allowed: the Trainer's trainer_state.json")
    return data


def _step(value: Any) -> int | None:
    """A logged step: a whole number from 0 to 2**53 (anything else is not a step a trainer wrote)."""
    number = _number(value)
    if number is None or not math.isfinite(number) or not 0 <= number <= 2**53:
        return None
    return int(number)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _first(row: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = _number(row.get(name))
        if value is not None:
            return value
    return None


def _lr(row: dict[str, Any]) -> float | None:
    value = _first(row, LR)
    if value is not None:
        return value
    monitored = sorted((k for k in row if k.startswith("lr-")), key=lambda k: ("/pg" in k, k))  # LearningRateMonitor
    return _first(row, tuple(monitored)) if monitored else None


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a Lightning ``metrics.csv``, empty cells left out."""
    try:
        with open(path, newline="") as handle:
            rows = [{k: v for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise KeelError(f"'{path}' is not a readable CSV log ({type(error).__name__}); allowed: Lightning's "
                        "CSVLogger metrics.csv") from None
    return rows


def read_tensorboard_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per step with every scalar tag logged at it, from the event files in ``folder``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise KeelError(f"'{folder}' holds TensorBoard event files; reading them needs the tensorboard package: "
                        "pip install 'keel[tensorboard]' (or log with Lightning's CSVLogger)") from None
    by_step: dict[int, dict[str, Any]] = {}
    try:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                by_step.setdefault(int(event.step), {"step": int(event.step)})[tag] = float(event.value)
    except Exception as error:  # noqa: BLE001 - a damaged event file: one line, whatever tensorboard raised
        raise KeelError(f"'{folder}': the TensorBoard event files cannot be read ({type(error).__name__}); allowed: "
                        "event files of a SummaryWriter, or Lightning's CSVLogger metrics.csv") from None
    return [by_step[s] for s in sorted(by_step)]


def lightning_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """keel's records from Lightning's logged rows (CSV or TensorBoard): see the module docstring."""
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        step = _step(row.get("step"))
        if step is not None:
            merged.setdefault(step, {}).update(row)
    records: list[dict[str, Any]] = []
    skipped = 0.0
    for step in sorted(merged):
        row = merged[step]
        loss = _first(row, LOSS)
        if loss is not None:
            record: dict[str, Any] = {"kind": "step", "step": step, "loss": loss}
            for key, value in (("lr", _lr(row)), ("grad_norm", _first(row, GRAD_NORM))):
                if value is not None:
                    record[key] = value
            for key in PASSED:
                value = _number(row.get(key))
                if value is not None:
                    record[key] = bool(value) if key == "clipped" else value
            records.append(record)
            records.extend(_nonfinite(record))
        now = _number(row.get("skipped"))
        if now is not None and now > skipped:
            records.append({"kind": "event", "step": step, "event": "skipped", "skipped": int(now)})
            skipped = now
        ratios = {k[len(RATIO_PREFIX):]: v for k in row if k.startswith(RATIO_PREFIX)
                  if (v := _number(row[k])) is not None and math.isfinite(v)}
        if ratios:
            records.append({"kind": "diagnostic", "step": step, "diagnostic": RECORD_TYPE, "ratios": ratios})
        evaluation = _eval(row, step + 1)  # logged at the last training step: the updates applied are one more
        if evaluation is not None:
            records.append(evaluation)
    return records


def _eval(row: dict[str, Any], step: int) -> dict[str, Any] | None:
    val = _first(row, VAL_LOSS)
    if val is None:
        return None
    record: dict[str, Any] = {"kind": "eval", "step": step, "val_loss": val}
    for key, value in row.items():
        for base in VAL_LOSS:
            if key.startswith(base + "_") and key != "val_loss_epoch" and (number := _number(value)) is not None:
                record["val_loss" + key[len(base):]] = number  # averaged weights: val_loss_ema, eval_loss_ema
    accuracy = _first(row, ("val_acc", "val_accuracy", "eval_accuracy", "val/acc"))
    if accuracy is not None:
        record["val_accuracy"] = accuracy
    return record


def _nonfinite(record: dict[str, Any]) -> list[dict[str, Any]]:
    """An instability event for a non-finite loss or gradient norm (the Trainer's ``logging_nan_inf_filter`` hides
    a NaN loss, not the norm)."""
    values = {k: record[k] for k in ("loss", "grad_norm") if k in record and not math.isfinite(record[k])}
    return [{"kind": "event", "step": record["step"], "event": "nonfinite", **values}] if values else []


def hf_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """keel's records from a Trainer's ``trainer_state.json``: see the module docstring."""
    records: list[dict[str, Any]] = []
    evals: dict[int, dict[str, Any]] = {}
    for entry in state["log_history"]:
        if not isinstance(entry, dict) or "train_runtime" in entry:  # the summary at the end of training
            continue
        step = _step(entry.get("step"))
        if step is None:
            continue
        loss = _number(entry.get("loss"))
        if loss is not None:
            record: dict[str, Any] = {"kind": "step", "step": step - 1, "loss": loss}
            for key, value in (("lr", _number(entry.get("learning_rate"))),
                               ("grad_norm", _number(entry.get("grad_norm")))):
                if value is not None:
                    record[key] = value
            records.append(record)
            records.extend(_nonfinite(record))
        if _number(entry.get("skipped")) is not None:
            records.append({"kind": "event", "step": step - 1, "event": "skipped", "skipped": int(entry["skipped"])})
        ratios = entry.get("update_ratio")
        if isinstance(ratios, dict):
            kept = {str(k): n for k, v in ratios.items() if (n := _number(v)) is not None and math.isfinite(n)}
            records.append({"kind": "diagnostic", "step": step - 1, "diagnostic": RECORD_TYPE, "ratios": kept})
        evaluation = _eval(entry, step)
        if evaluation is not None:
            evals.setdefault(step, {"kind": "eval", "step": step}).update(evaluation)
        elif any(k.startswith("eval_loss_") for k in entry):  # keel's averages, logged beside the Trainer's eval
            target = evals.setdefault(step, {"kind": "eval", "step": step})
            target.update({"val_loss" + k[len("eval_loss"):]: v for k, v in entry.items()
                           if k.startswith("eval_loss_") and _number(v) is not None})
    records.extend(e for e in evals.values() if "val_loss" in e)
    records.sort(key=lambda r: (r["step"], r["kind"] == "eval"))
    return records
