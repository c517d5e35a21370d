"""A checkpoint's manifest (``manifest.json``, its completion marker) and the check that the checkpoint is intact."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keel.errors import KeelError
from keel.rundir.files import _describe, _sha256
from keel.rundir.layout import MANIFEST, REQUIRED_FILES, checkpoint_step

_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Corrupt(Exception):
    """Why a checkpoint cannot be used (internal: callers get a KeelError or a one-line report)."""


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``ckpt_dir``, its shape checked; KeelError saying what is wrong otherwise."""
    try:
        return _read_manifest(Path(ckpt_dir))
    except _Corrupt as problem:
        raise KeelError(f"checkpoint '{ckpt_dir}' is corrupt: {problem}") from None


def _read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise _Corrupt(f"no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError) as error:  # ValueError: JSON and UTF-8 decoding
        raise _Corrupt(f"{MANIFEST} is not readable JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise _Corrupt(f"{MANIFEST} holds a JSON {_json_type(manifest)}, not an object")
    step, expected = manifest.get("step"), checkpoint_step(ckpt_dir.name)
    if not _is_count(step):
        raise _Corrupt(f"{MANIFEST}: step is {_short(step)}; allowed: a non-negative integer")
    if expected is not None and step != expected:
        raise _Corrupt(f"{MANIFEST}: step is {step}, but the directory is {ckpt_dir.name}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise _Corrupt(f"{MANIFEST}: files is {_short(files)}; allowed: an object naming each file")
    for name, entry in files.items():
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise _Corrupt(f"{MANIFEST}: {name!r} is not a file name of a checkpoint")
        if not isinstance(entry, dict):
            raise _Corrupt(f"{MANIFEST}: the entry of {name} is {_short(entry)}; allowed: {{bytes, sha256}}")
        if not _is_count(entry.get("bytes")):
            raise _Corrupt(f"{MANIFEST}: {name} has bytes {_short(entry.get('bytes'))}; allowed: an integer >= 0")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise _Corrupt(f"{MANIFEST}: {name} has sha256 {_short(sha)}; allowed: 64 lowercase hex digits")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise _Corrupt(f"{MANIFEST} does not list {', '.join(missing)}")
    if not isinstance(manifest.get("meta", {}), dict):
        raise _Corrupt(f"{MANIFEST}: meta is {_short(manifest['meta'])}; allowed: an object")
    return manifest


def _check(ckpt_dir: Path, only: Iterable[str] | None = None) -> dict[str, Any]:
    """Check ``ckpt_dir`` (or, with ``only``, its manifest and those files); return the manifest or raise _Corrupt."""
    from keel.safetensors_io import read_header

    manifest = _read_manifest(ckpt_dir)
    files = manifest["files"]
    try:
        present = {p.name for p in ckpt_dir.iterdir()} - {MANIFEST}
    except OSError as error:
        raise _Corrupt(f"cannot list it ({_describe(error)})") from None
    missing = sorted(set(files) - present)
    if missing:
        raise _Corrupt(f"{missing[0]} is missing")
    unlisted = sorted(present - set(files))
    if unlisted:
        raise _Corrupt(f"{unlisted[0]} is not listed in {MANIFEST}")
    for name in files if only is None else only:
        if name not in files:
            raise _Corrupt(f"{name} is not listed in {MANIFEST}")
        path, expected = ckpt_dir / name, files[name]
        if not path.is_file():
            raise _Corrupt(f"{name} is not a file")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise _Corrupt(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if _sha256(path) != expected["sha256"]:
            raise _Corrupt(f"{name} does not match its sha256 in the manifest")
        if name.endswith(".safetensors"):
            try:
                read_header(path)
            except KeelError as error:
                raise _Corrupt(f"{name}: {_without_path(str(error), path)}") from None
    return manifest


def verify(ckpt_dir: Path, files: Iterable[str] | None = None) -> str | None:
    """None when checkpoint ``ckpt_dir`` is complete and intact, else what is wrong with it (one line).

    Checks the manifest's shape, that it lists exactly the files present, and each file's size, sha256 and (for
    ``*.safetensors``) header. With ``files``, only those files' contents are checked (the rest of the list still is).
    """
    try:
        _check(Path(ckpt_dir), files)
    except _Corrupt as problem:
        return str(problem)
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."



def _without_path(message: str, path: Path) -> str:
    return message.replace(f"checkpoint {str(path)!r}: ", "")
