"""Checkpoint I/O: atomic writes, integrity manifests, keep-last-k plus best, fallback past corrupt ones.

Layout: ``checkpoints/step_00000100/`` holds ``model.safetensors`` (weights), ``state.pt`` (everything else:
tensors and plain containers only, read back with ``torch.load(weights_only=True)``, so nothing is unpickled)
and ``manifest.json`` (size and sha256 of every file, written last). A checkpoint is written into a temporary
directory beside its final place, each file fsynced, then renamed into place; ``checkpoints/latest`` names it
only after that, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from keel.errors import KeelError

MANIFEST = "manifest.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Weights as safetensors. Tied weights (one storage under two names, e.g. a language model's embedding and
    output layer) are written once per name, so the file loads back into the same module with every key."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    save_file(out, str(path))


def write_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``root/latest`` at it.

    ``extra(tmp_dir)`` may add files (callbacks' weights) before the manifest is written.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(weights, tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    if extra is not None:
        extra(tmp)
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"step": step, "files": files, "meta": meta}
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    return final


def verify(ckpt_dir: Path) -> str | None:
    """``None`` when the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = ckpt_dir / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as error:
        return f"manifest.json is unreadable ({error})"
    for name, expected in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (temporary ones left out)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_valid(root: Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint, reporting (and skipping) each newer one that is truncated or corrupt."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        report(f"checkpoint {ckpt.name} is unusable: {problem}; falling back to the previous one")
    return None


def load_checkpoint(ckpt_dir: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and state of a verified checkpoint; ``state.pt`` is read with ``weights_only=True``."""
    problem = verify(ckpt_dir)
    if problem is not None:
        raise KeelError(f"checkpoint '{ckpt_dir}' is unusable: {problem}")
    weights = load_file(str(ckpt_dir / "model.safetensors"), device=str(device))
    state = torch.load(ckpt_dir / "state.pt", map_location=device, weights_only=True)
    return weights, state


def prune(root: Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``protect`` (e.g. the best)."""
    checkpoints = list_checkpoints(root)
    for ckpt in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if ckpt.name not in protect:
            shutil.rmtree(ckpt)
