"""The typed run config: documented fields with defaults, loaded from YAML plus ``key=value`` overrides.

Validation is pydantic's; every failure becomes one ``KeelError`` naming the dotted key, the value given and
what is allowed, raised before any training starts.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from keel.errors import KeelError
from keel.grad.config import ClipConfig, NonFiniteConfig, SpikeConfig
from keel.optim.registry import OptimizerConfig
from keel.recipes import RECIPES, apply_recipe, fill_in
from keel.task_registry import check_task_name, task_spec, task_specs
from keel.techniques import techniques
from keel.timeunits import MAX_RUN_STEPS, Time, stand_in

# Hard bounds on sizes, far above any run this toolkit is for, so an absurd value fails here with its key rather
# than as a failed allocation or a hang; what fits in memory is checked against the machine by the task.
MAX_BATCH_SIZE = 1 << 20
MAX_GRAD_ACCUM = 1 << 16
SEED_LIMIT = 2**32  # numpy's legacy seeding takes 0 <= seed < 2**32
THREADS_PER_CPU = 4
MAX_CONFIG_DEPTH = 64  # nesting levels of a config file or override value
MAX_CONFIG_NODES = 100_000  # values in a config file once YAML anchors are expanded


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Block):
    """How batches are drawn, whatever the task: the batch size and the validation share. A task may extend the
    block with its own keys (the language model's data.source, data.tokenizer, ...: docs/data.md)."""

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the data kept for validation.")
    batch_size: int = Field(
        32, ge=1, le=MAX_BATCH_SIZE, description="Sequences (examples) per micro-batch on each rank (at most 2**20; "
        "what fits in memory is checked); derived from global_batch_size when that is set.",
    )
    global_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH_SIZE, description="Sequences (examples) per optimizer step over all ranks and "
        "micro-batches; when set, batch_size = global_batch_size / (world size x grad_accum), which must divide it, "
        "so a run sees the same batches whatever its number of processes (docs/distributed.md).",
    )


class LrScalingConfig(_Block):
    """Scale every LR of the schedule from a reference global batch to the run's (docs/distributed.md).

    factor = global_batch / base_batch (``linear``, Goyal et al. 2017, with warmup) or its square root (``sqrt``, for
    adaptive optimizers); global_batch = data.batch_size x grad_accum x world size. What a run resolves (its global
    batch, the factor, the scaled LR) goes to its records (the ``run`` record of metrics.jsonl), not into the config.
    """

    rule: Literal["linear", "sqrt"] | None = Field(
        None, description="'linear' (LR x global_batch / base_batch), 'sqrt' (LR x its square root), or null (off).",
    )
    base_batch: int | None = Field(
        None, ge=1, description="The global batch (examples per optimizer step) optimizer.lr and the schedule were "
        "tuned for.",
    )
    @model_validator(mode="before")
    @classmethod
    def _results_are_records(cls, raw: Any) -> Any:
        """A config.yaml of an earlier version recorded the resolved global_batch, factor and lr here: they are the
        run's results, not settings (the run records them), so they are dropped on reading."""
        if isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if k not in ("global_batch", "factor", "lr")}
        return raw

    @model_validator(mode="after")
    def _rule_needs_base(self) -> "LrScalingConfig":
        if (self.rule is None) != (self.base_batch is None):
            given = f"rule: {self.rule!r}, base_batch: {self.base_batch!r}"
            raise ValueError(f"{given}; allowed: both set (e.g. {{rule: linear, base_batch: 256}}) or "
                             "neither")
        return self


# The seed articles' baseline recipe (keel.recipes): an optimizer block naming adamw, or a schedule naming cosine,
# starts from these values, whatever the recipe; a cosine without min_lr decays to a tenth of its peak LR.
DEFAULT_OPTIMIZER = RECIPES["baseline"]["optimizer"]
DEFAULT_SCHEDULE = RECIPES["baseline"]["schedule"]


class TrainConfig(_Block):
    """A whole training run. Lengths given as time units accept steps, '2%' of the run, '3ep' or '2Mtok'.

    Besides the fields below, every registered technique (``keel.techniques``) adds its block (``ema``, ``swa``,
    ``early_stopping``, ...), validated by the technique's own config model, and the task adds the blocks it owns
    (``keel.task_registry``: the language model's ``model`` and ``sample``, and its keys of ``data``).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    task: str = Field(
        "lm", description="What to train: 'lm' (a language model on data.source), 'digits' (scikit-learn's 8x8 "
        "digits, a small CNN), or 'package.module:factory' returning a keel Task.",
    )
    task_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the task's factory.")
    recipe: Literal["baseline", "gpt-loop", "fast"] | None = Field(
        None, description="A named recipe that fills in optimizer, schedule, clipping and techniques (keys the "
        "config gives win, key by key): 'fast' (Muon + warmup-stable-decay + sequence-length warmup, the measured "
        "winner of benchmarks/bench_recipes.py; docs/recipes.md), 'baseline' (AdamW, warmup from 0, cosine to a "
        "tenth of the peak, clipping at 1.0) or 'gpt-loop' (the GPT training loop exactly: warmup from 3e-5, cosine "
        "to 1e-6, clipping from the end of warmup). null: fast for task lm, baseline for other tasks.",
    )
    init_from: str | None = Field(
        None, description="Start from pretrained weights: a keel run directory (its best, else newest, checkpoint), "
        "a checkpoint directory, a .safetensors file, or a Hugging Face model directory.",
    )
    init_from_strict: bool = Field(
        True, description="Every weight must match by name and shape; false loads what matches (e.g. a new head) "
        "and reports the rest.",
    )
    init_from_exclude: list[str] = Field(
        default_factory=list, description="Name prefixes of weights not to load from init_from (e.g. [head] for a "
        "fresh classifier head).",
    )
    seed: int = Field(1337, ge=0, lt=SEED_LIMIT, description="Seed for initialisation, dropout and batch sampling "
                      "(0 <= seed < 2**32, what numpy and torch accept).")
    max_steps: int | None = Field(600, ge=1, le=MAX_RUN_STEPS, description="The run length in optimizer updates (at "
                                  "most 10**12); duration gives it in any unit instead (one of the two).")
    duration: Time | None = Field(
        None, description="The run length in any unit: steps (2000), epochs ('3ep'), tokens ('50Mtok') or examples "
        "('1Mex'); the run stops at the first step at which the trainer's counted clock reaches it. Instead of "
        "max_steps (giving both is an error).",
    )
    out_dir: str | None = Field(None, description="Run directory (default: runs/<date>-<time>).")
    grad_accum: int = Field(1, ge=1, le=MAX_GRAD_ACCUM,
                            description="Micro-batches accumulated into one optimizer update (at most 65536).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype for forward passes; weights and optimizer state stay fp32. 'auto': bf16 "
        "on a CUDA device with bf16 (A100, H100, ...), fp16 with loss scaling on older CUDA devices, fp32 on the CPU."
    )
    tf32: bool = Field(True, description="On CUDA, float32 matrix products run on TF32 tensor cores (Ampere and "
                       "later; about 2-3x faster, 10 mantissa bits in the inputs); false: full float32.")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model (and keel's own optimizers' update kernels). 'auto': on CUDA "
        "when the run is long enough to repay the compile (its estimated eager training time >= 10 minutes; "
        "docs/performance.md); never on the CPU.",
    )
    mfu_peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s that MFU (model FLOPs utilisation, in step records and the progress "
        "line) is measured against; null: the GPU's dense bf16 peak from keel's table (none on the CPU).",
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    deterministic: bool = Field(
        False, description="Deterministic kernels on CUDA: torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts, cuDNN benchmark off (docs/gpu.md). Without it a "
        "resume restores every state exactly, but GPU kernels may sum in another order.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (null: torch's default; at most "
                                "4 per CPU core of the machine).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How several processes (torchrun, or keel train --nproc N) train one model: 'ddp' "
        "(DistributedDataParallel: every rank holds the model, gradients are all-reduced) or 'fsdp' (FSDP2 "
        "fully_shard: parameters, gradients and optimizer state sharded over the ranks). One process ignores it.",
    )
    lr_scaling: LrScalingConfig = Field(default_factory=LrScalingConfig)
    data: SerializeAsAny[DataConfig] = Field(default_factory=DataConfig)  # a task's data model may extend it
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(DEFAULT_OPTIMIZER),
        description="Optimizer: name and hyperparameters (see `keel.optim.names()`), typed once by the optimizer's "
        "registry record (its hyperparameters, defaults and checks); no weight decay on biases, norms and "
        "embeddings.",
    )
    schedule: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SCHEDULE),
        description="Learning-rate schedule: name and parameters (see docs/schedules.md); its peak LR is "
        "optimizer.lr unless the schedule sets lr; cosine decays to min_lr, by default a tenth of the peak.",
    )
    clip: ClipConfig = Field(default_factory=ClipConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    eval_interval: Time = Field(Time.steps(100), description="Evaluate each time the clock passes a multiple of "
                                "this: steps (100), '0.5ep', '10Mtok', '10%' of the run (and always at the end).")
    log_interval: int = Field(1, ge=1, description="Write a metrics record every this many steps.")
    checkpoint_interval: Time = Field(Time.steps(100), description="Checkpoint each time the clock passes a multiple "
                                      "of this (steps, '1ep', '50Mtok', '25%'; and at the end).")
    resume_policy: Literal["refuse", "keep_schedule", "new_decay"] = Field(
        "refuse", description="When --resume changes max_steps: 'refuse' (the LR would jump), 'keep_schedule' (the "
        "schedule keeps the planned length; after it the LR stays at its final value) or 'new_decay' (from the "
        "resume point a cosine decay from the current LR to the schedule's final LR over the new length).",
    )
    resume_peak_lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="With resume_policy new_decay: the LR the new decay starts from "
        "(reached after resume_warmup; optimizer.lr's units). null: the current LR, or where that is 0 (a schedule "
        "that ended at 0, e.g. wsd) the schedule's peak (schedule.lr, else optimizer.lr).",
    )
    resume_warmup: Time | None = Field(
        None, description="With resume_policy new_decay: steps (or '2%', '1ep', '5Mtok') from the current LR up to "
        "the new decay's start. null: the schedule's own warmup (at most half the extension) when the decay starts "
        "above the current LR, else 0.",
    )
    restarts: int = Field(
        0, ge=0, le=1000, description="When the run diverges (stopped for non-finite updates or a loss spike it "
        "cannot roll back), start it again with seed + 1, up to this many times; each failed attempt moves to "
        "restarts/attempt_<k>_seed_<seed>/ in the run directory (docs/stability.md).",
    )
    keep_last: int = Field(5, ge=1, description="Checkpoints kept besides the best by validation loss (5: `keel "
                           "average RUN --last 5` works on a default run; average.last raises it).")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard package).")
    progress_interval: Time | str = Field(
        "30s", description="Without a terminal (CI, nohup, cluster logs), print a progress line every this long: "
        "seconds ('30s'), or a length (100 steps, '0.1ep', '10%').",
    )

    #: The keys the config was given, before its recipe filled in the rest (``for_task`` validates them again).
    _given: dict[str, Any] = PrivateAttr(default_factory=dict)
    #: The top-level keys assigned since (``config.max_steps = 3``): the user's, whatever their value.
    _assigned: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_given(cls, raw: Any, handler: Any) -> Any:
        given = copy.deepcopy(raw) if isinstance(raw, dict) else None
        config = handler(cls._task_data(cls._complete_default_recipe(raw)))
        if given is not None:
            config._given = given
        return config

    def __eq__(self, other: object) -> bool:
        """Configs that resolve to the same values are equal, however they were given."""
        if not isinstance(other, TrainConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__ and self.__pydantic_extra__ == other.__pydantic_extra__

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignment is validated. A run length set one way clears the other (``config.duration = '3ep'`` clears
        max_steps, and the reverse); a value refused leaves the config as it was and is one KeelError."""
        if name.startswith("_"):
            return super().__setattr__(name, value)
        before = dict(self.__dict__), dict(self.__pydantic_extra__ or {}), set(self.__pydantic_fields_set__)
        for pair in ALTERNATIVE_KEYS:
            if name in pair and value is not None:
                self.__dict__.update({other: None for other in pair if other != name})
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            self.__dict__.clear()
            self.__dict__.update(before[0])
            if self.__pydantic_extra__ is not None:
                self.__pydantic_extra__.clear()
                self.__pydantic_extra__.update(before[1])
            object.__setattr__(self, "__pydantic_fields_set__", before[2])
            raise KeelError(_describe(error.errors()[0], type(self))) from None
        self._assigned = self._assigned | {name}

    def gave(self, key: str) -> bool:
        """Whether the config was given or assigned ``key`` (top-level), rather than a default or its recipe's
        value."""
        return key in self._given or key in self._assigned

    def for_task(self, task: str) -> TrainConfig:
        """This config for another task (``keel.train`` handed a model or task object), validated again with
        ``task``: every value the user set (the keys it was given, and whatever was assigned or changed since) is
        kept; what its recipe filled in and every default that depends on the task follow the new task; the blocks
        of the old task that the new one does not own are dropped (an lm's ``model``, ``sample``, ``data.source``)."""
        base = validate(self._given).model_dump(mode="json")  # what the given keys came to: the rest are changes
        current = self.model_dump(mode="json")
        raw = _user_values(self._given, base, current)
        raw.update({key: current[key] for key in self._assigned if key in current})
        raw["task"] = task
        old, new = task_spec(self.task), task_spec(task)
        owned = new.settings if new is not None else {}
        for key in (old.settings if old is not None else {}):
            if key == "data" and isinstance(raw.get("data"), dict):
                keys = owned.get("data", DataConfig).model_fields
                raw["data"] = {k: v for k, v in raw["data"].items() if k in keys}
            elif key not in owned:
                raw.pop(key, None)
        return validate(raw)

    @classmethod
    def _task_data(cls, raw: Any) -> Any:
        """The ``data`` block validated with the task's own data model, when it has one (the language model's
        data.source, data.tokenizer, ...); the core keys alone otherwise."""
        if not isinstance(raw, dict):
            return raw
        spec = task_spec(raw.get("task", cls.model_fields["task"].default))
        model = spec.settings.get("data") if spec is not None else None
        block = raw.get("data")
        if model is None or isinstance(block, model) or not isinstance(block, (dict, type(None), DataConfig)):
            return raw
        if isinstance(block, DataConfig):
            block = block.model_dump()
        try:
            return {**raw, "data": model.model_validate(block or {})}
        except ValidationError as error:
            raise KeelError(_describe(error.errors()[0], model, prefix=["data"])) from None

    @classmethod
    def _complete_default_recipe(cls, raw: Any) -> Any:
        """The recipe (``recipe:``, else the task's default; ``keel.recipes``) fills in the keys the config leaves
        out. An optimizer block naming adamw, or a schedule naming cosine, starts from the baseline recipe's values;
        a cosine schedule with no ``min_lr`` decays to a tenth of its peak LR."""
        if not isinstance(raw, dict):
            return raw
        if raw.get("duration") is not None:
            if raw.get("max_steps") is not None:
                raise KeelError(f"duration: {raw['duration']!r} and max_steps: {raw['max_steps']!r} are both given; "
                                "allowed: one of the two (max_steps is the run length in steps)")
            raw = {**raw, "max_steps": None}
        raw = apply_recipe(dict(raw), default_task=cls.model_fields["task"].default)
        optimizer = raw.get("optimizer", {})
        if isinstance(optimizer, dict) and optimizer.get("name", DEFAULT_OPTIMIZER["name"]) == DEFAULT_OPTIMIZER["name"]:
            raw["optimizer"] = optimizer = fill_in("optimizer", DEFAULT_OPTIMIZER, optimizer)
        schedule = raw.get("schedule", {})
        if isinstance(schedule, dict) and schedule.get("name", DEFAULT_SCHEDULE["name"]) == DEFAULT_SCHEDULE["name"]:
            raw["schedule"] = fill_in("schedule", DEFAULT_SCHEDULE, schedule)  # min_lr: once the optimizer is typed
        return raw

    @field_validator("optimizer", mode="before")
    @classmethod
    def _typed_optimizer(cls, value: Any, info: Any) -> Any:
        """The block typed by its optimizer's registry record; an error about an optimizer the recipe chose says so
        (a plain-PyTorch run told 'not a hyperparameter of muon' learns where muon came from)."""
        if isinstance(value, OptimizerConfig) or not isinstance(value, Mapping):
            return value
        recipe = info.data.get("recipe")
        chosen = RECIPES.get(recipe, {}).get("optimizer", {}).get("name")
        note = f" (recipe {recipe}'s optimizer)" if chosen is not None and value.get("name") == chosen else ""
        return OptimizerConfig(value, "optimizer", note)

    @field_validator("task")
    @classmethod
    def _task_syntax(cls, value: str) -> str:
        return check_task_name(value)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a choice; allowed: auto, true, false")

    @field_validator("progress_interval", mode="before")
    @classmethod
    def _progress_syntax(cls, value: Any) -> Time | str:
        if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?s", value.strip()):
            if float(value.strip()[:-1]) > 0:
                return value.strip()
        else:
            try:
                return _interval(value)
            except (KeelError, ValueError):
                pass
        raise ValueError(f"{value!r} is not an interval; allowed: seconds ('30s') or a length > 0 (steps, '0.1ep', "
                         "'10Mtok', '10%')")

    @field_validator("eval_interval", "checkpoint_interval", mode="before")
    @classmethod
    def _positive_interval(cls, value: Any) -> Time:
        return _interval(value)

    @model_validator(mode="after")
    def _run_length_in_one_key(self) -> "TrainConfig":
        """A duration in steps is max_steps; neither given: 600 steps."""
        duration = self.duration
        if duration is not None and duration.unit == "fraction":
            raise KeelError(f"duration: {str(duration)!r} is a share of the run itself; allowed: steps (2000), epochs "
                            "('3ep'), tokens ('50Mtok') or examples ('1Mex')")
        if duration is not None and (duration.unit == "step" or duration.amount <= 0):
            if duration.unit != "step" or not 1 <= duration.amount <= MAX_RUN_STEPS:
                raise KeelError(f"duration: {str(duration)!r}; allowed: a run of at least 1 step (at most "
                                f"{MAX_RUN_STEPS:.0e} steps)")
            object.__setattr__(self, "duration", None)
            object.__setattr__(self, "max_steps", int(duration.amount))
        elif duration is None and self.max_steps is None:
            object.__setattr__(self, "max_steps", 600)
        return self

    @property
    def run_length(self) -> Time:
        """The run length as a ``Time``: ``duration``, or ``max_steps`` steps."""
        return self.duration if self.duration is not None else Time.steps(self.max_steps)

    @model_validator(mode="after")
    def _technique_blocks(self) -> "TrainConfig":
        """Validate the blocks the task owns, then each technique's block, with their registered models; unknown
        keys are errors (a block of another task says whose it is)."""
        registry = techniques()
        spec = task_spec(self.task)
        owned = {k: m for k, m in (spec.settings.items() if spec is not None else ()) if k != "data"}
        extra = self.__pydantic_extra__
        for key in list(extra):
            if key not in registry and key not in owned:
                allowed = [*type(self).model_fields, *owned, *registry]
                owner = next((name for name, other in task_specs().items() if key in other.settings), None)
                if owner is not None:
                    raise KeelError(f"{key}: a setting of task {owner}, not of task {self.task!r}; allowed here: "
                                    f"{', '.join(allowed)}")
                close = _nested_match(key) or difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise KeelError(f"unknown key '{key}'{hint} allowed here: {', '.join(allowed)}")
        for key, model in owned.items():
            block = extra.get(key)
            if not isinstance(block, model):
                try:
                    extra[key] = model.model_validate({} if block is None else block)
                except ValidationError as error:
                    raise KeelError(_describe(error.errors()[0], model, prefix=[key])) from None
        for key, technique in registry.items():
            block = extra.get(key)
            if not isinstance(block, technique.config):
                try:
                    extra[key] = technique.config.model_validate({} if block is None else block)
                except ValidationError as error:
                    raise KeelError(_describe(error.errors()[0], technique.config, prefix=[key])) from None
            if technique.check is not None:
                technique.check(extra[key], self)
        return self

    @field_validator("out_dir", "init_from")
    @classmethod
    def _path_syntax(cls, value: str | None) -> str | None:
        if value is not None and ("\0" in value or not value.strip()):
            raise ValueError(f"{value!r} is not a path; allowed: a non-empty path without NUL characters")
        return value

    @field_validator("threads")
    @classmethod
    def _threads_this_machine_has(cls, value: int | None) -> int | None:
        most = THREADS_PER_CPU * (os.cpu_count() or 1)
        if value is not None and value > most:
            raise ValueError(f"{value} threads is more than this machine runs well; allowed: 1 to {most} "
                             f"({THREADS_PER_CPU} per CPU core), or null for torch's default")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"'{value}' is not a device; allowed: auto, cpu, cuda, cuda:N")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        from keel.schedules import from_config

        schedule = self.schedule
        if isinstance(schedule, dict) and schedule.get("name") == DEFAULT_SCHEDULE["name"] and "min_lr" not in schedule:
            peak = schedule.get("lr", self.optimizer.lr)  # a cosine without min_lr decays to a tenth of its peak
            try:
                schedule["min_lr"] = float(peak) / 10
            except (TypeError, ValueError):
                pass  # the schedule's own check names its lr
        spec = task_spec(self.task)
        if spec is not None and spec.check is not None:
            spec.check(self)  # the task's own checks: sizes, memory
        # Lengths in examples, tokens and epochs need the task's counts: the trainer resolves them once it is built.
        from_config(self.schedule, base_lr=float(self.optimizer.lr), timeline=stand_in(self.run_length),
                    key="schedule")
        if self.tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError as error:
                raise KeelError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard); "
                    "allowed without it: false"
                ) from error
        return self

    def technique(self, key: str) -> BaseModel:
        """The validated block of technique ``key`` (also reachable as ``config.<key>``)."""
        return self.__pydantic_extra__[key]


# ---------------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``3e-4`` as a float as YAML 1.2 does (YAML 1.1 makes it a string)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+][0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _load_checked(text: str, where: str) -> Any:
    """``load_yaml(text)``, with every way the text can be unusable as a config made one KeelError naming ``where``:
    invalid YAML, nesting too deep for the parser, and the shape problems ``_check_shape`` finds."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):  # iterative: a deep text is refused before composing it
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise KeelError(f"{where} is nested too deeply; allowed: at most {MAX_CONFIG_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        data = load_yaml(text)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split()) if getattr(error, "problem", None) is None else error.problem
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeelError(f"{where} is not valid YAML{at} ({reason})") from None
    except RecursionError:
        raise KeelError(f"{where} is nested too deeply; allowed: at most {MAX_CONFIG_DEPTH} levels") from None
    _check_shape(data, where)
    return data


def _check_shape(data: Any, where: str) -> None:
    """Refuse YAML no config can be: nesting deeper than MAX_CONFIG_DEPTH, a value that contains itself (YAML
    anchors can make one), more than MAX_CONFIG_NODES values once anchors are expanded, keys that are not strings,
    values that are not plain data (``!!binary``, ``!!set``, dates).

    Walks each distinct object once (anchors are shared objects), so it costs the size of the text, not of its
    expansion.
    """
    sizes: dict[int, int] = {}  # id -> values under it, expanded
    depths: dict[int, int] = {}  # id -> nesting levels under it
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            if node is not None and not isinstance(node, (str, int, float)):  # bool is an int
                raise KeelError(f"{where} holds a value of type {type(node).__name__} ({_short(node)}); allowed: "
                                "strings, numbers, true/false, null, lists and mappings")
            continue
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            on_path.discard(id(node))
            inner = [c for c in children if isinstance(c, (dict, list))]
            sizes[id(node)] = 1 + len(children) - len(inner) + sum(sizes[id(c)] for c in inner)
            depths[id(node)] = 1 + max((depths[id(c)] for c in inner), default=0)
            if depths[id(node)] > MAX_CONFIG_DEPTH:
                raise KeelError(f"{where} is nested too deeply; allowed: at most {MAX_CONFIG_DEPTH} levels")
            if sizes[id(node)] > MAX_CONFIG_NODES:
                raise KeelError(f"{where} holds more than {MAX_CONFIG_NODES:,} values (YAML anchors expanded); "
                                "allowed: a config of ordinary size")
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise KeelError(f"{where} holds a value that contains itself (a recursive YAML anchor); allowed: "
                            "plain nested values")
        if len(on_path) >= MAX_CONFIG_DEPTH:
            raise KeelError(f"{where} is nested too deeply; allowed: at most {MAX_CONFIG_DEPTH} levels")
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise KeelError(f"{where}: key {_short(key)} ({type(key).__name__}) is not a name; allowed: "
                                    "keys that are strings")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.n_layer=6", "optimizer.lr=1e-3"]`` -> nested dict; values parsed as YAML scalars or lists."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KeelError(f"override '{item}' is not key=value; allowed: dotted.key=value, e.g. model.n_layer=6")
        value = _load_checked(raw, f"{key}: value {raw!r}") if raw != "" else ""
        set_dotted(tree, key, value, overwrite=False)
    return tree


def set_dotted(tree: dict[str, Any], key: str, value: Any, *, overwrite: bool = True) -> None:
    """``set_dotted(t, "schedule.warmup", 10)`` sets ``t["schedule"]["warmup"] = 10``, creating blocks. A value
    where a block is needed is replaced, or with ``overwrite=False`` is a KeelError."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None and not overwrite:
                raise KeelError(f"{key}: '{part}' was given a value and cannot also hold keys")
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


#: Keys that say one thing two ways: a later layer that gives one replaces the other (``max_steps=100`` over a
#: file with ``duration: 3ep``); within one layer both are an error.
ALTERNATIVE_KEYS = (("max_steps", "duration"),)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Free-form blocks (optimizer, schedule) merge key by key too."""
    merged = dict(base)
    for pair in ALTERNATIVE_KEYS:
        for key in pair:
            if update.get(key) is not None:
                merged.update({other: None for other in pair if other != key and other in merged})
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "is not a regular file (a device, a pipe or a socket)" \
                if path.exists() else "does not exist"
            raise KeelError(f"config file '{path}' {what}; allowed: a YAML file of config keys")
        data = path.read_bytes()
    except OSError as error:  # unreadable, a name too long, ...
        raise KeelError(f"config file '{path}' cannot be read ({error.strerror or error}); allowed: a readable "
                        "YAML file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start:error.start + 1]
        raise KeelError(f"config file '{path}' is not UTF-8 text (byte {error.start} is {bad!r}); allowed: a YAML "
                        "file in UTF-8") from None
    return parse_config_text(text, f"config file '{path}'")


def parse_config_text(text: str, where: str) -> dict[str, Any]:
    """The mapping of config keys a YAML text holds (``{}`` for an empty one); KeelError naming ``where`` else."""
    data = _load_checked(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KeelError(f"{where} holds a {type(data).__name__}; allowed: a mapping of config keys")
    return data


def _user_values(given: Any, base: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The keys ``given`` (a config's raw keys), updated with every value of ``current`` (the config now, dumped)
    that differs from ``base`` (what ``given`` validated to): key by key inside blocks, so a block's keys its recipe
    filled in stay the recipe's; a block whose name changed, or that lost keys, is taken whole."""
    raw = copy.deepcopy(given) if isinstance(given, dict) else {}
    for key, value in current.items():
        before = base.get(key)
        if key in base and value == before:
            continue
        partial = (isinstance(value, dict) and isinstance(before, dict) and before.keys() <= value.keys()
                   and value.get("name") == before.get("name") and isinstance(raw.get(key, {}), dict))
        raw[key] = _user_values(raw.get(key, {}), before, value) if partial else value
    return raw


def _interval(value: Any) -> Time:
    """A length > 0 (what an interval must be)."""
    try:
        time = Time.parse(value, "")
    except KeelError as error:
        raise ValueError(str(error).removeprefix(": ")) from None
    if time.amount <= 0:
        raise ValueError(f"{value!r} is not an interval; allowed: a length > 0 (steps, '0.5ep', '10Mtok', '10%')")
    return time


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated into a ``TrainConfig``."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw = merge(raw, parse_overrides(overrides or []))
    return validate(raw)


def validate(raw: dict[str, Any], model: type[BaseModel] = TrainConfig) -> Any:
    """Validate ``raw`` into ``model``; the first problem becomes one ``KeelError``."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise KeelError(_describe(error.errors()[0], model)) from None


def _nested_match(key: str) -> list[str]:
    """'lr' -> ['optimizer.lr']: a top-level key that belongs in a block."""
    blocks = {"optimizer": ["lr", "name", "betas", "weight_decay", "momentum", "eps"],
              "schedule": ["warmup", "min_lr", "decay"]}
    for block, keys in blocks.items():
        if key in keys:
            return [f"{block}.{key}"]
    blocks = [(name, field.annotation) for name, field in TrainConfig.model_fields.items()]
    blocks += [(name, model) for name, (_, model) in task_blocks().items()]
    for name, annotation in blocks:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and key in annotation.model_fields:
            return [f"{name}.{key}"]
    return []


def _describe(error: dict[str, Any], model: type[BaseModel], prefix: list[str] | None = None) -> str:
    loc = [*(prefix or []), *(str(part) for part in error["loc"])]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        allowed = _field_names(model, loc[len(prefix or []):-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
        block = task_blocks().get(loc[0]) if len(loc) == 2 and model is TrainConfig else None
        if block is not None and loc[1] in block[1].model_fields:
            hint = f" (a setting of task {block[0]});"
        return f"unknown key '{key}'{hint} allowed here: {', '.join(allowed)}"
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
        if isinstance(error.get("ctx", {}).get("error"), KeelError) or not key or message.startswith(f"{key}."):
            return message  # the message names its keys already (e.g. model.n_head)
        return f"{key}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{key or 'config'}: {message}{shown}"


def _field_names(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def dump_config(config: TrainConfig) -> str:
    """The fully resolved config as YAML (what ``config.yaml`` in a run directory holds): the core keys, the blocks
    its task owns and every technique's block."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def task_blocks() -> dict[str, tuple[str, type[BaseModel]]]:
    """Every block a registered task owns, by dotted prefix: ``{"model": ("lm", ModelConfig), ...}``; a task's
    ``data`` model is listed under ``data`` (its keys beside the core ones)."""
    return {key: (name, model) for name, spec in task_specs().items() for key, model in spec.settings.items()}


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "", only: set[str] | None = None,
                    note: str = "") -> list[str]:
    """One line per config key: dotted name, default and description (for ``keel train --help``); ``only``: those
    fields alone; ``note``: said after each description (whose key it is)."""
    lines = []
    if model is TrainConfig:
        for key, technique in techniques().items():
            lines.extend(describe_fields(technique.config, f"{key}."))
        for key, (task, block) in task_blocks().items():
            core = set(DataConfig.model_fields) if key == "data" else set()
            lines.extend(describe_fields(block, f"{key}.", set(block.model_fields) - core, f" (task {task})"))
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        default = dict(default) if isinstance(default, Mapping) else default  # the optimizer block as written
        lines.append(f"  {prefix}{name} = {default!r}\n      {field.description or ''}{note}")
    return lines
