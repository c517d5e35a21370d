"""``restarts: N``: when a run diverges, start it again with a new seed, up to N times.

The training-dynamics notes: a run that fails to converge is restarted (a new initialisation and data order), not
nursed along. A run diverges when the trainer stops it with ``TrainingUnstableError`` (too many non-finite updates
in a row, or a loss spike it could not roll back from). Then the attempt's files (config.yaml, metrics.jsonl,
loss.png, checkpoints/, ...) move to ``RUN_DIR/restarts/attempt_<k>_seed_<seed>/``, a line goes to
``RUN_DIR/restarts/restarts.jsonl`` (attempt, seed, step, the reason), and the run starts again in ``RUN_DIR`` with
``seed + 1``; the run directory always holds the attempt in progress, or the one that finished. ``--resume`` continues
the current attempt and counts the restarts already used from ``restarts.jsonl``.

Restarting differs from ``keel sweep --preset restarts`` (docs/sweep.md), which trains N seeds for a short budget and
continues the best: that one picks among runs that all train; this one replaces a run that failed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel import rundir
from keel.errors import KeelError, TrainingUnstableError
from keel.config import SEED_LIMIT

def used(run_dir: Path) -> list[dict[str, Any]]:
    """The restarts recorded in ``run_dir`` so far (oldest first)."""
    path = rundir.RunDir(run_dir).restarts / rundir.RESTARTS_RECORD
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_aside(run_dir: Path, attempt: int, seed: int, step: int | None, reason: str) -> Path:
    """Move the failed attempt's files from ``run_dir`` into ``restarts/attempt_<k>_seed_<seed>/`` and record it."""
    run = rundir.RunDir(run_dir)
    target = run.restart_attempt(attempt, seed)
    target.mkdir(parents=True, exist_ok=False)
    for entry in sorted(run.path.iterdir()):
        if entry != run.restarts:
            os.replace(entry, target / entry.name)
    record = {"attempt": attempt, "seed": seed, "step": step, "reason": reason, "folder": target.name}
    with open(run.restarts / rundir.RESTARTS_RECORD, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return target


def _failed_step(run_dir: Path) -> int | None:
    from keel.rundir.metrics import read_metrics

    path = rundir.RunDir(run_dir).metrics
    stops = [r for r in read_metrics(path) if r.get("event") == "stopped"] if path.is_file() else []
    return int(stops[-1]["step"]) if stops else None


def check(config) -> None:
    """Refuse what restarts cannot do, before anything is written."""
    if config.restarts and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KeelError(f"restarts: {config.restarts} with several processes is not supported; allowed: 0, or one "
                        "process")


def fit(config, attempt: Callable[[Any, bool], dict[str, Any]], run_dir: Path, resume: bool,
        say: Callable[[str], None]) -> dict[str, Any]:
    """Train with ``attempt(config, resume)`` (one run in ``run_dir``), starting again with a new seed after each
    divergence while ``config.restarts`` allows; the summary lists the restarts (``restarts``)."""
    check(config)
    history = used(run_dir) if resume else []
    while True:
        try:
            summary = attempt(config, resume)
        except TrainingUnstableError as error:
            if len(history) >= config.restarts:
                if config.restarts:
                    raise TrainingUnstableError(f"{error}; restarts: {config.restarts} used up (the earlier attempts "
                                                f"are in {rundir.RunDir(run_dir).restarts})") from None
                raise
            seed = (config.seed + 1) % SEED_LIMIT
            step = _failed_step(run_dir)
            folder = set_aside(run_dir, len(history) + 1, config.seed, step, str(error))
            history = used(run_dir)
            say(f"restart {len(history)} of {config.restarts}: the run diverged"
                f"{f' at step {step}' if step is not None else ''} with seed {config.seed}; that attempt is kept in "
                f"{folder}; starting again with seed {seed}")
            config, resume = config.model_copy(update={"seed": seed}), False
            continue
        if history:
            summary["restarts"] = history
        return summary


def initial_weights(task) -> dict[str, Any] | None:
    """A copy of the weights of a model passed to ``train()`` already built (``PlainTask`` holding a module): it
    trains in place, so every attempt starts again from these (the new seed then changes the data order and dropout;
    pass a function returning the model to draw new initial weights too). None for tasks that build their model."""
    import torch

    model = getattr(task, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(task, initial: dict[str, Any] | None) -> None:
    if initial is not None:
        task.model.load_state_dict(initial)
