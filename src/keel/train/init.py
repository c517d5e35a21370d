"""``init_from``: start a run from pretrained weights (transfer learning), with strict key matching by default.

Accepted: a keel run directory (its exported ``model.safetensors``, else its best checkpoint, else its newest), a
checkpoint directory (``step_XXXXXXXX``), a ``.safetensors`` file, or a Hugging Face model directory (its
``model.safetensors``). Weights are matched by name; strict matching fails on any missing, unexpected or
differently shaped weight and names them. ``strict=False`` loads what matches and reports the rest (a new head);
``exclude`` leaves weights whose names start with one of its prefixes untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keel.errors import KeelError


def find_weights_file(path: str | Path) -> Path:
    """The weights file that ``init_from: path`` means."""
    from keel import rundir

    given = Path(path).expanduser()
    if given.is_file():
        if given.suffix != ".safetensors":
            raise KeelError(f"init_from: '{path}' is not a .safetensors file; allowed: a keel run or checkpoint "
                            "directory, a .safetensors file, or a Hugging Face model directory")
        return given
    if not given.is_dir():
        raise KeelError(f"init_from: '{path}' does not exist; allowed: a keel run or checkpoint directory, a "
                        ".safetensors file, or a Hugging Face model directory")
    if (given / rundir.MODEL_WEIGHTS).is_file():
        return given / rundir.MODEL_WEIGHTS  # an exported run, a checkpoint, or a save_pretrained directory
    run = rundir.RunDir(given)
    best = run.best_checkpoint()
    if best is not None and (best / rundir.MODEL_WEIGHTS).is_file():
        return best / rundir.MODEL_WEIGHTS
    latest = rundir.newest_intact(run.checkpoints, report=lambda message: None)
    if latest is not None:
        return latest / rundir.MODEL_WEIGHTS
    raise KeelError(f"init_from: '{path}' holds no model.safetensors and no intact checkpoint; allowed: a keel run "
                    "or checkpoint directory, a .safetensors file, or a Hugging Face model directory")


def load_initial_weights(model: nn.Module, path: str | Path, strict: bool = True,
                         exclude: list[str] | tuple[str, ...] = ()) -> str:
    """Load the weights ``path`` names into ``model``; returns a one-line report of what was loaded."""
    from keel.safetensors_io import SafetensorsReader

    file = find_weights_file(path)
    try:
        with SafetensorsReader(file) as reader:
            weights = {name: reader.read(name) for name in reader.tensors}
    except KeelError:
        raise
    except Exception as error:  # a file that is not safetensors: report it as bad input
        raise KeelError(f"init_from: '{file}' is not a readable safetensors file ({error})") from None
    own = model.state_dict()
    excluded = sorted(k for k in own if any(k.startswith(prefix) for prefix in exclude))
    storage = {k: (v.untyped_storage().data_ptr(), v.storage_offset()) for k, v in own.items()}
    loaded_storage = {storage[k] for k in own if k in weights}
    # a tied weight (one storage under two names) is loaded through its twin: save_pretrained writes it once
    missing = sorted(k for k in own if k not in weights and k not in excluded and storage[k] not in loaded_storage)
    unexpected = sorted(k for k in weights if k not in own and not any(k.startswith(p) for p in exclude))
    mismatched = sorted(k for k in own if k in weights and k not in excluded and weights[k].shape != own[k].shape)
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            if label == "shape mismatch":
                shown = ", ".join(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in names[:6])
            problems.append(f"{label}: {shown}")
    if strict and problems:
        raise KeelError(f"init_from: '{file}' does not match the model ({'; '.join(problems)}); allowed: matching "
                        "weights, or init_from_strict: false to load what matches (e.g. a new head), or "
                        "init_from_exclude: [prefix, ...]")
    load = {k: v for k, v in weights.items() if k in own and k not in excluded and k not in mismatched}
    with torch.no_grad():
        for name, value in load.items():
            own[name].copy_(value)
    report = f"init_from: loaded {len(load)} of {len(own)} weights from {file}"
    kept = [*excluded, *missing, *mismatched]
    if kept:
        report += f"; kept the model's own initialisation for {len(kept)} ({', '.join(kept[:6])}"
        report += f" and {len(kept) - 6} more)" if len(kept) > 6 else ")"
    if unexpected:
        report += f"; ignored {len(unexpected)} unexpected ({', '.join(unexpected[:6])})"
    return report
