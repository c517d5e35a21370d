"""One search stage on Optuna: its study (storage, sampler, pruner), its workers, and each trial through the trainer.

A *stage* is one Optuna study plus a directory: ``stage.yaml`` (everything a worker needs), ``trials/trial_NNNNN/``
(one ordinary keel run directory per trial, named by the trial's number, which the storage hands out uniquely, so
two trials never share a directory even when they start in the same second on different machines) and the results
(``keel.sweep.results``). A plain ``keel sweep`` is one stage in the sweep directory itself; a preset runs several in
subdirectories.

Workers. Every worker, in this process or in ``python -m keel.sweep.worker STAGE_DIR`` subprocesses, or on other
machines sharing the storage, loops: count the study's finished trials (complete, pruned, or failed for a reason of
their own), stop at ``trials``; otherwise run one trial with ``study.optimize(n_trials=1)``. A trial runs
``keel.train.train`` with the sampled config, so it trains whatever task the config names. Failures of the trial
(a diverged run, a NaN, too many skipped updates, a sampled combination the config refuses, an error in the task)
are recorded as failed with the reason, and the sweep goes on.

Heartbeats. With relational storage each running trial beats every ``heartbeat_interval`` seconds (Optuna's
heartbeat thread). A trial silent for two intervals belongs to a dead worker: the next worker to start a trial, or
one waiting for the last trials, fails it and queues one retry with the same parameters
(``RetryFailedTrialCallback(max_retry=1)``); the stale attempt is not counted, the retry is. Completed trials are
committed to the storage as they finish, so a killed worker loses only its running trial.

Data parallelism. Under ``torch.distributed`` (``dist.is_initialized()``) rank 0 alone talks to the study: it
samples the trial, broadcasts its parameters, reports each evaluation and broadcasts the prune decision; the other
ranks follow (``_follow``). Without that, Optuna's pruning is silently a no-op on ranks that never see a trial
(optuna issues #2726, #5849).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from keel.errors import KeelError
from keel.sweep.space import Distribution, SweepOptions, apply_params, parse_distribution
from keel.techniques import Callback
from keel.timeunits import Timeline

STAGE_FILE = "stage.yaml"
STORAGE_FILE = "study.db"
TRIALS_DIR = "trials"

Say = Callable[[str], None]


def require_optuna():
    """The optuna module, or a KeelError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise KeelError("keel sweep needs Optuna, which is not installed; allowed: pip install 'keel[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # keel prints each trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return optuna


class TrialFailed(Exception):
    """A trial that failed for a reason of its own (recorded as the trial's ``fail_reason``)."""


# ------------------------------------------------------------------------------------------ the stage


@dataclass
class Stage:
    """What the workers of one study need. ``config`` is the raw run config (no sweep blocks) with the stage's
    fixed changes; ``space`` the distributions as written; ``stop_at`` stops every trial at that step (its schedule
    planned for the config's ``max_steps``, so continuing it is a plain resume); ``points``, when given, are the
    exact parameter sets to train (a preset's chosen configs, each value among its key's choices): queued, one trial
    each, before the workers start."""

    name: str
    dir: Path
    root: Path
    config: dict[str, Any]
    space: dict[str, Any]
    options: dict[str, Any]
    study: str
    storage: str | None = None
    trials: int = 20
    stop_at: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def distributions(self) -> dict[str, Distribution]:
        return {key: parse_distribution(key, value) for key, value in self.space.items()}

    @property
    def settings(self) -> SweepOptions:
        return SweepOptions(**self.options)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.root / STORAGE_FILE).resolve()}"

    @property
    def metric(self) -> str:
        return self.settings.metric

    @property
    def direction(self) -> str:
        options = self.settings
        if options.direction:
            return options.direction
        return "maximize" if "accuracy" in options.metric else "minimize"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["dir"] = "."
        data["root"] = os.path.relpath(self.root.resolve(), self.dir.resolve())
        _atomic_yaml(self.dir / STAGE_FILE, data)

    @classmethod
    def load(cls, stage_dir: str | Path) -> "Stage":
        stage_dir = Path(stage_dir)
        path = stage_dir / STAGE_FILE
        if not path.is_file():
            raise KeelError(f"'{stage_dir}' is not a keel sweep stage (no {STAGE_FILE})")
        data = yaml.safe_load(path.read_text())
        data["dir"] = stage_dir
        data["root"] = (stage_dir / data["root"]).resolve()
        return cls(**data)


def _atomic_yaml(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the study


def _storage(url: str, options: SweepOptions):
    optuna = require_optuna()
    from optuna.storages import RDBStorage

    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    parameters = inspect.signature(RDBStorage.__init__).parameters
    callback_key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters \
        else "failed_trial_callback"
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    url = postgresql_driver(url)

    def connect():
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=options.heartbeat_interval,
                          grace_period=2 * options.heartbeat_interval, **{callback_key: retry_class(max_retry=1)})

    try:
        return _retrying(connect)
    except ModuleNotFoundError as error:
        raise KeelError(f"--storage {url}: the database driver {error.name!r} is not installed; allowed: pip install "
                        "'keel[postgresql]' for PostgreSQL, or a sqlite:/// URL") from None
    except ImportError as error:  # Optuna's wrapping of a missing driver
        raise KeelError(f"--storage {url}: no database driver for it is installed ({error}); allowed: pip install "
                        "'keel[postgresql]' for PostgreSQL, or a sqlite:/// URL") from None
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KeelError(f"--storage {url}: cannot open the study's database ({type(error).__name__}: {first}); "
                        "allowed: sqlite:///path/study.db, postgresql://user:password@host:port/database, or "
                        "another SQLAlchemy URL Optuna supports") from None


def _retrying(make, attempts: int = 5):
    """``make()``, tried again after a database error: workers that start together race to create Optuna's tables
    (PostgreSQL reports the loser's duplicate table as an IntegrityError); the next attempt finds them."""
    for attempt in range(attempts):
        try:
            return make()
        except ImportError:
            raise
        except Exception as error:
            if attempt == attempts - 1 or type(error).__module__.split(".")[0] not in ("sqlalchemy", "optuna"):
                raise
            time.sleep(0.5 + attempt)


def postgresql_driver(url: str) -> str:
    """A plain ``postgresql://`` URL with the driver that is installed: SQLAlchemy 2.1 means psycopg (3) by it,
    2.0 psycopg2; ``postgresql+driver://`` URLs are kept as given."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url.removeprefix("postgresql://")
    return url


def sampler_kind(stage: Stage) -> str:
    kind = stage.settings.sampler
    if kind == "auto":
        return "grid" if all(d.kind == "grid" for d in stage.distributions.values()) else "tpe"
    return kind


def grid_size(stage: Stage) -> int | None:
    if sampler_kind(stage) != "grid":
        return None
    return math.prod(len(d.choices) for d in stage.distributions.values())


def make_sampler(stage: Stage, seed: int):
    optuna = require_optuna()
    kind = sampler_kind(stage)
    space = stage.distributions
    if kind == "grid":
        loose = [f"sweep.{k}: {d.text}" for k, d in space.items() if not d.categorical]
        if loose:
            raise KeelError(f"sweep_options.sampler: grid needs every key as a list or choice([...]); "
                            f"{loose[0]} is a range; allowed: lists only, or sampler random, tpe, cmaes or gp")
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise KeelError("sweep_options.sampler: cmaes needs the cmaes package (pip install 'keel[sweep]'); "
                            "allowed without it: grid, random, tpe, gp") from None
        if sum(not d.categorical for d in space.values()) < 2:
            raise KeelError("sweep_options.sampler: cmaes searches two or more numeric keys jointly, and this sweep "
                            "has fewer; allowed: tpe, random, gp or grid")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


def make_pruner(stage: Stage, config: Any):
    optuna = require_optuna()
    kind = stage.settings.pruner
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=stage.settings.prune_startup, n_warmup_steps=0)
    eval_steps = Timeline.of_steps(config.max_steps).steps(config.eval_interval, "eval_interval")
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_steps)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_steps,
                                              max_resource=stage.stop_at or config.max_steps)
    return optuna.pruners.NopPruner()


def open_study(stage: Stage, worker_index: int = 0):
    """Create or load the stage's study (its direction must match a study that exists). A study that holds trials
    already gets a sampler seeded from their number (``resumed_seed``): one re-seeded as at the start would draw the
    points it drew then again. That is a ``--resume`` or a worker joining late, and also every fresh stage whose
    points were queued before its workers open it (a grid, a preset's survivors): harmless there, since queued points
    are taken before the sampler draws."""
    optuna = require_optuna()
    from keel.config import validate

    base = validate(apply_params(stage.config, {}))
    seed = stage.settings.seed + worker_index
    if stage.storage is not None:  # other machines or processes share the study: do not draw the same points
        seed += (sum(map(ord, socket.gethostname())) * 1009 + os.getpid()) % 2**31
    storage = _storage(stage.storage_url, stage.settings)
    try:
        study = _retrying(lambda: optuna.create_study(
            storage=storage, sampler=make_sampler(stage, seed), pruner=make_pruner(stage, base),
            study_name=stage.study, direction=stage.direction, load_if_exists=True))
    except KeelError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KeelError(f"--study {stage.study}: cannot create or load it in {stage.storage_url} ({first})") from None
    held = len(study.get_trials(deepcopy=False))
    if held:
        study.sampler = make_sampler(stage, resumed_seed(seed, held))
    if study.direction.name.lower() != stage.direction:
        raise KeelError(f"--study {stage.study}: the study in the storage {study.direction.name.lower()}s, this sweep "
                        f"asks to {stage.direction}; allowed: another --study name, or sweep_options.direction: "
                        f"{study.direction.name.lower()}")
    return study


def resumed_seed(seed: int, held: int) -> int:
    """The sampler's seed for a study that holds ``held`` trials: a hash of (seed, held), so a resumed sweep draws
    new points rather than the sequence it started with, and is as reproducible (the same study, the same seed)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{held}".encode()).digest()[:4], "big") % 2**31


def counts(study) -> tuple[int, int, int]:
    """(finished, running, waiting): finished are complete, pruned, and failed for a reason of their own; a trial
    failed because its worker died is not counted (its retry is)."""
    from optuna.trial import TrialState

    finished = running = waiting = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs):
            finished += 1
        elif trial.state == TrialState.RUNNING:
            running += 1
        elif trial.state == TrialState.WAITING:
            waiting += 1
    return finished, running, waiting


def enqueue_grid(study, stage: Stage) -> int:
    """Queue the grid points that no trial of the study holds (complete, pruned, failed for its own reason, running
    or queued), as many as the stage still needs, so that parallel workers take distinct points: Optuna's
    GridSampler draws the next point at random among the unvisited ones, and two workers that start together may
    draw the same. Returns how many were queued."""
    if sampler_kind(stage) != "grid":
        return 0
    import itertools

    space = stage.distributions
    held = _held(study, space)
    points = [p for p in itertools.product(*(d.choices for d in space.values())) if tuple(map(repr, p)) not in held]
    random.Random(stage.settings.seed).shuffle(points)  # a partial grid (--trials below its size): a random part
    points = points[:max(0, target_trials(stage) - len(held))]
    for point in points:
        study.enqueue_trial(dict(zip(space, point)), skip_if_exists=False)
    return len(points)


def _held(study, keys) -> set[tuple[str, ...]]:
    """The parameter sets (as reprs, in the order of ``keys``) that trials of the study hold: complete, pruned,
    failed for a reason of their own, running, or queued (a queued trial's parameters are its fixed ones)."""
    from optuna.trial import TrialState

    held = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.state != TrialState.FAIL or "fail_reason" in trial.user_attrs:
            params = trial.params or trial.system_attrs.get("fixed_params", {})
            held.add(tuple(repr(params.get(key)) for key in keys))
    return held


def enqueue_points(study, stage: Stage) -> int:
    """Queue the stage's ``points`` that no trial of the study holds (so a resumed stage trains each once);
    returns how many were queued."""
    if not stage.points:
        return 0
    held = _held(study, stage.space)
    missing = [p for p in stage.points if tuple(repr(p.get(key)) for key in stage.space) not in held]
    for point in missing:
        study.enqueue_trial(point, skip_if_exists=False)
    return len(missing)


def target_trials(stage: Stage) -> int:
    size = grid_size(stage)
    asked = stage.trials
    return min(asked, size) if size is not None else asked


def run_worker(stage: Stage, worker_index: int = 0, say: Say = print) -> int:
    """Run trials of ``stage`` until the study has its number of finished trials; return how many ran here."""
    from keel import parent_process

    optuna = require_optuna()
    say = printing_safely(say)
    if _rank() != 0:
        return _follow(stage, say)
    study = open_study(stage, worker_index)
    objective = Objective(stage, say)
    target, ran, waited = target_trials(stage), 0, False
    poll = min(5.0, stage.settings.heartbeat_interval / 2)
    try:
        while True:
            finished, running, waiting = counts(study)
            if finished >= target:
                break
            if waiting == 0 and finished + running >= target:
                if not waited:
                    say(f"waiting for {running} running trial(s) of other workers")
                    waited = True
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed and queued again
                time.sleep(poll)
                continue
            waited = False
            with parent_process.deferred():  # a worker whose keel sweep is gone records a finished trial first
                study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
            ran += 1
    finally:
        _broadcast(("stop",))
    return ran


class Objective:
    """One trial: sample, train through ``keel.train.train``, return the metric (or prune, or fail with a reason)."""

    def __init__(self, stage: Stage, say: Say):
        self.stage, self.say = stage, printing_safely(say)
        self.space = stage.distributions

    def __call__(self, trial) -> float:
        optuna = require_optuna()
        stage = self.stage
        params = {key: distribution.suggest(trial, key) for key, distribution in self.space.items()}
        _broadcast(("trial", trial.number, params))
        run_dir = stage.dir / TRIALS_DIR / f"trial_{trial.number:05d}"
        trial.set_user_attr("run_dir", os.path.relpath(run_dir, stage.dir))
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        retried = trial.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")  # set by the retry
        shown = ", ".join(f"{key}={_show(value)}" for key, value in params.items())
        again = f" (retry of trial {retried}, whose worker died)" if retried is not None else ""
        self.say(f"trial {trial.number} started{again}: {shown}")
        started = time.perf_counter()
        callback = TrialCallback(trial, stage.metric, pruning=stage.settings.pruner != "none",
                                 stop_at=stage.stop_at, diverged_factor=stage.settings.diverged_factor)
        from keel import parent_process

        try:
            with parent_process.interruptible():  # a worker whose keel sweep is gone abandons training, not recording
                summary = _train_trial(stage, params, run_dir, callback, trial.number)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # the trial's own failure: recorded, the sweep goes on
            if callback.step is not None:
                trial.set_user_attr("steps", callback.step)
            self._fail(trial, _one_line(error), started)
        seconds = time.perf_counter() - started
        trial.set_user_attr("train_seconds", round(seconds, 3))
        trial.set_user_attr("steps", int(summary["step"]))
        if callback.diverged:
            self._fail(trial, callback.diverged, started)
        value = summary.get(stage.metric)
        if value is None:
            keys = ", ".join(k for k in summary if k.startswith(("val_", "train_eval_")))
            self._fail(trial, f"metric {stage.metric!r} is not in the evaluation record; allowed: {keys}", started)
        if not math.isfinite(float(value)):
            self._fail(trial, f"{stage.metric} is {value} at step {summary['step']}", started)
        if callback.pruned:
            self.say(f"trial {trial.number} pruned at step {summary['step']}: {stage.metric} {float(value):.4f} "
                     f"({seconds:.1f} s)")
            raise optuna.TrialPruned(f"pruned at step {summary['step']}")
        self.say(f"trial {trial.number} finished: {stage.metric} {float(value):.4f} after {summary['step']} steps "
                 f"({seconds:.1f} s)")
        return float(value)

    def _fail(self, trial, reason: str, started: float) -> None:
        from keel import tracking

        trial.set_user_attr("fail_reason", reason[:1000])
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
        tracking.end_open_runs("failed", reason)
        self.say(f"trial {trial.number} failed: {reason}")
        raise TrialFailed(reason)


def trial_config(stage: Stage, params: dict[str, Any]):
    """The validated run config of a trial: the stage's config with ``params``; ``threads`` from the options when
    the config leaves it null."""
    from keel.config import validate

    raw = apply_params(stage.config, params)
    raw.pop("out_dir", None)
    if raw.get("threads") is None:
        raw["threads"] = stage.settings.threads
    return validate(raw)


def _train_trial(stage: Stage, params: dict[str, Any], run_dir: Path, callback: "TrialCallback",
                 number: int) -> dict[str, Any]:
    from keel import tracking
    from keel.train import train

    config = trial_config(stage, params)
    with tracking.run_tags({"keel.study": stage.study, "keel.stage": stage.name, "keel.trial": str(number),
                            **stage.tags}):
        return train(config, [callback], run_dir=run_dir, quiet=True)


class TrialCallback(Callback):
    """Feeds each evaluation to the trial (``trial.report``) and stops the run when the pruner says so or at
    ``stop_at``; ends it with ``TrainingUnstableError`` when the validation loss has diverged (above
    ``diverged_factor`` x ln(classes), the loss of a uniform guess). Under data parallelism rank 0 reports and the decision is broadcast."""

    name = "sweep_trial"

    def __init__(self, trial: Any, metric: str, pruning: bool = False, stop_at: int | None = None,
                 diverged_factor: float | None = None):
        self.trial, self.metric, self.pruning, self.stop_at = trial, metric, pruning, stop_at
        self.diverged_factor = diverged_factor
        self.pruned = False
        self.step: int | None = None  # the run's step, as last seen (a failed trial's steps)
        self.diverged: str | None = None
        self._limit: float | None = None

    def on_run_start(self, trainer) -> None:
        from keel.tasks import expected_initial_loss

        initial = expected_initial_loss(trainer.task)
        if initial is not None and self.diverged_factor is not None:
            self._limit = self.diverged_factor * initial

    def on_step_end(self, trainer) -> None:
        self.step = trainer.state.step
        if self.stop_at is not None and trainer.state.step >= self.stop_at:
            self.should_stop = True

    def on_eval(self, trainer, metrics: dict[str, Any]) -> None:
        step = trainer.state.step
        loss = metrics.get("val_loss")
        if self._limit is not None and loss is not None and not loss <= self._limit:
            from keel.errors import TrainingUnstableError

            self.diverged = (f"diverged: val_loss {loss:.4g} at step {step} is above {self._limit:.4g} "
                             f"({self.diverged_factor:g} x ln(classes))")
            raise TrainingUnstableError(self.diverged)  # as the trainer's own stops: the trial fails here
        if not self.pruning:
            return
        value = metrics.get(self.metric)
        prune = False
        if _rank() == 0 and value is not None and math.isfinite(float(value)):
            self.trial.report(float(value), step)
            prune = bool(self.trial.should_prune())
        if _broadcast(prune):
            self.pruned = self.should_stop = True


# ------------------------------------------------------------------------------------------ data parallelism


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    if not _distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``broadcast_object_list``); the value itself without torch.distributed."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _follow(stage: Stage, say: Say) -> int:
    """A rank other than 0: train each trial rank 0 announces, joining its prune decisions, until it says stop."""
    ran = 0
    while True:
        message = _broadcast(None)
        if message[0] == "stop":
            return ran
        _, number, params = message
        callback = TrialCallback(None, stage.metric, pruning=stage.settings.pruner != "none", stop_at=stage.stop_at,
                                 diverged_factor=stage.settings.diverged_factor)
        try:
            _train_trial(stage, params, stage.dir / TRIALS_DIR / f"trial_{number:05d}", callback, number)
        except Exception as error:  # rank 0 records the failure
            say(f"trial {number} failed on rank {_rank()}: {_one_line(error)}")
        ran += 1


# ------------------------------------------------------------------------------------------ local workers


def run_stage(stage: Stage, workers: int, say: Say = print) -> None:
    """Save the stage, create its study, and run ``workers`` workers: this process for one, else subprocesses
    (``python -m keel.sweep.worker``) whose lines are relayed with a ``[worker i]`` prefix."""
    stage.save()
    study = open_study(stage)  # a bad storage URL or a study of the other direction fails here, once
    enqueue_grid(study, stage)
    enqueue_points(study, stage)
    if workers == 1:
        run_worker(stage, 0, say)
        return
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    procs = [subprocess.Popen([sys.executable, "-m", "keel.sweep.worker", str(stage.dir), "--index", str(i),
                               "--parent", str(os.getpid())],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(workers)]
    relays = [threading.Thread(target=_relay, args=(proc, f"[worker {i}] ", say), daemon=True)
              for i, proc in enumerate(procs)]
    for relay in relays:
        relay.start()
    try:
        with _sigterm_as_exit():
            codes = [proc.wait() for proc in procs]
    except (KeyboardInterrupt, SystemExit):
        # Interrupted or terminated: the workers stop too (their running trials are retried on --resume), rather
        # than going on taking trials with nobody to report to.
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    for relay in relays:
        relay.join(timeout=5)
    for i, code in enumerate(codes):
        if code != 0:
            say(f"worker {i} exited with code {code}; a trial it was running is retried by a worker still running "
                "(or by keel sweep --resume)")


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (kill, a job scheduler's stop) raises SystemExit(143) in the main thread while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def printing_safely(say: Say) -> Say:
    """``say`` that never fails a trial: a line nobody can read any more (the pipe of a killed ``keel sweep``, a
    closed terminal) raises OSError; stdout then goes to the null device and the trial goes on to be recorded."""
    if getattr(say, "safe", False):
        return say

    def safe(line: str) -> None:
        try:
            say(line)
        except OSError:
            _stdout_to_null()

    safe.safe = True
    return safe


def _stdout_to_null() -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # no file descriptor (a captured stream): its lines are dropped one by one
        pass


def _relay(proc: subprocess.Popen, prefix: str, say: Say) -> None:
    for line in proc.stdout:
        say(prefix + line.rstrip("\n"))


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    from keel.errors import KeelError as _KeelError

    return text if isinstance(error, _KeelError) else f"{type(error).__name__}: {text}"
