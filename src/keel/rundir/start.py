"""Starting and resuming a run: check and make its directory, read its config back."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from keel.errors import KeelError
from keel.rundir.checkpoint import _newest
from keel.rundir.files import Report, _describe
from keel.rundir.layout import (
    CHECKPOINTS,
    CONFIG,
    CONFIG_META_KEY,
    LOCK,
    METRICS,
    RUN_FILES,
    RUN_FOLDERS,
    list_checkpoints,
)
from keel.rundir.manifest import _check


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
        found = [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()]
        for name in RUN_FOLDERS:
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


def check_resume_dir(path: Path) -> None:
    """Refuse to resume ``path`` unless it is a directory holding config.yaml, metrics.jsonl or checkpoints/: the one
    rule for a run to resume (the trainer checks it before it builds anything, ``prepare_run_dir`` when it takes the
    directory). KeelError (one line) names what is wrong."""
    path = Path(path)
    try:
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise KeelError(f"--resume: '{path}' {what}; allowed: the directory of a keel run")
        if not any((path / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS)):
            raise KeelError(
                f"--resume: '{path}' is not a keel run directory (no {CONFIG}, {METRICS} or {CHECKPOINTS}/)"
            )
    except OSError as error:
        raise KeelError(f"--resume: cannot use '{path}' as a run directory ({_describe(error)})") from None


def prepare_run_dir(path: Path, resume: bool) -> Path:
    """Check and make the run directory; KeelError with the reason (one line) on any problem, never a traceback.

    New run: ``check_new_run_dir``, then create it (parents too). Resume: ``check_resume_dir``. Either way it must
    be writable. Take the ``RunLock`` right after this.
    """
    path = Path(path)
    option = "--resume" if resume else "out_dir"
    try:
        if resume:
            check_resume_dir(path)
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


def discard_new_run(path: Path, made: bool, task_files: Iterable[str] = ()) -> bool:
    """Remove what a new run that failed before its first checkpoint wrote in ``path``, so that the corrected
    command can start again there: the directory itself when the run ``made`` it, else the parts of a run
    (``RUN_FILES`` and ``RUN_FOLDERS``, what ``check_new_run_dir`` refuses; the lock removes itself) and the task's
    ``task_files``. True when removed; False, and nothing removed, once a checkpoint exists (``--resume`` continues
    the run)."""
    path = Path(path)
    if list_checkpoints(path / CHECKPOINTS):
        return False
    if made:
        shutil.rmtree(path, ignore_errors=True)
        return True
    for name in [*RUN_FILES, *RUN_FOLDERS, *task_files]:
        part = path / name
        if name == LOCK:
            continue
        shutil.rmtree(part, ignore_errors=True) if part.is_dir() and not part.is_symlink() else part.unlink(
            missing_ok=True)
    return True


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
    except UnicodeDecodeError as error:
        raise KeelError(f"{CONFIG}: '{path}' is not UTF-8 text (byte {error.start}); allowed: the YAML keel train "
                        "wrote") from None
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
