"""The run directory, with one owner: its layout, its lock, and its checkpoints (write, list, validate, load, prune).

Layout::

    RUN/
      LOCK                    flocked while a process trains in RUN; its text {"pid", "host", "started"} (RunLock)
      config.yaml             the resolved config
      metrics.jsonl           one strict-JSON record per line (keel.rundir.metrics)
      loss.png  tensorboard/  snapshots/step_XXXXXXXX.safetensors
      model.safetensors       the final weights, written when the run ends
      averaged.safetensors    average.last: the mean of the last N checkpoints, written when the run ends
      restarts/               restarts: N: each failed attempt in attempt_<k>_seed_<seed>/, restarts.jsonl
      diagnosis.json  recommended.yaml  grad_norm.png  update_ratio.png     written by ``keel diagnose RUN``
      checkpoints/
        step_00000100/        one checkpoint: exactly "step_" and 8 digits
          model.safetensors   the weights
          state.pt            everything else: tensors and plain containers, read with torch.load(weights_only=True)
          ema.safetensors ... files callbacks add (raw.safetensors: the raw weights where model.safetensors holds
                              the EMA)
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

Every name above is spelled in ``keel.rundir.layout`` only; other code asks ``RunDir(path)`` for the paths.

Parts: ``layout`` (names, ``RunDir``, listings), ``files`` (durable writes), ``manifest`` (the completion marker and the
intact check), ``checkpoint`` (write, load, prune), ``lock`` (RunLock), ``start`` (starting and resuming),
``metrics`` (metrics.jsonl). This module re-exports their public names.
"""

from keel.errors import KeelError
from keel.rundir.checkpoint import (
    load_checkpoint,
    load_latest,
    newest_intact,
    point_best,
    point_latest,
    prune,
    write_checkpoint,
)
from keel.rundir.files import Report, atomic_write_text
from keel.rundir.layout import (
    AVERAGED_WEIGHTS,
    BEST,
    CHECKPOINTS,
    CONFIG,
    CONFIG_META_KEY,
    DIAGNOSIS,
    GRAD_NORM_PLOT,
    LATEST,
    LOCK,
    LOSS_PLOT,
    MANIFEST,
    METRICS,
    MODEL_WEIGHTS,
    RAW_WEIGHTS,
    RECOMMENDED,
    REQUIRED_FILES,
    RESTARTS,
    RESTARTS_RECORD,
    SNAPSHOT_FILE,
    SNAPSHOTS,
    STATE,
    STEP_DIR,
    TENSORBOARD,
    UPDATE_RATIO_PLOT,
    RunDir,
    checkpoint_step,
    checkpoint_weights,
    list_checkpoints,
    list_snapshots,
    run_of_checkpoint,
    snapshot_name,
    step_dir_name,
    step_dirs,
    weights_name,
)
from keel.rundir.lock import RunLock
from keel.rundir.manifest import read_manifest, verify
from keel.rundir.start import (
    check_new_run_dir,
    check_resume_dir,
    discard_new_run,
    prepare_run_dir,
    read_run_config,
)

__all__ = [
    "AVERAGED_WEIGHTS", "BEST", "CHECKPOINTS", "CONFIG", "CONFIG_META_KEY", "DIAGNOSIS", "GRAD_NORM_PLOT", "LATEST",
    "LOCK", "LOSS_PLOT", "MANIFEST", "METRICS", "MODEL_WEIGHTS", "RAW_WEIGHTS", "RECOMMENDED", "REQUIRED_FILES",
    "RESTARTS", "RESTARTS_RECORD", "SNAPSHOTS",
    "SNAPSHOT_FILE", "STATE", "STEP_DIR", "TENSORBOARD", "UPDATE_RATIO_PLOT", "KeelError", "Report", "RunDir",
    "RunLock", "atomic_write_text", "check_new_run_dir", "check_resume_dir", "checkpoint_step", "checkpoint_weights",
    "discard_new_run", "list_checkpoints", "list_snapshots", "load_checkpoint", "load_latest", "newest_intact",
    "point_best", "point_latest", "prepare_run_dir", "prune", "read_manifest", "read_run_config", "run_of_checkpoint",
    "snapshot_name", "step_dir_name", "step_dirs", "verify", "weights_name", "write_checkpoint",
]
