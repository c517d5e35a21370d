"""The trainer: one lean loop that composes keel's units. One optimizer update reads top to bottom in ``fit``.

It owns the loop, the state and the checkpoints; it owns no technique and does not know what it trains: the model,
the data and the loss come from a task (``keel.tasks``). Techniques come in as units called at a fixed place in
the step (schedule, precision, clipping) or as registered callbacks (``keel.techniques``: averaging, early
stopping and the rest).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from keel import optim, rundir, schedules, tasks
from keel.config import TrainConfig, dump_config
from keel.errors import KeelError
from keel.grad import Clipper, LossSpikeDetector, TrainingUnstableError, all_ranks_agree
from keel.optim.multi_tensor import follow_compile_choice
from keel.optim.unfreezing import unfreeze_callbacks
from keel.precision import Precision, cuda_tf32
from keel.rundir.metrics import MetricsLog, decode_line, read_metrics
from keel.safetensors_io import write_safetensors
from keel.tasks import Task, move_to_device
from keel.techniques import Callback, check_unique_names, make_callbacks
from keel.timeunits import Time, Timeline
from keel.train import devices, distributed, export, restarts
from keel.train.init import load_initial_weights
from keel.train.performance import MfuMeter, choose_compile, peak_tflops
from keel.train.plot import plot_run
from keel.train.resume_policy import build_schedule, resume_schedule


@dataclass
class Clock:
    """The trainer's clock: optimizer steps applied, and the examples and tokens those steps actually trained on
    (summed over ranks). ``advance`` is the one place that moves it."""

    step: int = 0
    examples: int = 0
    tokens: int = 0

    def advance(self, examples: int, tokens: int) -> None:
        self.step += 1
        self.examples += examples
        self.tokens += tokens


@dataclass
class TrainState(Clock):
    """Counters that define where a run is. ``step`` counts applied optimizer updates (0 before the first)."""

    batch_index: int = 0  # next micro-batch the sampler hands out
    skipped: int = 0  # updates skipped (non-finite loss or gradients)
    skip_streak: int = 0  # consecutive skipped updates (fp16 overflows with a finite loss excepted)
    rollbacks: int = 0  # loss-spike rollbacks so far
    lr_multiplier: float = 1.0  # product of spike.lr_factor over the rollbacks
    elapsed: float = 0.0  # training seconds, summed over resumes
    best_value: float | None = None  # best value of the tracked evaluation metric (val_loss unless told)
    best_step: int | None = None
    best_checkpoint: str = ""
    schedule_steps: int = 0  # the run length the schedule was built for (kept when a resume changes max_steps)
    resolved: dict = field(default_factory=dict)  # what the last start resolved (its run record, step aside)
    decays: list = field(default_factory=list)  # [start, end] of each new decay added on resume (new_decay)


def run_timeline(config: TrainConfig, task: Task, callbacks=(), world_size: int = 1, host: Any = None) -> Timeline:
    """The run's time (``keel.timeunits``): its duration, the task's epoch, and what each step is projected to
    count: the task's counts of the micro-batches the step draws over all ranks, as the callbacks that cut them
    (sequence-length warmup) change them. The clock itself counts what is trained; ``keel schedule`` previews a
    run config's schedule with the same timeline. ``host`` (the trainer) is what ``project_counts`` is given."""
    accum = config.grad_accum
    host = host if host is not None else _TimelineHost(config, task)

    def step_counts(step: int) -> tuple[float, float]:
        counts = [task.batch_counts(step * accum + i, world_size) for i in range(accum)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    host.timeline = Timeline(config.run_length, step_counts, steady_from=None if task.batch_counts_vary else 0,
                             epoch=task.epoch(), what=f"task {config.task!r}")
    for callback in callbacks:
        projected = callback.project_counts(host)
        if projected is not None:
            host.timeline.add_transform(*projected)
    return host.timeline


@dataclass
class _TimelineHost:
    """What a callback's ``project_counts`` reads of a trainer, without one."""

    config: TrainConfig
    task: Task
    timeline: Timeline | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KeelError(f"device: '{name}' was asked for but CUDA is not available; allowed here: auto, cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # e.g. --device of keel ensemble, not validated before
        raise KeelError(f"device: {name!r} is not a device keel trains on; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise KeelError(f"device: '{name}' was asked for but this machine has {count} CUDA device"
                        f"{'s' if count != 1 else ''}; allowed: auto, cpu, cuda, cuda:0 to cuda:{count - 1}")
    return device


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class Trainer:
    """Trains ``task`` (default: the one ``config.task`` names) with the recipe of a ``TrainConfig``; ``fit()``.

    ``resume=True`` continues the run in ``run_dir`` from its newest intact checkpoint; on CPU the result is
    bitwise identical to a run that was never interrupted. Everything that can fail on bad input (the task, the
    model, the first batch, ``init_from``, the recipe) is checked here, before anything is written.

    Launched by torchrun with several processes, it trains data-parallel (``keel.train.distributed``): each rank
    its shard of every global batch, rank 0 alone writing. ``allow_world_size_change`` lets ``resume`` continue a
    checkpoint written by another number of processes (docs/distributed.md).
    """

    def __init__(
        self,
        config: TrainConfig,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        run_dir: str | Path | None = None,
        resume: bool = False,
        quiet: bool = False,
        task: Task | None = None,
        allow_world_size_change: bool = False,
    ):
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        late_workspace = devices.set_cublas_workspace() if config.deterministic else None  # before any CUDA use
        self.dist = distributed.setup(config, resolve_device(config.device))  # one process: no process group
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.config = config = distributed.resolve_for_world(config, self.world_size)  # per-rank batch
        self.quiet = quiet or not self.dist.is_main
        if late_workspace:
            self._say(late_workspace)
        self.allow_world_size_change = allow_world_size_change
        self.run_dir = Path(self.dist.broadcast_object(str(run_dir or config.out_dir or default_run_dir())))
        self.dist.on_main(lambda: self._check_run_dir(resume))

        self.task = task.bind(config) if task is not None else tasks.from_config(config)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.model = tasks.check_model(self.task.build_model(), f"task {config.task!r}").to(self.device)
        if config.init_from is not None and not resume:
            self._say(load_initial_weights(self.model, config.init_from, strict=config.init_from_strict,
                                           exclude=config.init_from_exclude))
        self.train_model = self.dist.wrap(self.model)  # DDP around it, or sharded in place (FSDP); else the model
        distributed.seed_rank(config.seed, self.rank)  # each rank its own dropout stream
        self._counted = self.task.token_unit  # what the clock's token count counts: tokens, or targets
        self.lr_scale = distributed.lr_scale(config, self.world_size)  # a result: in the run record, not the config
        self.lr_factor = self.lr_scale.factor  # lr_scaling: global batch / base batch (or its sqrt); else 1
        self.callbacks = [*make_callbacks(config), *callbacks]  # the techniques' first: their projections shape time
        check_unique_names(self.callbacks)
        self.timeline = self._build_timeline()  # every length in time units resolves against it
        self.total_steps = self.timeline.total_steps  # the run's length in steps, as projected
        self.optimizer = optim.from_config(config.optimizer, self.model, timeline=self.timeline)
        self.schedule = self._build_schedule(self.total_steps, [])
        self.precision = Precision(config.precision, self.device)
        self.clipper = Clipper(config.clip, warmup_steps=schedules.warmup_steps(self.schedule))
        spike = config.spike
        self.spike_detector = LossSpikeDetector(spike.window, spike.factor, spike.min_history, spike.min_rise) \
            if spike.enabled else None
        techniques = len(self.callbacks) - len(callbacks)  # the optimizer's own callbacks go after the techniques
        self.callbacks[techniques:techniques] = unfreeze_callbacks(self.optimizer, self.world_size)
        check_unique_names(self.callbacks)
        self.state = TrainState(schedule_steps=self.total_steps)
        self.restored_from: Path | None = None
        self._resume = resume
        self._last_eval: dict[str, Any] = {}
        self._best = ("val_loss", "min", 0.0, False)  # metric, mode, min_delta, keep its checkpoint (track_best)
        self.export = export.ExportRequest()  # which weights model.safetensors gets (callbacks may ask for others)
        self.keep_last = config.keep_last  # checkpoints kept besides the best (callbacks may raise it: keep_at_least)
        self._check_first_batch()
        for callback in self.callbacks:  # what a technique can tell from the task and model, before any file
            getattr(callback, "check", lambda trainer: None)(self)
        self.peak_tflops = peak_tflops(self.device, config.mfu_peak_tflops)  # for MFU; None: unknown
        weighed = config.compile == "auto" and self.device.type == "cuda"  # the tokens the run is projected to train
        run_tokens = self.timeline.projected(self.total_steps)[1] if weighed else 0.0
        self.compiled, self._compile_reason = choose_compile(
            config.compile, self.device, self.task.flops_per_token(self.model), run_tokens / self.total_steps,
            self.total_steps, self.peak_tflops)
        if self.compiled:  # the forward pass compiled; self.model (checkpoints, evaluation) stays the module itself
            self.train_model = torch.compile(self.train_model)
        follow_compile_choice(self.optimizer, config.compile)  # true/false also decide keel's update kernels
        self._config_text = dump_config(config)
        self.step_metrics: dict[str, Any] = {}  # callbacks' keys for the next step record (e.g. seq_len)

    def _build_timeline(self) -> Timeline:
        return run_timeline(self.config, self.task, self.callbacks, self.world_size, host=self)

    def _build_schedule(self, total_steps: int, decays: list) -> Any:
        return build_schedule(self.config, self.timeline, total_steps, decays)

    def _project_again(self, payload: dict[str, Any]) -> None:
        """The run's time and schedule projected again once the callbacks hold their restored state, so that what
        they keep from the checkpoint (a sequence-length warmup its length) shapes the run's length in steps."""
        self.timeline = self._build_timeline()
        self.total_steps = self.timeline.total_steps
        self.schedule = self._build_schedule(self.total_steps, [])
        self._load_schedule_state(payload)
        self.clipper.warmup_steps = schedules.warmup_steps(self.schedule)

    def _apply_resume_policy(self, payload: dict[str, Any]) -> None:
        """A resume that changes the run length must not stretch the schedule silently (the LR would jump)."""
        schedule = resume_schedule(self.config, self.timeline, self.state, self._say)
        if schedule is not None:
            self.schedule = schedule
            self._load_schedule_state(payload)

    def _load_schedule_state(self, payload: dict[str, Any]) -> None:
        if payload.get("schedule") is not None and hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(payload["schedule"])

    def keep_at_least(self, count: int) -> None:
        """Keep at least the newest ``count`` checkpoints (e.g. for averaging them at the end)."""
        self.keep_last = max(self.keep_last, count)

    def track_best(self, metric: str, mode: str, min_delta: float = 0.0) -> None:
        """Track the best evaluation by ``metric`` (``min`` or ``max``, improving by more than ``min_delta``)
        instead of val_loss, and checkpoint each evaluation that improves it, so that its weights can be exported
        at the end (early stopping asks for this; ``keel.train.export``)."""
        self._best = (metric, mode, min_delta, True)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train until the counted clock reaches the run length (``duration`` or ``max_steps``), or a callback
        stops the run; return the summary."""
        made = None  # rank 0 of a new run, once it holds its directory: whether this run created it
        kernels = devices.use_deterministic(self.config.deterministic)  # deterministic: true, for this run
        try:
            with contextlib.ExitStack() as lock:  # rank 0 takes the lock; a second process on this run is refused
                def take() -> None:
                    nonlocal made
                    existed = self.run_dir.exists()
                    lock.enter_context(rundir.RunLock(rundir.prepare_run_dir(self.run_dir, self._resume),
                                                      report=self._say))
                    made = None if self._resume else not existed
                self.dist.on_main(take)
                if self.device.type == "cuda":  # TF32 matmuls for float32 work (tf32), restored afterwards
                    lock.enter_context(cuda_tf32(self.config.tf32))
                return self._fit()
        except KeelError as error:  # bad input found late: a new run without a checkpoint leaves nothing behind
            if made is not None and not isinstance(error, TrainingUnstableError) and rundir.discard_new_run(
                    self.run_dir, made, self.task.run_files()):
                raise KeelError(f"{error} (nothing was kept in '{self.run_dir}': no checkpoint had been written)") \
                    from None
            raise
        finally:
            devices.restore(kernels)
            self.train_model = self.model  # DDP's reducer goes before the process group it holds
            self.dist.shutdown()

    def _fit(self) -> dict[str, Any]:
        metrics_offset = self._restore() if self._resume else None
        if self.dist.is_main:
            rundir.atomic_write_text(self.run_dir / rundir.CONFIG, self._config_text)  # once resume succeeded
            for name, text in self.task.run_files().items():  # e.g. the trained tokenizer.json
                rundir.atomic_write_text(self.run_dir / name, text)
        config, state, model, optimizer, task = self.config, self.state, self.train_model, self.optimizer, self.task
        self._open_metrics(metrics_offset, state.step)
        resolved = self._run_record()
        if resolved != state.resolved:  # a start that resolves as the last one did (a plain resume) adds nothing
            state.resolved = resolved
            self.log({"kind": "run", "step": state.step, **resolved})
        for line in task.describe():
            self._say(line)
        tokens = f"{self.timeline.counts(state.step)[1]:,.0f} {self._counted} per step"
        steady = self.timeline.steady_step()
        if steady is not None and steady > state.step:  # a curriculum (sequence warmup) changes it until then
            tokens += (f" at first, {self.timeline.counts(steady)[1]:,.0f} from step {steady:,}"
                       if steady < self.total_steps else " at first, changing all run")
        length = "" if config.duration is None else f" ({self.total_steps:,} steps projected)"
        self._say(f"task: {config.task}; recipe: {config.recipe} ({self._recipe_summary()}); "
                  f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
                  f"{tokens}; run length {config.run_length}{length}; "
                  f"run directory: {self.run_dir}")
        self._say(self._describe_speed())
        for line in self._describe_ranks(resolved):
            self._say(line)
        for callback in self.callbacks:
            callback.on_run_start(self)
        if self.spike_detector is not None and self.dist.from_main(
                lambda: not rundir.list_checkpoints(self.run_dir / rundir.CHECKPOINTS)):
            self.save_checkpoint()  # a loss spike can always roll back, even before the first checkpoint
        model.train()
        bar = tqdm(total=self.total_steps, initial=state.step, disable=True if self.quiet else None,
                   dynamic_ncols=True, unit="step")
        progress = _Progress(config.progress_interval, enabled=bar.disable and not self.quiet,
                             unit=f"{self._counted}/s", timeline=self.timeline)
        started, tokens_at_start = time.perf_counter(), state.tokens
        elapsed_at_start = state.elapsed
        meter, mfu = MfuMeter(self.peak_tflops, self.world_size), None

        timeline, duration = self.timeline, config.run_length
        while not timeline.reached(duration, state) and not any(cb.should_stop for cb in self.callbacks):
            meter.start_step()
            lr = self.schedule(state.step) * state.lr_multiplier * self.lr_factor
            schedules.set_lr(optimizer, lr)
            for callback in self.callbacks:
                callback.on_step_start(self)  # may set the LR itself (e.g. the SWA phase): log what is applied
            lr = _applied_lr(optimizer, lr)

            # Forward and backward over the micro-batches; the summed loss is divided once by the global batch's
            # count (tokens or examples, summed over ranks), so accumulation and data parallelism match one large
            # batch whatever each micro-batch holds. Ranks all-reduce gradients on the last micro-batch only.
            micro_batches = [self._batch(state.batch_index + i) for i in range(config.grad_accum)]
            state.batch_index += config.grad_accum
            n_targets, n_examples, n_tokens = self.dist.sum_counts(sum(task.count(b) for b in micro_batches),
                                                                   sum(task.examples(b) for b in micro_batches),
                                                                   sum(task.tokens(b) for b in micro_batches))
            loss_sum = 0.0
            for i, batch in enumerate(micro_batches):
                batch = move_to_device(batch, self.device)
                with self.dist.gradient_sync(model, sync=i == len(micro_batches) - 1):
                    with self.precision.autocast():
                        loss = task.loss(model, batch) / n_targets
                    self.precision.scale(loss).backward()
                loss_sum += loss.detach()
            for callback in self.callbacks:
                callback.on_after_backward(self)

            # Unscale (fp16), clip (the unclipped norm is always measured), then update unless the loss or a gradient
            # is NaN/inf (all ranks decide alike) or the loss spiked; a skipped update changes no state but counters.
            self.precision.unscale_(optimizer)
            clip = self.clipper(self.model.parameters(), state.step)  # synced gradients: the same norm on every rank
            loss_value = self.dist.sum(float(loss_sum))[0] if self.dist.active else float(loss_sum)
            finite = all_ranks_agree(math.isfinite(loss_value) and math.isfinite(clip.norm))
            spike = finite and self.spike_detector is not None and not all_ranks_agree(
                not self.spike_detector.is_spike(loss_value))
            applied = finite and not spike and self.precision.step(optimizer)
            self.precision.update()
            optimizer.zero_grad(set_to_none=True)
            if spike:
                self._roll_back(loss_value, bar)
                continue
            if not applied:
                self._skip_update(loss_value, clip.norm)
                continue
            state.skip_streak = 0
            if self.spike_detector is not None:
                self.spike_detector.update(loss_value)  # only losses of applied updates enter its window

            before = Clock(state.step, state.examples, state.tokens)
            state.advance(n_examples, n_tokens)
            meter.end_step(n_tokens)
            state.elapsed = elapsed_at_start + time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_step_end(self)
            last = timeline.reached(duration, state)
            if (state.step - 1) % config.log_interval == 0 or last:
                if meter.peak is not None:  # MFU of the steps since the last record (known peak and FLOPs)
                    mfu = meter.read(task.flops_per_token(self.model, micro_batches[0]))
                self.log({"step": state.step - 1, "tokens": before.tokens, "lr": lr, "loss": loss_value,
                          "grad_norm": clip.norm, "clipped": clip.clipped, "skipped": state.skipped,
                          "time": round(state.elapsed, 4), **({"mfu": round(mfu, 4)} if mfu is not None else {}),
                          **task.step_metrics(micro_batches), **self.step_metrics})
            if not bar.disable or progress.enabled:
                speed = (state.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), refresh=False)
                bar.update(1)
                progress.maybe_print(state, self.total_steps, loss_value, lr, speed,
                                     state.elapsed - elapsed_at_start, before, mfu)

            last = last or any(cb.should_stop for cb in self.callbacks)
            improved = False
            if timeline.crossed(config.eval_interval, before, state, "eval_interval") or last:
                improved = self._evaluate_and_report(bar)
                improved = self._agree_with_main(improved)  # every rank stops and checkpoints as rank 0 decides
            last = last or any(cb.should_stop for cb in self.callbacks)  # e.g. early stopping, decided at eval
            if timeline.crossed(config.checkpoint_interval, before, state, "checkpoint_interval") or last or (
                    improved and self._best[3]):
                self.save_checkpoint()
        bar.close()
        return self._finish()

    def _batch(self, index: int) -> Any:
        batch = self.task.train_batch(index, self.rank, self.world_size)
        for callback in self.callbacks:
            batch = callback.on_batch(self, batch)
        return batch

    def _check_first_batch(self) -> None:
        """One forward pass of the first training batch in eval mode, without gradients and with every RNG put
        back: a batch of the wrong shape or dtype, or a loss that is not a scalar, fails here as bad input."""
        batch = self.task.train_batch(0, self.rank, self.world_size)
        rng = devices.rng_state(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            count = self.task.count(batch)
            with torch.no_grad(), self.precision.autocast():
                loss = tasks.check_loss(self.task.loss(self.model, move_to_device(batch, self.device)),
                                        f"task {self.config.task!r}")
        except KeelError:
            raise
        except Exception as error:  # the user's model or data: any failure here is a mismatch of the two
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise KeelError(f"task {self.config.task!r}: the first training batch fails in the model or loss "
                            f"({type(error).__name__}: {first}); allowed: batches the model accepts "
                            f"(got {_describe_batch(batch)})") from None
        finally:
            self.model.train(was_training)
            devices.set_rng_state(rng, self.device)
        if not isinstance(count, int) or count < 1:
            raise KeelError(f"task {self.config.task!r}: the first batch counts {count!r} loss terms; allowed: an "
                            "int >= 1")
        del loss

    # ------------------------------------------------------------------------------------------ pieces

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, split: str = "val") -> dict[str, float]:
        """Metrics over the task's fixed evaluation batches: ``val_loss`` (and e.g. ``val_accuracy``) for the
        validation split, ``train_eval_loss`` ... for the fixed training slice. Each is a sum over the batches
        divided by the summed count, so it does not depend on how the batches are cut."""
        model = model or self.model
        was_training = model.training
        model.eval()
        self.dist.sync_buffers(model)  # several ranks: score rank 0's model (its BatchNorm statistics)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in self.task.eval_batches(split, *self.dist.eval_shard()):
            count += self.task.count(batch)
            batch = move_to_device(batch, self.device)
            with self.precision.autocast():
                for key, value in self.task.eval_sums(model, batch).items():
                    sums[key] = sums.get(key, 0) + value.detach().double().cpu()
        model.train(was_training)
        if self.dist.eval_shard()[1] > 1:  # each rank scored its shard: sum the sums and the counts over ranks
            reduced = self.dist.sum_dicts({"_count": float(count), **{k: float(v) for k, v in sums.items()}})
            count = int(reduced.pop("_count"))
            sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in reduced.items()}
        prefix = "val_" if split == "val" else "train_eval_"
        return {f"{prefix}{key}": float(value / max(count, 1)) for key, value in sums.items()}

    def sample(self) -> str:
        """The task's sample (a language model's continuation), drawn with a private generator."""
        if not self.dist.is_main and self.dist.strategy != "fsdp":  # FSDP: every rank takes part in each forward
            return ""
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        return self.task.sample(self.model, generator, self.precision.autocast)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (and TensorBoard when enabled)."""
        self.metrics.write(record)

    def say(self, message: str) -> None:
        """Print a line for the user (nothing when quiet), without breaking the progress bar."""
        self._say(message)

    def to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.device)

    def _evaluate_and_report(self, bar) -> bool:
        """Evaluate, log and print; True when the tracked metric improved."""
        state = self.state
        record: dict[str, Any] = {"step": state.step, "tokens": state.tokens, **self.evaluate(),
                                  **self.evaluate(split="train")}
        for callback in self.callbacks:
            callback.on_eval(self, record)
        self.log(record)
        self._last_eval = record
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(record["val_loss"])
        shown = "".join(f" | {k} {v:.4f}" for k, v in record.items() if k not in ("step", "tokens"))
        self._say(f"step {state.step}/{self.total_steps}{shown}", bar)
        text = self.sample()
        if text:
            self._say(f"  sample: {text!r}", bar)
        return self._improves_best(record)

    def _improves_best(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` beats the best checkpointed evaluation by the tracked metric."""
        metric, mode, min_delta, _ = self._best
        value, best = record.get(metric), self.state.best_value
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value < best - min_delta if mode == "min" else value > best + min_delta)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of everything the run needs to continue exactly, then prune old ones. With several
        ranks every rank calls it; rank 0 writes while the others wait at a barrier."""
        state = self.state
        name = rundir.step_dir_name(state.step)
        evaluated = self._last_eval if self._last_eval.get("step") == state.step else {}
        if self._improves_best(evaluated):
            state.best_value, state.best_step, state.best_checkpoint = evaluated[self._best[0]], state.step, name
        val = evaluated.get("val_loss")
        root = self.run_dir / rundir.CHECKPOINTS
        weights = self.dist.model_state_dict(self.model)  # whole, on rank 0 (gathered when sharded)
        optimizer_state = self.dist.optimizer_state_dict(self.model, self.optimizer)
        ranks = self.dist.checkpoint_payload(devices.rng_state(self.device))  # world size, every rank's RNG
        if not self.dist.is_main:
            self.dist.barrier()  # no rank runs ahead of the checkpoint rank 0 is writing
            return root / name
        payload = {
            "trainer": asdict(state),
            "optimizer": optimizer_state,
            "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
            "precision": self.precision.state_dict(),
            "clipper": self.clipper.state_dict(),
            "spike": self.spike_detector.state_dict() if self.spike_detector is not None else None,
            "rng": devices.rng_state(self.device),
            "device": str(self.device),  # where it was written (a resume elsewhere says what it moved)
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "metrics_offset": self.metrics.offset(),
            **ranks,
        }
        meta = {"step": state.step, "tokens": state.tokens, "val_loss": val, "world_size": self.world_size,
                rundir.CONFIG_META_KEY: self._config_text}

        def extra(tmp_dir: Path) -> None:
            for callback in self.callbacks:
                callback.on_checkpoint(self, tmp_dir)

        try:
            path = rundir.write_checkpoint(root, state.step, weights, payload, meta, extra)
            if state.best_checkpoint:
                rundir.point_best(root, state.best_checkpoint)
            rundir.prune(root, self.keep_last, protect={state.best_checkpoint})
        finally:
            self.dist.barrier()
        return path

    def _restore(self) -> int | None:
        """Load the newest checkpoint that loads (reporting newer corrupt ones); return the metrics-log length to
        cut back to."""
        root = self.run_dir / rundir.CHECKPOINTS
        found = self._load_latest()
        if found is None:
            if rundir.step_dirs(root):
                raise KeelError(f"--resume: '{self.run_dir}' holds no intact checkpoint to resume from")
            self._say("no checkpoint was written before the run stopped; starting it again from step 0")
            return 0
        payload = self._load_checkpoint(*found)
        self.dist.on_main(lambda: rundir.point_latest(root, found[0]))  # a kill may have left it behind
        self._project_again(payload)
        self._apply_resume_policy(payload)
        self._say(f"resumed from {found[0].name} (step {self.state.step}, {self.state.tokens:,} tokens)")
        return int(payload["metrics_offset"])

    def _load_latest(self):
        # Read to the CPU, whatever device wrote it: _load_checkpoint moves what belongs on this run's device.
        return rundir.load_latest(self.run_dir / rundir.CHECKPOINTS, "cpu", report=self._say,
                                  required=_PAYLOAD_KEYS)

    def _load_checkpoint(self, found: Path, weights: dict[str, torch.Tensor], payload: dict[str, Any]):
        """Apply a checkpoint read on the CPU: weights, optimizer, schedule, precision, clipper, spike detector,
        callbacks, counters and RNG; the model's and the optimizer's load_state_dict move tensors to the device."""
        self.dist.check_resume(payload, found.name, self.allow_world_size_change)
        try:
            self.dist.load_model_state_dict(self.model, weights)
            self.dist.load_optimizer_state_dict(self.model, self.optimizer, payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise KeelError(f"--resume: checkpoint {found.name} does not fit this run's model or optimizer "
                            f"({first}); allowed: resume with the config the run was trained with") from None
        if devices.saved_device(payload).split(":")[0] != self.device.type:
            self._say(devices.describe_move(found.name, payload, weights, self.device))
        self._load_schedule_state(payload)
        self.precision.load_state_dict(payload["precision"])
        self.clipper.load_state_dict(payload["clipper"])
        if self.spike_detector is not None and payload.get("spike") is not None:
            self.spike_detector.load_state_dict(payload["spike"])
        self.restored_from = found
        for callback in self.callbacks:
            if callback.name in payload["callbacks"]:
                callback.load_state_dict(payload["callbacks"][callback.name])
        known = {f.name for f in fields(TrainState)}
        restored = TrainState(**{k: v for k, v in payload["trainer"].items() if k in known})
        for key, value in asdict(restored).items():
            setattr(self.state, key, value)  # in place: fit() holds a reference to self.state
        rng = self.dist.rank_rng(payload)  # this rank's own stream (a rank the checkpoint lacked keeps its seed)
        note = devices.set_rng_state(rng, self.device) if rng is not None else None
        if note is not None:
            self._say(note)
        return payload

    def _skip_update(self, loss_value: float, grad_norm: float) -> None:
        """Count and log an update skipped for a NaN/inf loss or gradient; stop after too many in a row."""
        state, limit = self.state, self.config.nonfinite.max_consecutive_skips
        state.skipped += 1
        overflow = self.precision.scaler is not None and math.isfinite(loss_value) and self.precision.loss_scale >= 1
        reason = "fp16_overflow" if overflow else "nonfinite_grad" if math.isfinite(loss_value) else "nonfinite_loss"
        state.skip_streak += 0 if overflow else 1
        self.log({"step": state.step, "event": "skipped", "reason": reason, "loss": loss_value,
                  "unclipped_norm": grad_norm, "skipped": state.skipped})
        if state.skip_streak >= limit:
            self._stop(f"training stopped at step {state.step}: {state.skip_streak} consecutive updates skipped "
                       f"for non-finite loss or gradients (last loss {loss_value}, gradient norm {grad_norm}; "
                       f"nonfinite.max_consecutive_skips: {limit})")

    def _roll_back(self, loss_value: float, bar) -> None:
        """Recover from a loss spike as PaLM did: reload the newest checkpoint, skip the batches trained on since
        then and the spiking one (plus ``spike.skip_batches`` more), and scale the LR by ``spike.lr_factor``."""
        cfg, old = self.config.spike, replace(self.state)
        threshold = self.spike_detector.threshold()
        loaded = self._load_latest()
        found = loaded[0] if loaded is not None else None
        spike = {"step": old.step, "event": "spike", "spike_loss": loss_value, "threshold": threshold}
        if old.rollbacks >= cfg.max_rollbacks or found is None:
            self.log(spike)
            why = f"spike.max_rollbacks: {cfg.max_rollbacks} reached" if found is not None else "no checkpoint"
            self._stop(f"training stopped at step {old.step}: loss {loss_value:.4f} spiked above {threshold:.4f} "
                       f"and cannot roll back ({why})")
        payload = self._load_checkpoint(*loaded)
        for callback in self.callbacks:
            callback.on_run_start(self)  # as on resume: callbacks (EMA, ...) take up the state just reloaded
        new = self.state
        skipped_batches = (old.batch_index - new.batch_index) // self.config.grad_accum + cfg.skip_batches
        new.batch_index = old.batch_index + cfg.skip_batches * self.config.grad_accum
        new.skipped, new.elapsed, new.rollbacks = old.skipped, old.elapsed, old.rollbacks + 1
        new.lr_multiplier = old.lr_multiplier * cfg.lr_factor
        new.best_value, new.best_step, new.best_checkpoint = old.best_value, old.best_step, old.best_checkpoint
        new.schedule_steps, new.decays = old.schedule_steps, old.decays  # the schedule in use stays as it is
        # The log keeps the trajectory the model follows: records after the checkpoint are cut, but not events.
        self.metrics.close()
        path, offset, events = self.run_dir / rundir.METRICS, int(payload["metrics_offset"]), []
        if self.dist.is_main:
            with open(path, "rb") as handle:
                handle.seek(offset)
                events = [r for r in map(decode_line, handle.read().splitlines()) if "event" in r]
        self._open_metrics(offset, new.step)
        for record in [*events, spike]:
            self.log(record)
        self.log({"step": new.step, "event": "rollback", "from_step": old.step, "checkpoint": found.name,
                  "batches_skipped": skipped_batches, "lr_multiplier": new.lr_multiplier, "rollbacks": new.rollbacks})
        self._say(f"loss spike at step {old.step} ({loss_value:.4f} > {threshold:.4f}): rolled back to {found.name}, "
                  f"skipping {skipped_batches} batches, LR x{new.lr_multiplier:g}", bar)
        bar.n = new.step
        bar.refresh()

    def _stop(self, message: str) -> None:
        """End the run with ``TrainingUnstableError``; nothing is checkpointed, so the last good checkpoint stays."""
        latest = rundir.newest_intact(self.run_dir / rundir.CHECKPOINTS, report=self._say)
        self.log({"step": self.state.step, "event": "stopped", "skipped": self.state.skipped})
        self.metrics.close()
        if self.dist.is_main:
            plot_run(read_metrics(self.run_dir / rundir.METRICS), self.run_dir / rundir.LOSS_PLOT, self.state,
                     title=str(self.run_dir), counted=self._counted)
        where = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written"
        restart = "" if self.config.restarts else ("; to start a diverged run again with a new seed, set restarts: N "
                                                    "(docs/stability.md)")
        raise TrainingUnstableError(f"{message}; {where}{restart}")

    def _finish(self) -> dict[str, Any]:
        self.metrics.close()
        history = self.dist.from_main(lambda: read_metrics(self.run_dir / rundir.METRICS))
        if self.dist.is_main:
            plot_run(history, self.run_dir / rundir.LOSS_PLOT, self.state, title=str(self.run_dir),
                     counted=self._counted)
        train_losses = [r["loss"] for r in history if "grad_norm" in r]
        evals = [r for r in history if "val_loss" in r]
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "task": self.config.task,
            "step": self.state.step,
            "examples": self.state.examples,
            "tokens": self.state.tokens,
            "skipped": self.state.skipped,
            "train_loss": float(np.mean(train_losses[-20:])) if train_losses else math.nan,
            **self.task.reference_metrics(),
            "time": self.state.elapsed,
            **{k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "tokens", "kind")},
        }
        for callback in self.callbacks:
            callback.on_run_end(self, summary)
        exported = export.finish(self, summary, evals)
        weights = self.dist.model_state_dict(self.model)
        if self.dist.is_main:
            write_safetensors(self.run_dir / rundir.MODEL_WEIGHTS, {k: v.detach() for k, v in weights.items()})
        summary["history"] = history
        reference = "".join(f" vs {k.replace('_', ' ')} {v:.4f}" for k, v in self.task.reference_metrics().items())
        accuracy = f", val_accuracy {summary['val_accuracy']:.4f}" if "val_accuracy" in summary else ""
        best = f"; best step {summary['best_step']}" if "best_step" in summary else ""
        self._say(f"final val_loss {summary.get('val_loss', math.nan):.4f}{reference}{accuracy}{exported} after "
                  f"{self.state.step} steps ({self.state.examples:,} examples, {self.state.tokens:,} "
                  f"{self._counted}, {self.state.elapsed:.1f} s, "
                  f"{self.state.skipped} skipped){best}")
        if "last" in summary:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["last"].items() if k != "step")
            self._say(f"  last evaluation (step {summary['last']['step']}): {shown}")
        self._say(f"wrote {self.run_dir}/{rundir.CONFIG}, {rundir.METRICS}, {rundir.LOSS_PLOT}, {rundir.MODEL_WEIGHTS}, "
                  f"{rundir.CHECKPOINTS}/")
        return summary

    def _open_metrics(self, truncate_to: int | None, step: int) -> None:
        """Open metrics.jsonl (cut back to a checkpoint's offset on resume); only rank 0 writes it."""
        sinks = getattr(getattr(self, "metrics", None), "sinks", [])  # tracking loggers carry on after a rollback
        if not self.dist.is_main:
            self.metrics = distributed.NullMetricsLog()
            return
        self.metrics = MetricsLog(self.run_dir / rundir.METRICS, truncate_to=truncate_to, step=step, report=self._say,
                                  sinks=sinks)
        if self.config.tensorboard:
            self.metrics.enable_tensorboard(self.run_dir / rundir.TENSORBOARD)

    def _agree_with_main(self, improved: bool) -> bool:
        """Rank 0's view of an evaluation's outcome (improved; which callbacks stop) on every rank, so all of them
        checkpoint and stop together."""
        if not self.dist.active:
            return improved
        improved, stops = self.dist.broadcast_object((improved, [cb.should_stop for cb in self.callbacks]))
        for callback, stop in zip(self.callbacks, stops):
            callback.should_stop = stop
        return improved

    def _recipe_summary(self) -> str:
        """What the recipe resolved to, in a few words: optimizer, schedule, clipping."""
        clip = self.config.clip
        clipping = {"none": "no clipping", "norm": f"clip {clip.max_norm:g}"}.get(clip.mode, f"clip {clip.mode}")
        return f"{self.config.optimizer.name}, {self.config.schedule['name']}, {clipping}"

    def _describe_speed(self) -> str:
        """The start line saying what was chosen for speed: device, precision, TF32, compile, the MFU peak."""
        cuda = self.device.type == "cuda"
        device = f"{self.device} ({torch.cuda.get_device_name(self.device)})" if cuda else str(self.device)
        precision = self.precision.mode + ("" if self.precision.reason == "given" else f" ({self.precision.reason})")
        tf32 = f"; TF32 matmuls {'on' if self.config.tf32 else 'off (tf32: false)'}" if cuda else ""
        compiled = f"compile {'on' if self.compiled else 'off'} ({self._compile_reason})"
        peak = "MFU not measured (no peak known: set mfu_peak_tflops)" if self.peak_tflops is None else \
            f"MFU against {self.peak_tflops:g} TFLOP/s"
        return f"speed: {device}; precision {precision}{tf32}; {compiled}; {peak}"

    def _describe_ranks(self, resolved: dict[str, Any]) -> list[str]:
        """Start lines for data parallelism and LR scaling (none for one process without scaling), from what this
        start resolved (``_run_record``)."""
        config, lines = self.config, []
        global_batch, lr = resolved["global_batch"], resolved["optimizer"]["lr"]
        if self.dist.active:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            lines.append(f"distributed: {self.world_size} ranks ({self.dist.strategy}, {backend}); global batch "
                         f"{global_batch} = {config.data.batch_size} per rank x {config.grad_accum} micro-batches x "
                         f"{self.world_size} ranks")
        scale = self.lr_scale
        if scale.rule is not None:
            lines.append(f"lr_scaling: {scale.rule} rule, global batch {global_batch} / base batch "
                         f"{scale.base_batch}: every LR x {scale.factor:.6g} (optimizer.lr {config.optimizer.lr:.6g} "
                         f"-> {lr:.6g})")
        return lines

    def _run_record(self) -> dict[str, Any]:
        """What this start of the run resolved, for the run's records (a ``run`` record of metrics.jsonl): the world
        size and global batch, LR scaling, the optimizer's LR as applied and the kernels chosen for it."""
        scale, lr = self.lr_scale, self.config.optimizer.lr * self.lr_scale.factor
        return {"world_size": self.world_size, "global_batch": scale.global_batch,
                "lr_scaling": {"rule": scale.rule, "base_batch": scale.base_batch, "factor": scale.factor,
                               "lr": lr} if scale.rule is not None else None,
                "optimizer": {"name": self.config.optimizer.name, "lr": lr,
                              "kernels": optim.chosen_kernels(self.optimizer)}}

    def _check_run_dir(self, resume: bool) -> None:
        """Refuse a directory that cannot hold this run, before anything is built or written."""
        (rundir.check_resume_dir if resume else rundir.check_new_run_dir)(self.run_dir)

    def _say(self, message: str, bar=None) -> None:
        if self.quiet:
            return
        (bar.write if bar is not None else tqdm.write)(message, file=sys.stdout)


class _Progress:
    """Plain progress lines for logs without a terminal (CI, nohup, cluster jobs): every N seconds ('30s'), or each
    time the clock passes a multiple of a length (``timeline.crossed``)."""

    def __init__(self, interval: Time | str, enabled: bool, unit: str, timeline: Timeline):
        self.enabled, self.unit, self.timeline = enabled, unit, timeline
        self.seconds = float(interval[:-1]) if isinstance(interval, str) else None
        self.interval = interval if self.seconds is None else None
        self._last = time.perf_counter()

    def maybe_print(self, state: TrainState, max_steps: int, loss: float, lr: float, speed: float,
                    elapsed: float, before: Clock, mfu: float | None = None) -> None:
        """A line when due (and after the first step): ``before`` is the clock before this step."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interval is not None:
            due = self.timeline.crossed(self.interval, before, state, "progress_interval")
        else:
            due = now - self._last >= self.seconds
        if not due and state.step != 1:
            return
        self._last = now
        rate = state.step / max(elapsed, 1e-9)
        eta = (max_steps - state.step) / rate if state.step else math.nan
        shown = f" | MFU {mfu:.1%}" if mfu is not None else ""
        print(f"step {state.step}/{max_steps} | loss {loss:.4f} | lr {lr:.3e} | {speed:,.0f} {self.unit}{shown} | "
              f"ETA {_duration(eta)}", flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe_batch(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


#: What a checkpoint's state.pt must hold for the trainer to continue from it.
_PAYLOAD_KEYS = ("trainer", "optimizer", "precision", "clipper", "rng", "callbacks", "metrics_offset")


def _applied_lr(optimizer: torch.optim.Optimizer, default: float) -> float:
    """The base LR the optimizer holds now (a group's lr divided by its lr_scale)."""
    for group in optimizer.param_groups:
        if group.get("lr_scale", 1.0):
            return float(group["lr"]) / group.get("lr_scale", 1.0)
    return default


def train(
    config: TrainConfig,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    *,
    task: Task | None = None,
    model: torch.nn.Module | None = None,
    train_data: Any = None,
    val_data: Any = None,
    loss_fn: Any = None,
    allow_world_size_change: bool = False,
) -> dict[str, Any]:
    """Train in-process; return the final metrics (``val_loss``, ``train_loss``, ...) and ``history``.

    What is trained: ``task`` (a ``keel.tasks.Task``), or plain PyTorch objects — ``model`` with ``train_data``
    (a map-style dataset of ``(input, target)`` pairs, or a function ``index -> batch``), ``val_data`` and
    ``loss_fn(outputs, targets)`` (default cross-entropy) — or else the task ``config.task`` names. Under torchrun
    every process calls it and they train data-parallel (docs/distributed.md).

    An object passed in is the run's task: the run records ``task: python``, its recipe follows that task (unless
    the config names one) and every value the config was given or assigned is kept; a config naming another task
    (a run's config.yaml says ``task: lm``) gives way to the object, saying so in one line.
    """
    if model is not None:
        if task is not None:
            raise KeelError("train: both task and model were given; allowed: one of the two")
        if train_data is None:
            raise KeelError("train: model was given without train_data; allowed: model with train_data "
                            "(a map-style dataset or a function index -> batch)")
        task = tasks.PlainTask(model, train_data, val_data, loss_fn)
    elif train_data is not None or val_data is not None or loss_fn is not None:
        raise KeelError("train: train_data, val_data and loss_fn go with model=; allowed: model=... too, or a task")
    if task is not None and config.task != tasks.PYTHON_TASK:  # the object is the task: its recipe and blocks follow
        import os

        if config.gave("task") and not quiet and os.environ.get("RANK", "0") == "0":
            print(f"train: the {'model' if model is not None else 'task'} passed in replaces the config's task "
                  f"{config.task!r} (the run records task: python; that task's own settings are dropped)")
        config = config.for_task(tasks.PYTHON_TASK)
    if not config.restarts:
        return Trainer(config, callbacks, run_dir=run_dir, resume=resume, quiet=quiet, task=task,
                       allow_world_size_change=allow_world_size_change).fit()
    initial = restarts.initial_weights(task)  # a model built before train(): each attempt starts from its weights

    def attempt(config: TrainConfig, resume: bool) -> dict[str, Any]:
        restarts.restore(task, initial)
        return Trainer(config, callbacks, run_dir=where, resume=resume, quiet=quiet, task=task,
                       allow_world_size_change=allow_world_size_change).fit()

    where = Path(run_dir or config.out_dir or default_run_dir())
    return restarts.fit(config, attempt, where, resume, say=(lambda _: None) if quiet else print)
