"""The run's metrics log: ``metrics.jsonl``, one strict-JSON record per line, flushed as it goes.

Every line parses with a strict JSON parser (no bare ``NaN`` or ``Infinity``, which are not JSON): a non-finite
float is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, and ``read_metrics`` turns those three
strings back into floats (anywhere in a record, so a string field holding exactly one of them reads as a float).
Finite floats are written with Python's shortest round-trip repr, so a logged loss read back is bitwise the logged
value.

Every record has a ``kind``: ``"step"`` (a training step), ``"eval"`` (an evaluation: ``val_loss``, ``val_*``),
``"event"`` (it has an ``"event"`` key: skipped, spike, rollback, stopped, metrics_gap, ...), ``"diagnostic"`` (a
periodic measurement of the model written with that kind, e.g. update-to-weight ratios: ``keel.diagnose``) or
``"run"`` (what a start of the run resolved: global batch, LR scaling, the optimizer's kernels; the trainer).
``MetricsLog.write`` adds it when the caller did not (``record_kind``); ``read_metrics`` adds it to records of
older logs.

On resume the file is cut back to its length at the checkpoint (``truncate_to``), so it never holds a step twice.
A log shorter than that length (records lost, or the file replaced) is never padded or cut: the missing part is
reported, writing continues at its end, and a ``metrics_gap`` event records how many bytes were expected and found.

Sinks (``add_sink``; ``keel.tracking``'s MLflow and W&B loggers) get every record after it is in the file, as
TensorBoard does; the log does not own them (closing it leaves them open), and a rollback's new log keeps them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel.errors import KeelError, naming_the_file

KINDS = ("step", "eval", "event", "diagnostic", "run")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def record_kind(record: dict[str, Any]) -> str:
    """``"event"`` if the record has an ``event`` key, ``"eval"`` if any key starts with ``val_``, else ``"step"``."""
    if "event" in record:
        return "event"
    if any(key.startswith("val_") for key in record):
        return "eval"
    return "step"


def encode_record(record: dict[str, Any]) -> str:
    """One strict-JSON line (without the newline) for ``record``: non-finite floats become strings."""
    return json.dumps(_encode(record), allow_nan=False)


def decode_line(line: str | bytes) -> dict[str, Any]:
    """The record of one line, parsed strictly; the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` become floats.

    ValueError when the line is not a strict-JSON object.
    """
    value = json.loads(line, parse_constant=_reject_constant)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return _decode(value)


#: Step records reach the file at most this many seconds late (a reader such as `keel diagnose` on a running run
#: sees them); every other record, and everything before a checkpoint, is flushed at once.
FLUSH_SECONDS = 0.25


class MetricsLog:
    """Appends records to ``path``; ``truncate_to`` (resume) first cuts it back to a checkpoint's ``offset()``.

    ``step``, when given, is the step the run resumes at (recorded in a ``metrics_gap`` event); ``report`` gets the
    one-line message about a gap.
    """

    def __init__(
        self,
        path: Path,
        truncate_to: int | None = None,
        *,
        step: int | None = None,
        report: Callable[[str], None] = print,
        sinks: list | None = None,
    ):
        self.path = Path(path)
        self.sinks: list = list(sinks or [])  # objects with write(record), called after each record is written
        gap = self._cut_back(truncate_to, report) if truncate_to is not None else None
        self._handle = open(self.path, "a")
        self._flushed = time.monotonic()
        self._tensorboard = None
        if gap is not None:
            found, expected = gap
            event = {"event": "metrics_gap", "expected_bytes": expected, "found_bytes": found}
            self.write({"kind": "event", **({"step": step} if step is not None else {}), **event})

    def _cut_back(self, offset: int, report: Callable[[str], None]) -> tuple[int, int] | None:
        """Cut the log to ``offset`` bytes; when it is shorter, return (its length, offset) instead of padding it."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size >= offset:
            if offset > 0:
                with open(self.path, "rb") as handle:
                    handle.seek(offset - 1)
                    boundary = handle.read(1) == b"\n"
                if not boundary:
                    raise KeelError(
                        f"metrics.jsonl: the checkpoint expects the log cut back to {offset} bytes, which is inside a "
                        f"line of '{self.path}' ({size} bytes): the log is not the one the checkpoint was written "
                        "with; allowed: move it aside (the run then continues in a new log) and resume again"
                    )
            if size > offset:
                with open(self.path, "r+b") as handle:
                    handle.truncate(offset)
            return None
        kept = size
        if size:
            with open(self.path, "rb") as handle:
                data = handle.read()
            kept = data.rfind(b"\n") + 1  # drop a final partial line: appending would glue a record to it
            if kept != size:
                with open(self.path, "r+b") as handle:
                    handle.truncate(kept)
        report(
            f"metrics.jsonl has {size} bytes, fewer than the {offset} the checkpoint expects: records were lost; "
            "nothing is cut or padded, new records follow the existing ones after a metrics_gap event"
        )
        return kept, offset

    def enable_tensorboard(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(str(log_dir))

    def add_sink(self, sink) -> None:
        """Also hand every record written from now on to ``sink.write(record)`` (``kind`` included)."""
        if sink not in self.sinks:
            self.sinks.append(sink)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with its ``kind`` (added when missing; one of KINDS when given)."""
        kind = record.get("kind", record_kind(record))
        if kind not in KINDS:
            raise KeelError(f"metrics record: kind {kind!r} is not a kind; allowed: {', '.join(KINDS)}")
        line = encode_record({"kind": kind, **record})
        with naming_the_file(self.path):
            self._handle.write(line + "\n")
            now = time.monotonic()
            if kind != "step" or now - self._flushed >= FLUSH_SECONDS:  # step records: at most FLUSH_SECONDS behind
                self._handle.flush()
                self._flushed = now
        for sink in self.sinks:
            sink.write({"kind": kind, **record})
        if self._tensorboard is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)

    def offset(self) -> int:
        """Bytes written so far, synced to disk (a checkpoint stores this to cut the log back on resume)."""
        with naming_the_file(self.path):
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, non-finite floats decoded and ``kind`` filled in for older logs.

    A final line without its newline that does not parse (a run killed while writing it) is ignored; any other line
    that is not a strict-JSON object is a KeelError naming the file and line.
    """
    records = []
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    last = len(lines) - 1  # after the final newline: b"" for a complete file
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = decode_line(line)
        except ValueError as error:
            if number - 1 == last:
                continue
            raise KeelError(f"metrics.jsonl: line {number} of '{path}' is not a strict-JSON record ({error})") from None
        record.setdefault("kind", record_kind(record))
        records.append(record)
    return records


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
