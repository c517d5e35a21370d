"""The run directory's layout: the name of every file and folder keel writes into a run, and the listings.

See ``keel.rundir`` for the whole layout and its rules.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
RUN_FILES = (CONFIG, METRICS, LOCK, "loss.png")
RUN_FOLDERS = (CHECKPOINTS, "snapshots", "tensorboard")


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
