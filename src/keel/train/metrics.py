"""The run's metrics log: ``metrics.jsonl``, one JSON record per line, flushed as it goes.

Floats are written with Python's shortest round-trip repr, so a logged loss read back is bitwise the logged
value. On resume the file is cut back to its length at the checkpoint, so it never holds a step twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as handle:
                handle.truncate(truncate_to)
        self._handle = open(path, "a")
        self._tensorboard = None

    def enable_tensorboard(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._tensorboard is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)

    def offset(self) -> int:
        """Bytes written so far, synced to disk (a checkpoint stores this to cut the log back on resume)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a final partial line, from a killed run, is ignored)."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
