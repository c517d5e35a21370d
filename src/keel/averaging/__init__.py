"""Weight averaging and ensembles: EMA, Polyak, SWA, checkpoint averaging, snapshot and model ensembles."""

from keel.averaging import callbacks as _callbacks  # noqa: F401  (registers ema, polyak, swa, snapshot, average)
from keel.averaging.checkpoints import average_checkpoints, average_checkpoints_to_file, resolve_checkpoints
from keel.averaging.config import EMAConfig, PolyakConfig, SnapshotConfig, SWAConfig
from keel.averaging.ema import EMA
from keel.averaging.ensemble import evaluate_ensemble, predict, predict_proba
from keel.averaging.shadow import ShadowWeights
from keel.averaging.swa import SWA, Polyak, recompute_batchnorm, swa_learning_rate

__all__ = [
    "EMA",
    "evaluate_ensemble",
    "predict",
    "predict_proba",
    "Polyak",
    "SWA",
    "ShadowWeights",
    "recompute_batchnorm",
    "swa_learning_rate",
    "average_checkpoints",
    "average_checkpoints_to_file",
    "resolve_checkpoints",
    "EMAConfig",
    "PolyakConfig",
    "SWAConfig",
    "SnapshotConfig",
]
