"""Device-portable training state: RNG states kept as CPU tensors, checkpoints read on the CPU and moved to the
device, and ``deterministic: true`` (deterministic kernels on CUDA).

- **Checkpoints.** The trainer reads every checkpoint to the CPU (``rundir.load_latest(..., "cpu")``) and moves what
  belongs on its device: ``model.load_state_dict`` copies into the device's parameters, ``Optimizer.load_state_dict``
  casts each state tensor to its parameter's device (torch's rule; keel's optimizers keep it), averaging shadows
  copy into their own tensors. Counters, the loss scale, the clipper's window and the schedule are plain numbers.
  So a run checkpointed on a GPU resumes on a CPU-only machine, and the reverse.
- **Random number generators.** Python's, NumPy's and torch's CPU generator states are CPU tensors and plain
  values, restored on any device. The CUDA generators' states (one per visible GPU) are restored when the run
  resumes on CUDA; on a CPU they are not used, and the resume says so in one line.
- **Deterministic kernels.** ``deterministic: true`` sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before the trainer's
  first CUDA operation, turns on ``torch.use_deterministic_algorithms`` and turns cuDNN's benchmark off for the
  run (restored when ``fit`` returns), as torch's reproducibility notes ask
  (https://pytorch.org/docs/stable/notes/randomness.html).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: cuBLAS's fixed workspace that makes its kernels deterministic (torch accepts this one or ":16:8").
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


# ------------------------------------------------------------------------------------------ RNG states


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state as CPU tensors and plain values (the CUDA generators' too, when on CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> str | None:
    """Restore the generators of ``rng_state``, whatever device its tensors arrived on.

    The CUDA generators are restored on CUDA (those of the GPUs both machines have). Returns one line for the user
    when the saved state and this device disagree about CUDA (a CUDA state on a CPU, none on CUDA), else None.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if device.type == "cuda":
        if cuda is None:
            return "the checkpoint holds no CUDA generator state (it was written on a CPU): the CUDA generator " \
                   "keeps this run's seed"
        for index, saved in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved.cpu(), index)
        return None
    if cuda is not None:
        return f"the checkpoint's CUDA generator state is ignored: this run is on {device}, without CUDA (Python's, " \
               "NumPy's and torch's CPU generators are restored)"
    return None


# ------------------------------------------------------------------------------------------ checkpoints


def saved_device(payload: dict[str, Any]) -> str:
    """The device a checkpoint's ``state.pt`` was written on: its ``device`` entry, else (older checkpoints) cuda
    when it holds a CUDA generator state, cpu otherwise."""
    device = payload.get("device")
    if isinstance(device, str) and device:
        return device
    rng = payload.get("rng")
    return "cuda" if isinstance(rng, dict) and "cuda" in rng else "cpu"


def count_tensors(tree: Any) -> int:
    """How many tensors a nested state (dicts, lists, tuples) holds."""
    return sum(1 for _ in _tensors(tree))


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def describe_move(name: str, payload: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> str:
    """One line for a resume whose checkpoint was written on another type of device: what was moved where."""
    callbacks = payload.get("callbacks")
    states = [key for key, value in (callbacks.items() if isinstance(callbacks, dict) else ())
              if isinstance(value, dict) and (count_tensors(value) or "shadow_file" in value)]
    moved = [f"{len(weights)} weight tensors", f"{count_tensors(payload.get('optimizer'))} optimizer-state tensors"]
    if states:
        moved.append(f"the state of {', '.join(states)}")
    listed = ", ".join(moved[:-1]) + f" and {moved[-1]}"
    return f"checkpoint {name} was written on {saved_device(payload)}: read on the CPU, {listed} moved to {device}"


# ------------------------------------------------------------------------------------------ deterministic kernels


def set_cublas_workspace() -> str | None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` to a deterministic workspace unless it already is one; call before the first
    CUDA operation. cuBLAS reads it when it makes its workspace, at a process's first matrix multiply on the GPU:
    returns one line when this process had already put tensors on the GPU (that workspace then stays), else None."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in _DETERMINISTIC_WORKSPACES:
        return None
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    if torch.cuda.is_available() and torch.cuda.is_initialized() and \
            torch.cuda.memory_stats().get("allocation.all.allocated", 0) > 0:
        return (f"deterministic: CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} was set after this process had "
                "used the GPU: a cuBLAS workspace made before keeps its size (still deterministic on one stream, as "
                f"keel trains); for certainty start Python with CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG}")
    return None


def use_deterministic(enabled: bool) -> tuple[bool, bool, bool, bool]:
    """Turn deterministic kernels on (``enabled``) for a run; returns the settings to hand back to ``restore``.

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises), cuDNN benchmark
    off and cuDNN deterministic. Off: nothing is changed.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if enabled:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return before


def restore(before: tuple[bool, bool, bool, bool]) -> None:
    """Put back the settings ``use_deterministic`` found."""
    algorithms, warn_only, benchmark, cudnn_deterministic = before
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = cudnn_deterministic
