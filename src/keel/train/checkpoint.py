"""Checkpoint I/O, kept under its old names for the trainer and the averaging callbacks: see ``keel.train.rundir``.

Everything is ``keel.train.rundir``'s except two names whose meaning the current trainer relies on:
``list_checkpoints`` lists every directory named ``step_XXXXXXXX``, with or without its manifest (so that "no
checkpoint was ever written" differs from "none is intact"), and ``latest_valid`` reports each unusable one as
``checkpoint step_X is unusable: <reason>; falling back to the previous one``. New code uses ``rundir.load_latest``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from keel.train.rundir import (
    LATEST,
    MANIFEST,
    atomic_write_text,
    load_checkpoint,
    prune,
    step_dir_name,
    step_dirs,
    verify,
    write_checkpoint,
)

__all__ = [
    "LATEST",
    "MANIFEST",
    "atomic_write_text",
    "latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "prune",
    "step_dir_name",
    "verify",
    "write_checkpoint",
]


def list_checkpoints(root: Path) -> list[Path]:
    """Directories under ``root`` named exactly ``step_XXXXXXXX``, oldest first, complete or not."""
    return step_dirs(root)


def latest_valid(root: Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint, reporting (and skipping) each newer one that is incomplete or corrupt."""
    for ckpt in reversed(step_dirs(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        report(f"checkpoint {ckpt.name} is unusable: {problem}; falling back to the previous one")
    return None
