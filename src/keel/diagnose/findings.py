"""A diagnosis: findings, each with the numbers behind it and a recommendation; written as ``diagnosis.json``.

A finding has a ``kind`` (what was found: ``overfitting``, ``unstable_config``, ...), a ``severity`` (``info``,
``warning``: worth acting on, ``error``: the run or config does not train as it is), ``evidence`` (the steps and
values it rests on, never empty), a one-line ``message`` and a concrete ``recommendation``. ``changes`` holds the
config keys the recommendation sets (dotted key -> value); ``recommended.yaml`` is the config with them applied.

``diagnosis.json``::

    {"source": "run" | "config", "target": "<run dir or config file>", "findings": [...],
     "skipped": [{"procedure", "reason", "minimum"}], "timings": {procedure: seconds},
     "data": {...series the plots are drawn from...}, "changes": {...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keel.config import set_dotted
from keel.errors import KeelError
from keel.rundir.layout import DIAGNOSIS, RECOMMENDED

SEVERITIES = ("info", "warning", "error")


@dataclass
class Finding:
    kind: str
    severity: str
    message: str
    evidence: dict[str, Any]
    recommendation: str
    changes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}; allowed: {', '.join(SEVERITIES)}")
        if not self.evidence:
            raise ValueError(f"finding {self.kind!r} has no evidence")

    def evidence_text(self) -> str:
        """The evidence as ``key=value`` pairs, numbers rounded for reading."""
        return "; ".join(f"{key}={_short(value)}" for key, value in self.evidence.items())


@dataclass
class Skipped:
    """A procedure that could not run: why, and what it needs (``minimum``)."""

    procedure: str
    reason: str
    minimum: str = ""
    bad_input: bool = True  # True: the run or the budget is too small (exit 2); False: nothing to diagnose

    def line(self) -> str:
        need = f" (needs {self.minimum})" if self.minimum else ""
        return f"{self.procedure}: {self.reason}{need}"


@dataclass
class Diagnosis:
    source: str
    target: str
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, finding: Finding | None) -> None:
        if finding is not None:
            self.findings.append(finding)

    def skip(self, procedure: str, reason: str, minimum: str = "", bad_input: bool = True) -> None:
        self.skipped.append(Skipped(procedure, reason, minimum, bad_input))

    @property
    def changes(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for finding in self.findings:
            merged.update(finding.changes)
        return merged

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target,
                "findings": [asdict(f) for f in self.findings],
                "skipped": [asdict(s) for s in self.skipped],
                "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "data": self.data, "changes": self.changes}

    def write(self, folder: Path) -> Path:
        """Write ``diagnosis.json`` into ``folder`` (strict JSON: non-finite numbers become strings)."""
        from keel.rundir import atomic_write_text
        from keel.rundir.metrics import _encode

        path = Path(folder) / DIAGNOSIS
        atomic_write_text(path, json.dumps(_encode(_builtin(self.to_json())), indent=1, allow_nan=False) + "\n")
        return path


def read_diagnosis(path: str | Path) -> Diagnosis:
    """A ``diagnosis.json`` (or the one in a folder) read back."""
    from keel.rundir.metrics import _decode

    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSIS
    try:
        raw = _decode(json.loads(path.read_text()))
        return Diagnosis(raw["source"], raw["target"], [Finding(**f) for f in raw["findings"]],
                         [Skipped(**s) for s in raw.get("skipped", [])], raw.get("timings", {}), raw.get("data", {}))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeelError(f"{path}: not a readable diagnosis ({type(error).__name__}: {error}); allowed: a "
                        f"{DIAGNOSIS} written by keel diagnose") from None


def write_recommended(folder: Path, raw_config: dict[str, Any], changes: dict[str, Any], source: str,
                      notes: list[str] | None = None) -> Path:
    """``recommended.yaml``: ``raw_config`` with ``changes`` applied, validated (so ``keel train`` accepts it) and
    written fully resolved, with a comment naming each change. ``out_dir`` is cleared: the config trains anew.

    A run made through the Python API records ``task: python`` (its task was an object, which no config can
    rebuild): the file then starts by saying how to use it, from Python with the same task, or with ``keel train``
    once ``task`` names a factory."""
    import copy

    from keel.config import dump_config, validate
    from keel.rundir import atomic_write_text
    from keel.tasks import PYTHON_TASK

    raw = copy.deepcopy(raw_config)
    for key, value in changes.items():
        set_dotted(raw, key, value)
    raw["out_dir"] = None
    config = validate(raw)
    header = [f"# recommended by keel diagnose from {source}"]
    header += [f"#   {key}: {json.dumps(value)}" for key, value in changes.items()] or ["#   (no changes)"]
    header += [f"# {line}" for line in notes or []]
    if config.task == PYTHON_TASK:
        header += ["# task: python: this run's task was a Python object passed to keel.train(), which keel train "
                   "cannot rebuild.", "# Use this file from Python with the same task:",
                   "#   from keel.config import load_config; from keel.train import train",
                   "#   train(load_config('recommended.yaml'), task=your_task)   # or model=..., train_data=...",
                   "# or, for keel train, replace `task: python` with `task: package.module:factory` (a function "
                   "that returns the task)."]
    path = Path(folder) / RECOMMENDED
    atomic_write_text(path, "\n".join(header) + "\n" + dump_config(config))
    return path


def _builtin(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists, recursively (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_builtin(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_short(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:8]) + "}"
    return str(value)
