"""Checkpoint I/O: write one atomically, point ``latest`` at it, load the newest that loads, prune the old ones."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from keel.errors import KeelError, naming_the_file
from keel.rundir.files import Report, _describe, _fsync_dir, _sha256, atomic_write_text
from keel.rundir.layout import BEST, LATEST, MANIFEST, MODEL_WEIGHTS, STATE, list_checkpoints, step_dir_name
from keel.rundir.manifest import _check, _Corrupt

# keel.safetensors_io is imported inside the functions that use it: keel.averaging imports this module.

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _OSErrorRecorder:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports a full disk as a RuntimeError."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _save_state(state: dict[str, Any], path: Path) -> None:
    with naming_the_file(path), open(path, "wb") as handle:
        recorder = _OSErrorRecorder(handle)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``root/latest`` at it; return its directory.

    ``extra(tmp_dir)`` may add files (callbacks' weights) before the manifest is written. A checkpoint of the same
    step already there is replaced. An OSError (full disk, read-only or forbidden directory) becomes a one-line
    KeelError; the temporary directory is removed and the older checkpoints are left as they were.
    """
    from keel.safetensors_io import write_safetensors

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_safetensors(tmp / MODEL_WEIGHTS, weights)
        _save_state(state, tmp / STATE)
        if extra is not None:
            extra(tmp)
        files = {}
        for path in sorted(tmp.iterdir()):
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"step": step, "files": files, "meta": meta}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _replace_dir(tmp, final)
        _fsync_dir(root)
        point_latest(root, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise KeelError(
                f"checkpoint {final.name}: cannot write it under '{root}' ({_describe(error)}); "
                "the older checkpoints are left as they were"
            ) from None
        raise
    return final


def point_latest(root: Path, ckpt: Path) -> None:
    """Make ``root/latest`` name ``ckpt`` (unless it already does): after each save, and on resume, where a kill
    between a checkpoint's rename and this update left it naming an older one."""
    _point(Path(root) / LATEST, Path(ckpt).name)


def point_best(root: Path, ckpt: Path | str) -> None:
    """Make ``root/best`` name checkpoint ``ckpt`` (a path or a name), the best by the tracked metric."""
    _point(Path(root) / BEST, Path(ckpt).name)


def _point(pointer: Path, name: str) -> None:
    try:
        if pointer.read_text().strip() == name:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(pointer, name + "\n")


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an old ``final`` is moved aside first and removed only once ``new`` is in place."""
    if not final.exists():
        os.replace(new, final)
        return
    aside = final.with_name(f".old-{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except OSError:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", required: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and payload (``state.pt``) of checkpoint ``ckpt_dir``, checked by ``verify`` first.

    ``state.pt`` is read with ``torch.load(weights_only=True)``; it must hold a dict with every key in ``required``.
    Every tensor arrives on ``device``: by default the CPU, whatever device the checkpoint was written from (a CUDA
    run's checkpoint loads on a machine without a GPU); the caller moves what belongs on its device and leaves the
    rest (RNG states) on the CPU. Any failure is a KeelError naming the checkpoint and the reason.
    """
    device = _check_device(device)
    try:
        return _load(Path(ckpt_dir), device, tuple(required))
    except _Corrupt as problem:
        raise KeelError(f"checkpoint '{ckpt_dir}' is corrupt: {problem}") from None


def _load(ckpt_dir: Path, device: torch.device, required: tuple[str, ...]):
    """Weights and payload on ``device``: storages saved from any device are mapped onto it (map_location)."""
    _check(ckpt_dir)
    try:
        weights = load_file(str(ckpt_dir / MODEL_WEIGHTS), device=str(device))
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
        raise _Corrupt(f"{MODEL_WEIGHTS} cannot be loaded ({_one_line(error)})") from None
    try:
        payload = torch.load(ckpt_dir / STATE, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 (UnpicklingError, RuntimeError, EOFError, ...)
        raise _Corrupt(f"{STATE} cannot be loaded with weights_only=True ({_one_line(error)})") from None
    if not isinstance(payload, dict):
        raise _Corrupt(f"{STATE} holds a {type(payload).__name__}, not a dict")
    missing = [key for key in required if key not in payload]
    if missing:
        raise _Corrupt(f"{STATE} lacks {', '.join(map(repr, missing))}")
    return weights, payload


def load_latest(
    root: Path,
    device: torch.device | str = "cpu",
    report: Report = print,
    required: Iterable[str] = (),
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(path, weights, payload)`` of the newest checkpoint under ``root`` (a run's ``checkpoints/``) that loads.

    Every newer checkpoint that fails (``verify``, a malformed safetensors header, ``state.pt`` not loadable with
    ``weights_only=True``, not a dict, or lacking a key of ``required``) is reported in one line,
    ``checkpoint step_X is corrupt (<reason>); using step_Y``, and left in place. None when no checkpoint loads
    (or there is none; directories without a manifest do not count). Tensors arrive on ``device`` (by default the
    CPU), as with ``load_checkpoint``.
    """
    device = _check_device(device)
    required = tuple(required)
    found = _newest(Path(root), lambda ckpt: _load(ckpt, device, required), report)
    return None if found is None else (found[0], *found[1])


def newest_intact(root: Path, report: Report = print) -> Path | None:
    """The newest checkpoint under ``root`` that ``verify`` passes, reporting each newer one as ``load_latest`` does."""
    found = _newest(Path(root), _check, report)
    return None if found is None else found[0]


def _newest(root: Path, attempt: Callable[[Path], Any], report: Report) -> tuple[Path, Any] | None:
    """The newest checkpoint on which ``attempt`` succeeds, with its result; one line per newer one that failed."""
    corrupt: list[tuple[Path, str]] = []
    found = None
    for ckpt in reversed(list_checkpoints(root)):
        try:
            found = (ckpt, attempt(ckpt))
        except Exception as error:  # noqa: BLE001 (any failure to load makes the checkpoint unusable)
            corrupt.append((ckpt, _one_line(error)))
            continue
        break
    using = f"using {found[0].name}" if found is not None else "no older intact checkpoint"
    for ckpt, reason in corrupt:
        report(f"checkpoint {ckpt.name} is corrupt ({reason}); {using}")
    return found


def _check_device(device: torch.device | str) -> torch.device:
    """The device, checked before any checkpoint is read: an unusable device must not pass for corrupt files."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise KeelError(f"device: {str(device)!r} cannot hold tensors here ({_one_line(error)})") from None
    return device


def prune(root: Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``protect`` (e.g. the best).

    Only listed checkpoints are candidates: stray names (``step_00000060.bak``) and directories without a manifest
    are never deleted.
    """
    checkpoints = list_checkpoints(root)
    for ckpt in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if ckpt.name not in protect:
            shutil.rmtree(ckpt)


def _one_line(error: BaseException) -> str:
    """The gist of an error message on one line (torch's weights-only refusals keep only their reason)."""
    text = _ANSI.sub("", str(error))
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if match:
        text = "refused: " + match.group(1).split(". ")[0].rstrip(".")
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
