"""Sequence-length warmup: train on short sequences first and lengthen them to the full context.

Li, Zhang and He, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training GPT Models"
(NeurIPS 2022), implemented as DeepSpeed's curriculum learning (``seqlen`` truncation) and as Composer's
``SeqLengthWarmup``: full-length training sequences are cut to the scheduled length, so the model, its positional
embeddings (sized to the full context from the start) and the data pipeline stay as they are.

The unit ``SequenceLengthWarmup`` is a pure function of the step. With ``start`` = s, the model's context L and a
duration of D steps, at step t < D

    linear:   l(t) = s + (L - s) * t / D
    stepped:  l(t) = s + (L - s) * floor(t * K / D) / K       (K = ``stages`` plateaus before the full length)

rounded down to a multiple of 8 (as DeepSpeed's ``difficulty_step``) and kept within [s, L]; from t = D on,
l(t) = L. Two ways to shorten a batch of B rows of length L to l:

- ``keep_tokens_per_step: true`` (Composer's default, DeepSpeed's ``seqlen_reshape``): each row is cut into
  ceil(L / l) consecutive chunks of length l, so the batch grows to B * ceil(L / l) rows and trains on exactly
  the targets it held. When l does not divide L the last chunk of a row ends at the row's end and overlaps the
  one before; the overlap's targets are masked (-100), so no target counts twice and the tokens per step stay
  exactly constant. For a causal language model a chunk of a window is a valid window.
- ``keep_tokens_per_step: false`` (Li et al.'s truncation): each row keeps its first l positions; the batch
  keeps its B rows and trains on fewer tokens while the length is short.

Both act on each micro-batch alone and commute with splitting a batch into rows, and the trainer divides the
summed loss by the counted targets after this transform, so gradient accumulation and data parallelism stay
exact. Evaluation always uses the full context. The length is logged as ``seq_len`` in each step record.

The clock counts what the cut batches hold, and lengths resolved ahead of time (a schedule's warmup in tokens,
``duration`` itself) see it: truncation projects a step's tokens as l(t) / L of the full batch's, chunking its
examples as ceil(L / l(t)) times as many rows (exact for the language model's packed windows; for documents
shorter than l(t), which are not cut, an estimate). A ``duration`` in tokens, examples or epochs is the first D
at which the steps 0..D-1 of the warmup over D steps reach it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.errors import KeelError
from keel.grad.accumulate import IGNORE_INDEX
from keel.task_registry import task_spec
from keel.techniques import Callback, register_technique
from keel.timeunits import Time, Timeline, whole_count

MULTIPLE = 8  # lengths are multiples of 8 (DeepSpeed's difficulty_step), never below
TARGET_KEYS = ("targets", "labels")


@dataclass(frozen=True)
class SequenceLengthWarmup:
    """Step -> sequence length, from ``start`` to ``full`` over ``duration`` steps (linear or stepped pacing),
    rounded down to a multiple of 8 and kept within [start, full]; ``full`` from step ``duration`` on.

    >>> warmup = SequenceLengthWarmup(start=64, full=256, duration=100)
    >>> [warmup(t) for t in (0, 50, 99, 100)]
    [64, 160, 248, 256]
    """

    start: int
    full: int
    duration: int
    pacing: Literal["linear", "stepped"] = "linear"
    stages: int = 4

    def __post_init__(self) -> None:
        if not MULTIPLE <= self.start <= self.full:
            raise KeelError(f"seq_warmup.start: {self.start}; allowed: {MULTIPLE} to the context length {self.full}")
        if self.duration < 0 or self.stages < 1 or self.pacing not in ("linear", "stepped"):
            raise KeelError(f"seq_warmup: duration {self.duration}, pacing {self.pacing!r}, stages {self.stages}; "
                            "allowed: duration >= 0, pacing linear or stepped, stages >= 1")

    def __call__(self, step: int) -> int:
        if step >= self.duration or self.start >= self.full:
            return self.full
        span = self.full - self.start
        if self.pacing == "linear":
            length = self.start + span * step // self.duration
        else:
            length = self.start + span * (step * self.stages // self.duration) // self.stages
        return min(self.full, max(self.start - self.start % MULTIPLE, length - length % MULTIPLE))


def truncate_sequences(batch: Any, length: int) -> Any:
    """Every tensor of ``batch`` with a sequence dimension (dim 1) longer than ``length``, cut to its first
    ``length`` positions; the rows stay."""
    return _map_tensors(batch, lambda t, is_target: t[:, :length] if t.dim() >= 2 and t.shape[1] > length else t)


def reshape_sequences(batch: Any, length: int) -> Any:
    """Each row of ``batch`` cut into ceil(L / length) consecutive chunks of ``length`` (rows in order, a row's
    chunks in order), the last ending at the row's end with the targets it shares with the chunk before masked;
    chunks left without a target (all padding) are dropped. Targets are the second item of an
    ``(inputs, targets)`` pair, or a dict's ``targets`` / ``labels``."""
    full = _sequence_length(batch)
    if full is None or full <= length:
        return batch
    n = -(-full // length)
    starts = torch.arange(n) * length
    starts[-1] = full - length
    index = (starts[:, None] + torch.arange(length)).reshape(-1)
    overlap = torch.zeros(n, length, dtype=torch.bool)
    overlap[-1, : n * length - full] = True  # already a target in the chunk before

    def chunk(t: torch.Tensor, is_target: bool) -> torch.Tensor:
        if t.dim() < 2 or t.shape[1] != full:
            return t
        out = t.index_select(1, index.to(t.device)).reshape(t.shape[0] * n, length, *t.shape[2:])
        if is_target:
            out = out.masked_fill(overlap.to(t.device).repeat(t.shape[0], 1), IGNORE_INDEX)
        return out

    chunked = _map_tensors(batch, chunk)
    targets = _targets(chunked)
    if targets is not None and targets.dim() == 2:
        keep = (targets != IGNORE_INDEX).any(dim=1)
        if not bool(keep.all()) and bool(keep.any()):
            rows = keep.nonzero().squeeze(1)
            chunked = _map_tensors(chunked, lambda t, _: t.index_select(0, rows.to(t.device)) if t.dim() >= 1 else t)
    return chunked


def _map_tensors(batch: Any, fn) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch, False)
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(v, len(batch) == 2 and i == 1) if isinstance(v, torch.Tensor) else v
                           for i, v in enumerate(batch))
    if isinstance(batch, dict):
        return {k: fn(v, k in TARGET_KEYS) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _targets(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        return next((batch[k] for k in TARGET_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    return None


def _sequence_length(batch: Any) -> int | None:
    tensors = batch if isinstance(batch, (tuple, list)) else batch.values() if isinstance(batch, dict) else [batch]
    lengths = [t.shape[1] for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 2]
    return max(lengths) if lengths else None


# ---------------------------------------------------------------------------------------------- the technique


class SeqWarmupConfig(BaseModel):
    """Sequence-length warmup (Li et al. 2022): short sequences first, the full context after ``duration``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool | Literal["auto"] = Field(
        False, description="Turn sequence-length warmup on (true), off (false), or 'auto': on where the task's batches "
        "are sequences with a context length (task lm), starting at most at that context, and off elsewhere (what "
        "recipe fast uses).",
    )
    start: int = Field(64, description="Sequence length at step 0 (>= 8, at most model.block_size; rounded down "
                       "to a multiple of 8).")
    duration: Time = Field("30%", description="Until the full context: steps, '30%' of the run, '2ep', '50Mtok' "
                           "(tokens as the cut batches count them) or '1Mex'.")
    keep_tokens_per_step: bool = Field(
        True, description="true: rows are cut into chunks of the current length, so the batch grows and the tokens "
        "per step stay constant (Composer); false: rows are truncated and the batch keeps its rows (Li et al.).",
    )
    pacing: Literal["linear", "stepped"] = Field(
        "linear", description="'linear': the length grows every step; 'stepped': it grows in `stages` plateaus.")
    stages: int = Field(4, ge=1, description="Plateaus before the full length with pacing 'stepped'.")

    @field_validator("start")
    @classmethod
    def _at_least_eight(cls, value: int) -> int:
        if value < MULTIPLE:
            raise KeelError(f"seq_warmup.start: {value} is below {MULTIPLE}; allowed: {MULTIPLE} to model.block_size")
        return value


def check_seq_warmup(block: SeqWarmupConfig, config: Any) -> None:
    """Checks against the rest of the run config, when it is loaded: the task has sequences, and the start fits
    their context (a registered task says its context length; other tasks are checked when the run starts)."""
    if block.enabled is not True:  # off, or 'auto': decided by the task at run start
        return
    spec = task_spec(config.task)
    if spec is None or spec.context_length is None:
        return
    context = spec.context_length(config)
    if context is None:
        raise KeelError(f"seq_warmup.enabled: task {config.task} has no sequences; allowed: a task whose batches "
                        "are sequences (task lm, or a task with a block_size attribute)")
    if block.start > context:
        raise KeelError(f"seq_warmup.start: {block.start} is above the context ({context} tokens, task "
                        f"{config.task}); allowed: {MULTIPLE} to {context}")


class SeqWarmupCallback(Callback):
    """Cuts each training micro-batch to the scheduled length (``on_batch``) and logs it as ``seq_len``."""

    name = "seq_warmup"

    def __init__(self, config: SeqWarmupConfig):
        self.config = config
        self.unit: SequenceLengthWarmup | None = None
        self._saved: dict[str, Any] | None = None  # the state a checkpoint restored
        self._kept: str | None = None  # what on_run_start says when a restored warmup keeps its length

    def check(self, trainer) -> None:
        """The task has sequences (a block_size) and the warmup fits them: found before the run directory is made
        (the trainer builds the unit when it projects the run's counts, ``project_counts``)."""
        if self.unit is None:
            self.unit = self._build(trainer)

    def project_counts(self, trainer):
        """The warmup resolved against the run's timeline, and how it changes each step's counts until it ends.
        Restored from a checkpoint (the trainer projects again after ``load_state_dict``), the warmup keeps the
        length it was trained with, so the run's projection, its schedule and the cut batches all follow it."""
        self.unit = self._build(trainer)
        if self.unit is None:
            return None
        self._kept = None
        if self._saved is not None and self._saved["duration"] != self.unit.duration:  # '30%' of a longer run
            self._kept = (f"seq_warmup: duration kept at {self._saved['duration']} steps from the checkpoint "
                          f"({self.config.duration} now resolves to {self.unit.duration})")
            self.unit = replace(self.unit, duration=self._saved["duration"])
        return self._transform(self.unit), self.unit.duration

    def _plan(self, trainer) -> tuple[int, int] | None:
        """(start, full length), or None for 'auto' on a task without sequences."""
        full = getattr(trainer.task, "block_size", None)
        auto = self.config.enabled == "auto"
        if auto and (not isinstance(full, int) or full < MULTIPLE):
            return None  # 'auto' on a task without sequences (or a context under 8 tokens): off
        if not isinstance(full, int):
            raise KeelError(f"seq_warmup.enabled: task {trainer.config.task!r} has no block_size (its context length); "
                            "allowed: task lm, or a task with a block_size attribute whose batches are sequences")
        return (min(self.config.start, full // MULTIPLE * MULTIPLE) if auto else self.config.start), full

    def _build(self, trainer) -> SequenceLengthWarmup | None:
        plan = self._plan(trainer)
        if plan is None:
            return None
        start, full = plan

        def warmup(duration: int) -> SequenceLengthWarmup:
            return SequenceLengthWarmup(start, full, duration, self.config.pacing, self.config.stages)

        return warmup(self._duration(trainer.timeline, warmup))

    def _transform(self, unit: SequenceLengthWarmup):
        """(examples, tokens) of a step of full-length rows -> those of the rows cut to the step's length."""
        if self.config.keep_tokens_per_step:
            return lambda step, counts: (counts[0] * -(-unit.full // unit(step)), counts[1])
        return lambda step, counts: (counts[0], counts[1] * unit(step) / unit.full)

    def _duration(self, timeline: Timeline, warmup) -> int:
        """``duration`` in steps: as the timeline says for steps (and shares of a run in steps); for a length in
        examples or tokens the first D at which the steps before D of a warmup over D steps, cut as it cuts them,
        reach it (found by bisection: the counts grow with D)."""
        key = "seq_warmup.duration"
        unit, amount = timeline.amount(self.config.duration, key)
        full_length = timeline.steps(self.config.duration, key)  # uncut: the warmup cuts counts, never adds
        if unit == "step" or full_length == 0:
            return full_length
        index, target = ("example", "token").index(unit), whole_count(amount)

        def counted(duration: int) -> float:
            transform = self._transform(warmup(duration))
            return sum(transform(t, timeline.counts(t))[index] for t in range(duration))

        low, high = full_length, max(full_length, 1)
        while counted(high) < target:
            low, high = high, 2 * high
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if counted(middle) < target else (low, middle)
        return low

    def on_run_start(self, trainer) -> None:
        if self.unit is None:
            return
        if self._kept is not None:
            trainer.say(self._kept)
            self._kept = None
        if self._saved is None:
            kept = "tokens per step kept" if self.config.keep_tokens_per_step else "rows kept"
            trainer.say(f"seq_warmup: sequence length {self.unit(0)} -> {self.unit.full} over {self.unit.duration} "
                        f"steps ({self.config.pacing}; {kept})")

    def on_step_start(self, trainer) -> None:
        if self.unit is not None:
            trainer.step_metrics["seq_len"] = self.unit(trainer.state.step)

    def on_batch(self, trainer, batch: Any) -> Any:
        if self.unit is None:
            return batch
        length = self.unit(trainer.state.step)
        if self.config.keep_tokens_per_step:
            return reshape_sequences(batch, length)
        return truncate_sequences(batch, length)

    def state_dict(self) -> dict[str, Any]:
        unit = self.unit
        return {} if unit is None else {"start": unit.start, "full": unit.full, "duration": unit.duration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state) if state else None


register_technique("seq_warmup", SeqWarmupConfig,
                   lambda block: SeqWarmupCallback(block) if block.enabled else None, check=check_seq_warmup)

__all__ = ["SequenceLengthWarmup", "SeqWarmupCallback", "SeqWarmupConfig", "reshape_sequences",
           "truncate_sequences"]
