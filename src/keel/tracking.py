"""Experiment tracking: MLflow and Weights & Biases beside the TensorBoard writer (the config's ``log:`` block).

```yaml
log:
  mlflow: true                      # or a tracking URI: sqlite:///mlflow.db, http://mlflow.team:5000
  wandb: {project: keel-lm}         # offline unless WANDB_MODE=online / WANDB_API_KEY is set / mode: online
```

A ``Tracker`` is the logger interface: ``start`` (the run's config as parameters, tags), ``log_metrics`` (each
record of ``metrics.jsonl`` as it is written), ``log_artifact`` and ``set_summary`` at the end (``loss.png``,
``config.yaml``, the final metrics and the best checkpoint's path), ``finish`` with a status. ``TrackingCallback``
(registered as the ``log`` technique) owns the trackers of one run: it hands them the metrics log's records as a
sink (``MetricsLog.add_sink``), keeps their run ids in its checkpointed state so ``--resume`` continues the same
tracked run, and ends them. A run that stops with an error is ended as failed (``end_open_runs``, also at exit).

MLflow defaults to a local store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db`` in the working
directory (MLflow 3's own default; ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it); a team gives
its tracking server's URL. W&B runs offline (``wandb sync`` uploads later) unless online was asked for.
Both are optional extras: ``pip install 'keel[mlflow]'``, ``'keel[wandb]'``.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel import rundir
from keel.errors import KeelError
from keel.techniques import Callback, register_technique

__all__ = ["LogConfig", "MLflowTracker", "Tracker", "TrackingCallback", "WandbTracker", "end_open_runs", "run_tags"]


class _Switch(BaseModel):
    """A tracker's block: ``true`` turns it on with defaults, a string is its main setting."""

    model_config = ConfigDict(extra="forbid")
    shorthand_key: ClassVar[str] = ""
    enabled: bool = Field(False, description="Log every run to it.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, str):
            return {"enabled": True, cls.shorthand_key: value}
        if isinstance(value, dict) and value and "enabled" not in value:  # {project: x} turns it on
            return {"enabled": True, **value}
        return value


class MLflowConfig(_Switch):
    shorthand_key: ClassVar[str] = "tracking_uri"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (null: MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db in the working directory); a server URL for teams.")
    experiment: str = Field("keel", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name (null: the run directory's name).")


class WandbConfig(_Switch):
    shorthand_key: ClassVar[str] = "project"
    project: str = Field("keel", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user; null: the account's default).")
    mode: Literal["offline", "online"] | None = Field(
        None, description="null: WANDB_MODE when set, online when WANDB_API_KEY is set, else offline.")
    dir: str | None = Field(None, description="Where W&B writes its files (null: the run directory).")
    run_name: str | None = Field(None, description="Run name (null: the run directory's name).")


class LogConfig(BaseModel):
    """``log:`` — experiment trackers every run (and every sweep trial) logs to, besides ``tensorboard``."""

    model_config = ConfigDict(extra="forbid")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="after")
    def _installed(self) -> "LogConfig":
        for key, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
            if getattr(self, key).enabled:
                try:
                    __import__(module)
                except ImportError:
                    raise KeelError(f"log.{key}: turned on, but the {module} package is not installed (pip install "
                                    f"'keel[{key}]'); allowed without it: log.{key}: false") from None
        return self


# ------------------------------------------------------------------------------------------ the trackers


class Tracker:
    """The logger interface. ``run_id`` (after ``start``) lets a resumed run continue the same tracked run."""

    run_id: str | None = None

    def start(self, name: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path,
              run_id: str | None = None) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def set_summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, status: str) -> None:
        """``status``: finished, failed or killed."""


class MLflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (no global active run, so trials in one process do not collide).
    Metrics are sent in batches: at each evaluation, every 500 records and at the end."""

    def __init__(self, config: MLflowConfig):
        self.config = config
        self._buffer: list = []

    def start(self, name, config, tags, run_dir, run_id=None):
        from mlflow import MlflowClient

        uri = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else \
            _create_experiment(self.client, self.config.experiment)
        run = self.client.create_run(experiment_id, run_name=self.config.run_name or name,
                                     tags={"keel.run_dir": str(run_dir), **tags})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, _short(value)) for key, value in _flatten(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(key, value, now, step) for key, value in metrics.items())
        if len(self._buffer) >= 500 or any(key.startswith("val_") for key in metrics):
            self.flush()

    def flush(self):
        while self._buffer:
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def set_summary(self, values):
        for key, value in values.items():
            self.client.set_tag(self.run_id, f"keel.{key}", _short(value))

    def finish(self, status):
        self.flush()
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED"}.get(status,
                                                                                                       "KILLED"))


def _create_experiment(client, name: str) -> str:
    try:
        return client.create_experiment(name)
    except Exception:  # another process (a sweep worker) created it first
        return client.get_experiment_by_name(name).experiment_id


class WandbTracker(Tracker):
    """Weights & Biases, offline unless online was asked for (``WandbConfig.mode``)."""

    def __init__(self, config: WandbConfig):
        self.config = config

    def start(self, name, config, tags, run_dir, run_id=None):
        import wandb

        mode = self.config.mode or os.environ.get("WANDB_MODE") or \
            ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        directory = Path(self.config.dir) if self.config.dir else Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.config.project, entity=self.config.entity, dir=str(directory),
                              name=self.config.run_name or name, config=config, mode=mode, reinit="create_new",
                              tags=[f"{k}={v}" for k, v in tags.items()], id=run_id,
                              resume="allow" if run_id else None, settings=wandb.Settings(silent=True))
        self.run_id = self.run.id

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_artifact(self, path):
        import shutil

        name = Path(path).name
        name = f"keel-{name}" if name == rundir.CONFIG else name  # W&B keeps its own config.yaml there
        shutil.copy2(path, Path(self.run.dir) / name)  # the run's files/ folder is synced with it

    def set_summary(self, values):
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "finished" else 1)


# ------------------------------------------------------------------------------------------ the trainer adapter

#: Extra tags for the runs started in this context (``keel sweep`` tags each trial with its study and number).
_TAGS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("keel_tracking_tags", default={})
_OPEN: list["TrackingCallback"] = []


@contextlib.contextmanager
def run_tags(tags: dict[str, str]):
    """Tag every tracked run started inside the block (``with run_tags({"keel.trial": "3"}): train(...)``)."""
    token = _TAGS.set({**_TAGS.get(), **tags})
    try:
        yield
    finally:
        _TAGS.reset(token)


def end_open_runs(status: str = "failed", reason: str | None = None) -> None:
    """End every tracked run of this process that is still open (a run that stopped with an error)."""
    for callback in list(_OPEN):
        callback.finish(status, reason)


atexit.register(end_open_runs, "failed", "the process exited before the run ended")


class TrackingCallback(Callback):
    """Starts the configured trackers with the run, streams the metrics log to them, ends them with the run."""

    name = "tracking"

    def __init__(self, config: LogConfig):
        self.trackers: dict[str, Tracker] = {}
        if config.mlflow.enabled:
            self.trackers["mlflow"] = MLflowTracker(config.mlflow)
        if config.wandb.enabled:
            self.trackers["wandb"] = WandbTracker(config.wandb)
        self._saved_ids: dict[str, str] = {}
        self._started = False

    def on_run_start(self, trainer) -> None:
        trainer.metrics.add_sink(self)
        if self._started:  # a loss-spike rollback calls on_run_start again
            return
        config = trainer.config.model_dump(mode="json")
        for key, tracker in self.trackers.items():
            tracker.start(trainer.run_dir.name, config, dict(_TAGS.get()), trainer.run_dir.resolve(),
                          run_id=self._saved_ids.get(key))
        self._started = True
        _OPEN.append(self)

    def write(self, record: dict[str, Any]) -> None:
        """A metrics record (the ``MetricsLog`` sink): its finite numbers, at its step."""
        metrics = {key: float(value) for key, value in record.items()
                   if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value)}
        if record.get("kind") == "event":
            metrics = {f"event_{record.get('event')}": 1.0}
        elif record.get("kind") == "run":
            return  # what a start resolved: the tracker has the config, and the file keeps the record
        step = int(record.get("step", 0))
        for tracker in self.trackers.values():
            tracker.log_metrics(metrics, step)

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        run_dir = rundir.RunDir(trainer.run_dir)
        state = trainer.state
        best = str(run_dir.checkpoint(state.best_checkpoint).resolve()) if state.best_checkpoint else ""
        values = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        values["best_checkpoint"] = best
        for tracker in self.trackers.values():
            tracker.set_summary(values)
            for path in (run_dir.loss_plot, run_dir.config):
                if path.is_file():
                    tracker.log_artifact(path)
        self.finish("finished")

    def finish(self, status: str, reason: str | None = None) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        for tracker in self.trackers.values():
            if reason:
                with contextlib.suppress(Exception):
                    tracker.set_summary({"failure": reason})
            tracker.finish(status)

    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": {key: t.run_id for key, t in self.trackers.items() if t.run_id}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_ids = dict(state.get("run_ids", {}))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


register_technique("log", LogConfig,
                   lambda block: TrackingCallback(block) if block.mlflow.enabled or block.wandb.enabled else None,
                   order=100)  # last: it records what the other techniques put in the run's summary
