"""The trainer: one lean loop that composes keel's units. One optimizer update reads top to bottom in ``fit``.

It owns the loop, the state and the checkpoints; it owns no technique. Techniques come in as units called at a
fixed place in the step (schedule, precision, clipping) or as callbacks (averaging and the rest).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from keel import optim, schedules
from keel.averaging.callbacks import make_callbacks
from keel.config import TrainConfig, dump_config
from keel.data import RandomWindowSampler, load_tokens, sequential_windows, unigram_cross_entropy
from keel.errors import KeelError
from keel.grad import Clipper, LossSpikeDetector, TrainingUnstableError, all_ranks_agree, count_tokens
from keel.models import GPT, GPTConfig, lm_loss_sum
from keel.precision import Precision
from keel.train import checkpoint as ckpt
from keel.train.callbacks import Callback
from keel.train.metrics import MetricsLog, read_metrics
from keel.train.plot import plot_run


@dataclass
class TrainState:
    """Counters that define where a run is. ``step`` counts applied optimizer updates (0 before the first)."""

    step: int = 0
    tokens: int = 0
    batch_index: int = 0  # next micro-batch the sampler hands out
    skipped: int = 0  # updates skipped (non-finite loss or gradients)
    skip_streak: int = 0  # consecutive skipped updates (fp16 overflows with a finite loss excepted)
    rollbacks: int = 0  # loss-spike rollbacks so far
    lr_multiplier: float = 1.0  # product of spike.lr_factor over the rollbacks
    elapsed: float = 0.0  # training seconds, summed over resumes
    best_val_loss: float = math.inf
    best_checkpoint: str = ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KeelError(f"device: '{name}' was asked for but CUDA is not available; allowed here: auto, cpu")
    return torch.device(name)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class Trainer:
    """Builds the run from a ``TrainConfig`` and trains it with ``fit()``.

    ``resume=True`` continues the run in ``run_dir`` from its newest intact checkpoint; on CPU the result is
    bitwise identical to a run that was never interrupted.
    """

    def __init__(
        self,
        config: TrainConfig,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        run_dir: str | Path | None = None,
        resume: bool = False,
        quiet: bool = False,
    ):
        self.config = config
        self.quiet = quiet
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(run_dir or config.out_dir or default_run_dir())
        self._check_run_dir(resume)

        self.data = load_tokens(config.data.source, config.data.val_fraction, config.data.vocab_size)
        self.sampler = RandomWindowSampler(
            self.data.train, config.model.block_size, config.data.batch_size, config.seed
        )
        self.tokens_per_step = config.tokens_per_step
        self.steps_per_epoch = config.steps_per_epoch(len(self.data.train))
        self.unigram_baseline = unigram_cross_entropy(self.data.train, self.data.val, self.data.vocab_size)

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        model_config = GPTConfig(vocab_size=self.data.vocab_size, **config.model.model_dump())
        self.model = GPT(model_config).to(self.device)
        self.lengths = lengths = {"total_steps": config.max_steps, "steps_per_epoch": self.steps_per_epoch,
                                  "tokens_per_step": self.tokens_per_step}
        self.optimizer = optim.from_config(config.optimizer, self.model, lengths=self.lengths)
        base_lr = float(optim.check_config(config.optimizer)["lr"])
        self.schedule = schedules.from_config(config.schedule, base_lr=base_lr, **lengths)
        self.precision = Precision(config.precision, self.device)
        self.clipper = Clipper(config.clip, warmup_steps=schedules.warmup_steps(self.schedule))
        spike = config.spike
        self.spike_detector = LossSpikeDetector(spike.window, spike.factor, spike.min_history, spike.min_rise) \
            if spike.enabled else None
        self.callbacks = [*make_callbacks(config), *callbacks]
        self.state = TrainState()
        self._resume = resume
        self._last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` updates are applied; return the final metrics and the history."""
        metrics_offset = self._restore() if self._resume else None
        ckpt.atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))  # once resume succeeded
        config, state, model, optimizer = self.config, self.state, self.model, self.optimizer
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", truncate_to=metrics_offset)
        if config.tensorboard:
            self.metrics.enable_tensorboard(self.run_dir / "tensorboard")
        self._say(f"data: {self.data.description}; train {len(self.data.train):,} / val {len(self.data.val):,} "
                  f"tokens; model: {sum(p.numel() for p in model.parameters()):,} parameters; "
                  f"{self.tokens_per_step:,} tokens per step; run directory: {self.run_dir}")
        self._say(f"unigram baseline (validation cross-entropy of token frequencies): {self.unigram_baseline:.4f}")
        for callback in self.callbacks:
            callback.on_run_start(self)
        if self.spike_detector is not None and not ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            self.save_checkpoint()  # a loss spike can always roll back, even before the first checkpoint
        model.train()
        bar = tqdm(total=config.max_steps, initial=state.step, disable=True if self.quiet else None,
                   dynamic_ncols=True, unit="step")
        started, tokens_at_start = time.perf_counter(), state.tokens
        elapsed_at_start = state.elapsed

        while state.step < config.max_steps and not any(cb.should_stop for cb in self.callbacks):
            lr = self.schedule(state.step) * state.lr_multiplier
            schedules.set_lr(optimizer, lr)
            for callback in self.callbacks:
                callback.on_step_start(self)  # may set the LR itself (e.g. the SWA phase): log what is applied
            lr = _applied_lr(optimizer, lr)

            # Forward and backward over the micro-batches; the summed loss is divided once by the global batch's
            # token count, so accumulation matches one large batch whatever each micro-batch holds.
            micro_batches = [self.sampler.batch(state.batch_index + i) for i in range(config.grad_accum)]
            state.batch_index += config.grad_accum
            n_tokens = sum(count_tokens(y) for _, y in micro_batches)
            loss_sum = 0.0
            for x, y in micro_batches:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.precision.autocast():
                    loss = lm_loss_sum(model(x), y) / n_tokens
                self.precision.scale(loss).backward()
                loss_sum += loss.detach()
            for callback in self.callbacks:
                callback.on_after_backward(self)

            # Unscale (fp16), clip (the unclipped norm is always measured), then update unless the loss or a gradient
            # is NaN/inf (all ranks decide alike) or the loss spiked; a skipped update changes no state but counters.
            self.precision.unscale_(optimizer)
            clip = self.clipper(model.parameters(), state.step)
            loss_value = float(loss_sum)
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

            state.step += 1
            tokens_before, state.tokens = state.tokens, state.tokens + self.tokens_per_step
            state.elapsed = elapsed_at_start + time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_step_end(self)
            if (state.step - 1) % config.log_interval == 0 or state.step == config.max_steps:
                self.log({"step": state.step - 1, "tokens": tokens_before, "lr": lr, "loss": loss_value,
                          "grad_norm": clip.norm, "clipped": clip.clipped, "skipped": state.skipped,
                          "time": round(state.elapsed, 4)})
            speed = (state.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}", refresh=False)
            bar.update(1)

            last = state.step == config.max_steps or any(cb.should_stop for cb in self.callbacks)
            if state.step % config.eval_interval == 0 or last:
                self._evaluate_and_report(bar)
            if state.step % config.checkpoint_interval == 0 or last:
                self.save_checkpoint()
        bar.close()
        return self._finish()

    # ------------------------------------------------------------------------------------------ pieces

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Mean validation cross-entropy (nats/token) over the fixed validation windows."""
        model = model or self.model
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for x, y in sequential_windows(self.data.val, self.config.model.block_size, self.config.data.batch_size,
                                       self.config.data.eval_tokens):
            x, y = x.to(self.device), y.to(self.device)
            with self.precision.autocast():
                total += lm_loss_sum(model(x), y).double().cpu()
            count += y.numel()
        model.train(was_training)
        return float(total / count)

    def sample(self) -> str:
        """A short continuation of the fixed prompt, drawn with a private generator (training RNG untouched)."""
        cfg = self.config.sample
        if cfg.tokens == 0:
            return ""
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        if self.data.is_bytes:
            prompt = list(cfg.prompt.encode("utf-8")) or [10]
        else:
            prompt = [0]
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        self.model.eval()
        with self.precision.autocast():
            out = self.model.generate(idx, cfg.tokens, cfg.temperature, cfg.top_k, generator=generator)[0].tolist()
        self.model.train()
        if self.data.is_bytes:
            return bytes(out).decode("utf-8", errors="replace")
        return " ".join(map(str, out))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (and TensorBoard when enabled)."""
        self.metrics.write(record)

    def _evaluate_and_report(self, bar) -> None:
        state = self.state
        record: dict[str, Any] = {"step": state.step, "tokens": state.tokens, "val_loss": self.evaluate()}
        for callback in self.callbacks:
            callback.on_eval(self, record)
        self.log(record)
        self._last_eval = record
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(record["val_loss"])
        extras = "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("val_loss_"))
        self._say(f"step {state.step}/{self.config.max_steps} | val_loss {record['val_loss']:.4f}{extras}", bar)
        text = self.sample()
        if text:
            self._say(f"  sample: {text!r}", bar)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of everything the run needs to continue exactly, then prune old ones."""
        state = self.state
        name = ckpt.step_dir_name(state.step)
        val = self._last_eval.get("val_loss") if self._last_eval.get("step") == state.step else None
        if val is not None and val < state.best_val_loss:
            state.best_val_loss, state.best_checkpoint = val, name
        payload = {
            "trainer": asdict(state),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
            "precision": self.precision.state_dict(),
            "clipper": self.clipper.state_dict(),
            "spike": self.spike_detector.state_dict() if self.spike_detector is not None else None,
            "rng": _rng_state(self.device),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "metrics_offset": self.metrics.offset(),
        }
        meta = {"step": state.step, "tokens": state.tokens, "val_loss": val}
        root = self.run_dir / "checkpoints"

        def extra(tmp_dir: Path) -> None:
            for callback in self.callbacks:
                callback.on_checkpoint(self, tmp_dir)

        path = ckpt.write_checkpoint(root, state.step, self.model.state_dict(), payload, meta, extra)
        if state.best_checkpoint:
            ckpt.atomic_write_text(root / "best", state.best_checkpoint + "\n")
        ckpt.prune(root, self.config.keep_last, protect={state.best_checkpoint})
        return path

    def _restore(self) -> int | None:
        """Load the newest intact checkpoint; return the metrics-log length to cut back to."""
        if not ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            self._say("no checkpoint was written before the run stopped; starting it again from step 0")
            return 0
        found = ckpt.latest_valid(self.run_dir / "checkpoints", report=self._say)
        if found is None:
            raise KeelError(f"--resume: '{self.run_dir}' holds no intact checkpoint to resume from")
        payload = self._load_checkpoint(found)
        self._say(f"resumed from {found.name} (step {self.state.step}, {self.state.tokens:,} tokens)")
        return int(payload["metrics_offset"])

    def _load_checkpoint(self, found: Path) -> dict[str, Any]:
        """Load weights, optimizer, schedule, precision, clipper, spike detector, callbacks, counters and RNG."""
        weights, payload = ckpt.load_checkpoint(found, device=self.device)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("schedule") is not None:
            self.schedule.load_state_dict(payload["schedule"])
        self.precision.load_state_dict(payload["precision"])
        self.clipper.load_state_dict(payload["clipper"])
        if self.spike_detector is not None and payload.get("spike") is not None:
            self.spike_detector.load_state_dict(payload["spike"])
        for callback in self.callbacks:
            if callback.name in payload["callbacks"]:
                callback.load_state_dict(payload["callbacks"][callback.name])
        for key, value in asdict(TrainState(**payload["trainer"])).items():
            setattr(self.state, key, value)  # in place: fit() holds a reference to self.state
        _set_rng_state(payload["rng"], self.device)
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
        found = ckpt.latest_valid(self.run_dir / "checkpoints", report=self._say)
        spike = {"step": old.step, "event": "spike", "spike_loss": loss_value, "threshold": threshold}
        if old.rollbacks >= cfg.max_rollbacks or found is None:
            self.log(spike)
            why = f"spike.max_rollbacks: {cfg.max_rollbacks} reached" if found is not None else "no checkpoint"
            self._stop(f"training stopped at step {old.step}: loss {loss_value:.4f} spiked above {threshold:.4f} "
                       f"and cannot roll back ({why})")
        payload = self._load_checkpoint(found)
        for callback in self.callbacks:
            callback.on_run_start(self)  # as on resume: callbacks (EMA, ...) take up the state just reloaded
        new = self.state
        skipped_batches = (old.batch_index - new.batch_index) // self.config.grad_accum + cfg.skip_batches
        new.batch_index = old.batch_index + cfg.skip_batches * self.config.grad_accum
        new.skipped, new.elapsed, new.rollbacks = old.skipped, old.elapsed, old.rollbacks + 1
        new.lr_multiplier = old.lr_multiplier * cfg.lr_factor
        new.best_val_loss, new.best_checkpoint = old.best_val_loss, old.best_checkpoint
        # The log keeps the trajectory the model follows: records after the checkpoint are cut, but not events.
        self.metrics.close()
        path, offset = self.run_dir / "metrics.jsonl", int(payload["metrics_offset"])
        with open(path, "rb") as handle:
            handle.seek(offset)
            events = [r for r in map(json.loads, handle.read().splitlines()) if "event" in r]
        self.metrics = MetricsLog(path, truncate_to=offset)
        if self.config.tensorboard:
            self.metrics.enable_tensorboard(self.run_dir / "tensorboard")
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
        latest = ckpt.latest_valid(self.run_dir / "checkpoints", report=self._say)
        self.log({"step": self.state.step, "event": "stopped", "skipped": self.state.skipped})
        self.metrics.close()
        plot_run(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png", self.tokens_per_step,
                 title=str(self.run_dir))
        where = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written"
        raise TrainingUnstableError(f"{message}; {where}")

    def _finish(self) -> dict[str, Any]:
        self.metrics.close()
        history = read_metrics(self.run_dir / "metrics.jsonl")
        plot_run(history, self.run_dir / "loss.png", self.tokens_per_step, title=str(self.run_dir))
        train_losses = [r["loss"] for r in history if "grad_norm" in r]
        evals = [r for r in history if "val_loss" in r]
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "skipped": self.state.skipped,
            "train_loss": float(np.mean(train_losses[-20:])) if train_losses else math.nan,
            "unigram_baseline": self.unigram_baseline,
            "time": self.state.elapsed,
            **{k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_loss")},
        }
        for callback in self.callbacks:
            callback.on_run_end(self, summary)
        summary["history"] = history
        self._say(f"final val_loss {summary.get('val_loss', math.nan):.4f} vs unigram baseline "
                  f"{self.unigram_baseline:.4f} after {self.state.step} steps ({self.state.tokens:,} tokens, "
                  f"{self.state.elapsed:.1f} s, {self.state.skipped} skipped)")
        self._say(f"wrote {self.run_dir}/config.yaml, metrics.jsonl, loss.png, checkpoints/")
        return summary

    def _check_run_dir(self, resume: bool) -> None:
        config_path = self.run_dir / "config.yaml"
        if resume:
            if not config_path.is_file():
                raise KeelError(f"--resume: '{self.run_dir}' is not a keel run directory (no config.yaml)")
        elif (self.run_dir / "metrics.jsonl").exists():
            raise KeelError(
                f"out_dir: '{self.run_dir}' already holds a run; allowed: --resume {self.run_dir} to continue it, "
                "or another --out"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _say(self, message: str, bar=None) -> None:
        if self.quiet:
            return
        (bar.write if bar is not None else tqdm.write)(message, file=sys.stdout)


def _applied_lr(optimizer: torch.optim.Optimizer, default: float) -> float:
    """The base LR the optimizer holds now (a group's lr divided by its lr_scale)."""
    for group in optimizer.param_groups:
        if group.get("lr_scale", 1.0):
            return float(group["lr"]) / group.get("lr_scale", 1.0)
    return default


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    config: TrainConfig,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train from a config in-process; return the final metrics (``val_loss``, ``train_loss``, ...) and ``history``."""
    return Trainer(config, callbacks, run_dir=run_dir, resume=resume, quiet=quiet).fit()
