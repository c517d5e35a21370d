"""Weight averaging and ensembles: EMA, Polyak, SWA, checkpoint averaging, snapshot and model ensembles."""

from keel.averaging.config import EMAConfig, PolyakConfig, SnapshotConfig, SWAConfig, make_callbacks

__all__ = ["EMAConfig", "PolyakConfig", "SWAConfig", "SnapshotConfig", "make_callbacks"]
