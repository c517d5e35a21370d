"""The run directory's layout: the name of every file, folder and pointer keel writes into a run, in one place.

Code outside ``keel.rundir`` never spells these names: it asks ``RunDir(path)`` for a path (``.config``,
``.metrics``, ``.checkpoints``, ``.checkpoint(step)``, ``.best_checkpoint()``, ...) or uses the names below. See
``keel.rundir`` for the whole layout and its rules.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError

# The run directory
CONFIG = "config.yaml"  # the resolved config
METRICS = "metrics.jsonl"  # one strict-JSON record per line (keel.rundir.metrics)
LOCK = "LOCK"  # held while a process trains in the run (keel.rundir.lock)
LOSS_PLOT = "loss.png"
MODEL_WEIGHTS = "model.safetensors"  # the run's final weights; in a checkpoint, its weights
TENSORBOARD = "tensorboard"
SNAPSHOTS = "snapshots"  # snapshot ensembles' step_XXXXXXXX.safetensors
CHECKPOINTS = "checkpoints"
# keel diagnose RUN writes these beside the run's own files
DIAGNOSIS = "diagnosis.json"
RECOMMENDED = "recommended.yaml"
GRAD_NORM_PLOT = "grad_norm.png"
UPDATE_RATIO_PLOT = "update_ratio.png"

# checkpoints/
LATEST = "latest"  # pointer: the name of the newest checkpoint
BEST = "best"  # pointer: the name of the best checkpoint by the tracked metric
# checkpoints/step_XXXXXXXX/
STATE = "state.pt"  # everything but the weights, read with torch.load(weights_only=True)
MANIFEST = "manifest.json"  # written last: the completion marker
RAW_WEIGHTS = "raw.safetensors"  # the raw weights where model.safetensors holds the EMA (ema.checkpoint_weights=ema)
AVERAGED_WEIGHTS = "averaged.safetensors"  # average.last: the mean of the last N checkpoints, beside model.safetensors
RESTARTS = "restarts"  # restarts: N: the failed attempts, each in attempt_<k>_seed_<seed>/
RESTARTS_RECORD = "restarts.jsonl"  # in restarts/: one line per restart
REQUIRED_FILES = (MODEL_WEIGHTS, STATE)
CONFIG_META_KEY = "config"  # manifest["meta"][CONFIG_META_KEY]: the run's config text

STEP_DIR = re.compile(r"step_(\d{8})")
SNAPSHOT_FILE = re.compile(r"step_(\d{8})\.safetensors")
RUN_FILES = (CONFIG, METRICS, LOCK, LOSS_PLOT)  # any of these, or a non-empty RUN_FOLDERS one, marks a run
RUN_FOLDERS = (CHECKPOINTS, SNAPSHOTS, TENSORBOARD)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory, by what they hold: ``RunDir("runs/x").metrics`` is ``runs/x/metrics.jsonl``.

    Only names; nothing is read or created (except ``best_checkpoint``, which reads the ``best`` pointer).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def model_weights(self) -> Path:
        """The final weights, written when the run ends."""
        return self.path / MODEL_WEIGHTS

    @property
    def averaged_weights(self) -> Path:
        """The mean of the last checkpoints (``average.last``), written when the run ends."""
        return self.path / AVERAGED_WEIGHTS

    @property
    def restarts(self) -> Path:
        """The failed attempts of a run with ``restarts`` (each in its own folder) and their record."""
        return self.path / RESTARTS

    def restart_attempt(self, attempt: int, seed: int) -> Path:
        return self.restarts / f"attempt_{attempt}_seed_{seed}"

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def snapshots(self) -> Path:
        return self.path / SNAPSHOTS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def best_pointer(self) -> Path:
        return self.checkpoints / BEST

    def checkpoint(self, step: int | str) -> Path:
        """The directory of checkpoint ``step`` (an int, or a checkpoint's name such as ``step_00000100``)."""
        return self.checkpoints / (step_dir_name(step) if isinstance(step, int) else step)

    def snapshot(self, step: int) -> Path:
        return self.snapshots / snapshot_name(step)

    def best_checkpoint(self) -> Path | None:
        """The checkpoint the ``best`` pointer names, when it names a checkpoint directory that exists; else None."""
        try:
            name = self.best_pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.checkpoints / name if checkpoint_step(name) is not None and (self.checkpoints / name).is_dir() \
            else None


def run_of_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The run directory that checkpoint ``ckpt_dir`` (or a run's ``checkpoints/`` folder) lies in, or None when it
    does not lie in one."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name == CHECKPOINTS:
        return ckpt_dir.parent
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == CHECKPOINTS else None


def weights_name(weights: str = "raw") -> str:
    """The file of a checkpoint holding its ``weights``: ``raw`` and ``model`` -> model.safetensors, ``ema`` ->
    ema.safetensors (an averaging callback's ``<name>.safetensors``); KeelError for a name that cannot be a file's."""
    if weights in ("raw", "model"):
        return MODEL_WEIGHTS
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", weights):
        raise KeelError(f"weights: {weights!r} is not a weights name; allowed: raw, model, ema, polyak, swa, ...")
    return f"{weights}.safetensors"


def checkpoint_weights(ckpt_dir: str | os.PathLike, weights: str = "raw") -> Path:
    """The weights file of checkpoint ``ckpt_dir`` for ``weights`` (``weights_name``): ``model`` its
    model.safetensors, whatever it holds; ``raw`` the trained weights, its raw.safetensors where it has one
    (``ema.checkpoint_weights: ema``: model.safetensors holds the EMA there)."""
    ckpt_dir = Path(ckpt_dir)
    if weights == "raw" and (ckpt_dir / RAW_WEIGHTS).is_file():
        return ckpt_dir / RAW_WEIGHTS
    return ckpt_dir / weights_name(weights)


def snapshot_name(step: int) -> str:
    """``step_00000100.safetensors``: the snapshot of step 100."""
    return f"{step_dir_name(step)}.safetensors"


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
