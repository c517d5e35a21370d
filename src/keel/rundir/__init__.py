"""The run directory, with one owner: its layout, its lock, and its checkpoints (write, list, validate, load, prune).

Layout::

    RUN/
      LOCK                    {"pid", "host", "started"} while a process trains in RUN (RunLock)
      config.yaml             the resolved config
      metrics.jsonl           one strict-JSON record per line (keel.rundir.metrics)
      loss.png  tensorboard/  snapshots/step_XXXXXXXX.safetensors
      checkpoints/
        step_00000100/        one checkpoint: exactly "step_" and 8 digits
          model.safetensors   the weights
          state.pt            everything else: tensors and plain containers, read with torch.load(weights_only=True)
          ema.safetensors ... files callbacks add
          manifest.json       written last, the completion marker: {"step", "files": {name: {"bytes", "sha256"}},
                              "meta"}; meta["config"] holds the run's config text when the trainer stores it
        latest  best          the names of the newest and the best checkpoint written
        .tmp-step_00000100/   a write in progress

Rules (torchtitan treats a checkpoint without its completion marker as absent; so does keel):

* A checkpoint is a directory named exactly ``step_`` + 8 digits holding ``manifest.json``. Anything else under
  ``checkpoints/`` (``step_12``, ``step_00000060.bak``, a directory without a manifest) is not listed, never
  loaded and never pruned.
* A checkpoint is intact when its manifest has the expected shape, lists exactly the files in the directory
  (at least ``model.safetensors`` and ``state.pt``), each with its size and sha256, and every ``*.safetensors``
  file in it has a well-formed header. Loading also fails on a ``state.pt`` that is not a weights-only pickle of
  a dict holding the keys asked for.
* Loading walks the checkpoints newest first and takes the newest one that loads; each newer one that does not is
  reported in one line, ``checkpoint step_X is corrupt (<reason>); using step_Y``, and left where it is.
* A checkpoint is written into ``.tmp-step_X/``, each file fsynced, the manifest last, then renamed into place, so a
  crash or a full disk at any moment leaves the older checkpoints as they were.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from keel.errors import KeelError, naming_the_file

# keel.safetensors_io is imported inside the functions that use it: keel.averaging imports this module.

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = "LOCK"
MANIFEST = "manifest.json"
LATEST = "latest"
REQUIRED_FILES = ("model.safetensors", "state.pt")
CONFIG_META_KEY = "config"  # manifest["meta"][CONFIG_META_KEY]: the run's config text

STEP_DIR = re.compile(r"step_(\d{8})")
SNAPSHOT_FILE = re.compile(r"step_(\d{8})\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_FILES = (CONFIG, METRICS, LOCK, "loss.png")
_RUN_FOLDERS = (CHECKPOINTS, "snapshots", "tensorboard")

Report = Callable[[str], None]


# ------------------------------------------------------------------------------------------ layout and listing


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100: the name of checkpoint ``step``."""
    return f"step_{step:08d}"


def checkpoint_step(name: str | os.PathLike) -> int | None:
    """The step a checkpoint directory name stands for, or None when the name is not exactly ``step_`` + 8 digits."""
    match = STEP_DIR.fullmatch(Path(name).name)
    return int(match.group(1)) if match else None


def step_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` named like a checkpoint, complete or not, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).iterdir() if checkpoint_step(p.name) is not None and p.is_dir())


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under ``root`` (a run's ``checkpoints/``), oldest first: named exactly, manifest written.

    Whether they are intact is not checked here (see ``verify``); a directory without its manifest is absent.
    """
    return [p for p in step_dirs(root) if (p / MANIFEST).is_file()]


def list_snapshots(folder: Path) -> list[Path]:
    """The snapshot files ``step_XXXXXXXX.safetensors`` in ``folder``, oldest first (other names are not snapshots)."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if SNAPSHOT_FILE.fullmatch(p.name) and p.is_file())


# ------------------------------------------------------------------------------------------ writing


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
    try:
        with naming_the_file(path), open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
        write_safetensors(tmp / "model.safetensors", weights)
        _save_state(state, tmp / "state.pt")
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
    pointer = Path(root) / LATEST
    try:
        if pointer.read_text().strip() == ckpt.name:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(pointer, ckpt.name + "\n")


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


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0)
    what = error.strerror or str(error)
    return f"{what}, {name}" if name else what


# ------------------------------------------------------------------------------------------ validation


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


# ------------------------------------------------------------------------------------------ loading


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu", required: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and payload (``state.pt``) of checkpoint ``ckpt_dir``, checked by ``verify`` first.

    ``state.pt`` is read with ``torch.load(weights_only=True)``; it must hold a dict with every key in ``required``.
    Any failure is a KeelError naming the checkpoint and the reason.
    """
    device = _check_device(device)
    try:
        return _load(Path(ckpt_dir), device, tuple(required))
    except _Corrupt as problem:
        raise KeelError(f"checkpoint '{ckpt_dir}' is corrupt: {problem}") from None


def _load(ckpt_dir: Path, device: torch.device, required: tuple[str, ...]):
    _check(ckpt_dir)
    try:
        weights = load_file(str(ckpt_dir / "model.safetensors"), device=str(device))
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
        raise _Corrupt(f"model.safetensors cannot be loaded ({_one_line(error)})") from None
    try:
        payload = torch.load(ckpt_dir / "state.pt", map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 (UnpicklingError, RuntimeError, EOFError, ...)
        raise _Corrupt(f"state.pt cannot be loaded with weights_only=True ({_one_line(error)})") from None
    if not isinstance(payload, dict):
        raise _Corrupt(f"state.pt holds a {type(payload).__name__}, not a dict")
    missing = [key for key in required if key not in payload]
    if missing:
        raise _Corrupt(f"state.pt lacks {', '.join(map(repr, missing))}")
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
    (or there is none; directories without a manifest do not count).
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


# ------------------------------------------------------------------------------------------ the lock


class RunLock:
    """Exclusive use of a run directory: the file ``RUN/LOCK`` holding ``{"pid", "host", "started"}``.

    Created with O_CREAT|O_EXCL (atomic) and held with ``fcntl.flock`` for as long as the lock is. A second process
    is refused with a KeelError naming the holder's PID and host. A lock left by a process that is gone (same host,
    PID not running, flock free) is taken over with a message; one from another host is never taken over, since its
    process cannot be checked from here. ``release`` (or leaving the ``with`` block) deletes the file.

        with RunLock(run_dir):
            ...  # train
    """

    unreadable_grace_s = 1.0  # how long an unreadable LOCK is given to show its JSON before it counts as stale

    def __init__(self, run_dir: Path, report: Report = print) -> None:
        self.path = Path(run_dir) / LOCK
        self.report = report
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        stale_fd = None
        try:
            for _ in range(50):
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    taken = self._examine(me)  # raises when the holder is alive; else the stale lock's fd
                    if taken is not None:
                        if stale_fd is not None:
                            os.close(stale_fd)
                        stale_fd = taken
                    continue
                try:
                    os.write(fd, (json.dumps(me) + "\n").encode())
                    os.fsync(fd)
                    _flock(fd, blocking=True)  # someone examining the new file holds it for a moment at most
                except BaseException:
                    os.close(fd)
                    self.path.unlink(missing_ok=True)
                    raise
                self._fd = fd
                return self
        except OSError as error:
            raise KeelError(f"run directory '{self.path.parent}': cannot create {LOCK} ({_describe(error)})") from None
        finally:
            if stale_fd is not None:
                os.close(stale_fd)
        raise KeelError(f"run directory '{self.path.parent}': could not take {LOCK} (other processes keep taking it)")

    def _examine(self, me: dict[str, Any]) -> int | None:
        """Look at an existing lock: raise when its holder may be alive; else remove it and return its open fd."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # released meanwhile: try again
        try:
            holder = _read_holder(fd)
            deadline = time.monotonic() + self.unreadable_grace_s
            while holder is None and time.monotonic() < deadline:  # a lock just created may not hold its JSON yet
                time.sleep(0.02)
                holder = _read_holder(fd)
            free = _flock(fd, blocking=False)
            pid, host = (holder or {}).get("pid"), (holder or {}).get("host")
            who = f"PID {pid} on host {host}" if holder is not None else "an unknown process (LOCK is unreadable)"
            alive = holder is not None and (host != me["host"] or (pid != me["pid"] and _pid_alive(pid)))
            if not free or alive:
                if not free and holder is not None and host == me["host"] and not _pid_alive(pid):
                    who += " (that PID is gone, but a process, perhaps a child of it, still holds the lock)"
                elif host != me["host"] and holder is not None:
                    who += f", another host, whose process cannot be checked from here (delete {self.path} only if " \
                        "that process is gone)"
                raise KeelError(
                    f"run directory '{self.path.parent}' is in use: {LOCK} is held by {who}; "
                    "allowed: wait for that run to end, or another --out"
                )
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return None  # replaced meanwhile: look again
            os.unlink(self.path)
            self.report(f"took over the stale lock {self.path} of {who} (that process is gone)")
            return fd  # held (and flocked) until the new lock exists, so no one else takes over the same one
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        """Delete ``LOCK`` (if it is still this lock's file) and let go of it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int, blocking: bool) -> bool:
    """Take an exclusive flock; False when another open file holds it. Filesystems without flock count as free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True  # the PID check alone decides
        raise
    return True


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


# ------------------------------------------------------------------------------------------ starting and resuming


def check_new_run_dir(path: Path) -> None:
    """Refuse to start a new run in ``path`` when it holds any part of another run; a new or unrelated dir is fine.

    Parts of a run: config.yaml, metrics.jsonl, LOCK, loss.png, and non-empty checkpoints/, snapshots/,
    tensorboard/. KeelError names what is there and what is allowed (``--resume PATH`` or another ``--out``).
    """
    path = Path(path)
    try:
        if not path.exists():
            return
        if not path.is_dir():
            raise KeelError(f"out_dir: '{path}' is a file; allowed: a new directory, or --resume DIR for a run")
        found = [name for name in _RUN_FILES if (path / name).exists() or (path / name).is_symlink()]
        for name in _RUN_FOLDERS:
            folder = path / name
            if folder.is_dir():
                entries = len(os.listdir(folder))
                if entries:
                    found.append(f"{name}/ ({entries} {'entry' if entries == 1 else 'entries'})")
            elif folder.exists():
                found.append(name)
    except OSError as error:
        raise KeelError(f"out_dir: cannot use '{path}' as a run directory ({_describe(error)})") from None
    if found:
        raise KeelError(
            f"out_dir: '{path}' already holds (part of) a run: {', '.join(found)}; allowed: --resume {path} to "
            "continue it, or another --out"
        )


def prepare_run_dir(path: Path, resume: bool) -> Path:
    """Check and make the run directory; KeelError with the reason (one line) on any problem, never a traceback.

    New run: ``check_new_run_dir``, then create it (parents too). Resume: it must exist and hold config.yaml,
    metrics.jsonl or checkpoints/. Either way it must be writable. Take the ``RunLock`` right after this.
    """
    path = Path(path)
    option = "--resume" if resume else "out_dir"
    try:
        if resume:
            if not path.is_dir():
                what = "is a file" if path.exists() else "does not exist"
                raise KeelError(f"--resume: '{path}' {what}; allowed: the directory of a keel run")
            if not any((path / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS)):
                raise KeelError(
                    f"--resume: '{path}' is not a keel run directory (no {CONFIG}, {METRICS} or {CHECKPOINTS}/)"
                )
        else:
            check_new_run_dir(path)
            path.mkdir(parents=True, exist_ok=True)
        try:
            fd, probe = tempfile.mkstemp(prefix=".keel-write-probe-", dir=path)
        except OSError as error:
            raise KeelError(f"{option}: cannot write in '{path}' ({_describe(error)})") from None
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        where = f" at '{error.filename}'" if error.filename and Path(error.filename) != path else ""
        raise KeelError(f"{option}: cannot use '{path}' as a run directory ({_describe(error)}){where}") from None
    return path


def read_run_config(run_dir: Path, report: Report = print) -> str | None:
    """The run's config text: ``config.yaml``, or when it is missing, the one stored in the newest intact checkpoint.

    The stored one is ``manifest["meta"]["config"]``; using it is reported. None when neither exists.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    try:
        if path.is_file():
            return path.read_text()
    except OSError as error:
        raise KeelError(f"{CONFIG}: cannot read '{path}' ({_describe(error)})") from None
    found = _newest(run_dir / CHECKPOINTS, _check, report=lambda message: None)
    if found is None:
        return None
    found, manifest = found
    text = manifest.get("meta", {}).get(CONFIG_META_KEY)
    if not isinstance(text, str):
        report(f"{CONFIG} is missing from '{run_dir}', and checkpoint {found.name} stores no config")
        return None
    report(f"{CONFIG} is missing from '{run_dir}'; using the config stored in checkpoint {found.name}")
    return text


# ------------------------------------------------------------------------------------------ helpers


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _one_line(error: BaseException) -> str:
    """The gist of an error message on one line (torch's weights-only refusals keep only their reason)."""
    text = _ANSI.sub("", str(error))
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if match:
        text = "refused: " + match.group(1).split(". ")[0].rstrip(".")
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _without_path(message: str, path: Path) -> str:
    return message.replace(f"checkpoint {str(path)!r}: ", "")
