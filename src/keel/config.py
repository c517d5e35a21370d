"""The typed run config: documented fields with defaults, loaded from YAML plus ``key=value`` overrides.

Validation is pydantic's; every failure becomes one ``KeelError`` naming the dotted key, the value given and
what is allowed, raised before any training starts.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.data.corpora import BUILTIN_CORPORA
from keel.data.sources import train_token_count
from keel.errors import KeelError
from keel.grad.config import ClipConfig, NonFiniteConfig, SpikeConfig
from keel.recipes import RECIPES, apply_recipe
from keel.techniques import techniques

# Hard bounds on sizes, far above any run this toolkit is for, so an absurd value fails here with its key rather
# than as a failed allocation or a hang; what fits in memory is checked against the machine in TrainConfig.
MAX_LAYERS = 1024
MAX_WIDTH = 65536
MAX_BLOCK_SIZE = 1 << 24
MAX_BATCH_SIZE = 1 << 20
MAX_GRAD_ACCUM = 1 << 16
MAX_RUN_STEPS = 10**12
MAX_EVAL_TOKENS = 10**12
MAX_SAMPLE_TOKENS = 1 << 16
SEED_LIMIT = 2**32  # numpy's legacy seeding takes 0 <= seed < 2**32
THREADS_PER_CPU = 4
MAX_CONFIG_DEPTH = 64  # nesting levels of a config file or override value
MAX_CONFIG_NODES = 100_000  # values in a config file once YAML anchors are expanded


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Block):
    """Where the tokens come from and how batches are drawn (documents, tokenizers, packing: docs/data.md)."""

    source: str = Field(
        "pydoc",
        description="'pydoc' (CPython's reference topics), 'stdlib' (the standard library's source), a text "
        "file, a folder of text files (one document each), a .jsonl file (one document per line), "
        "'hf:FORMAT:PATH' (local files through Hugging Face datasets, e.g. hf:json:data/*.jsonl), a .bin uint16 "
        "token file, or a folder with train.bin and val.bin.",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the tokens kept for validation.")
    batch_size: int = Field(
        32, ge=1, le=MAX_BATCH_SIZE, description="Sequences (examples) per micro-batch on each rank (at most 2**20; "
        "what fits in memory is checked); derived from global_batch_size when that is set.",
    )
    global_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH_SIZE, description="Sequences (examples) per optimizer step over all ranks and "
        "micro-batches; when set, batch_size = global_batch_size / (world size x grad_accum), which must divide it, "
        "so a run sees the same batches whatever its number of processes (docs/distributed.md).",
    )
    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size of a token file (default: largest id + 1) or of a tokenizer "
        "(default: its own); byte text is 256 (257 with an end-of-document token).",
    )
    eval_tokens: int = Field(65536, ge=1, le=MAX_EVAL_TOKENS,
                             description="Validation tokens per evaluation (from the split's start; at most 10**12).")
    text_field: str = Field("text", description="The field holding the text in JSONL lines and hf: datasets.")
    tokenizer: str | dict[str, int] = Field(
        "bytes", description="'bytes' (no training), {bpe: VOCAB} (a byte-level BPE trained on the training split "
        "with Hugging Face tokenizers, cached under cache_dir), or the path of a tokenizer.json.",
    )
    packing: bool = Field(
        True, description="true: documents are concatenated into full windows (keel's behaviour); false: one "
        "document per sequence, cut at the context length, batched by length under batch_tokens.",
    )
    batch_tokens: int | None = Field(
        None, ge=1, description="With packing false: padded tokens per micro-batch (rows x longest row; default "
        "batch_size x model.block_size); sequences of similar length share a batch.",
    )
    long_documents: Literal["split", "truncate"] = Field(
        "split", description="With packing false: a document longer than the context is split into several "
        "sequences ('split') or cut to its first ('truncate').",
    )
    eod: bool | None = Field(
        None, description="End-of-document token after each document. null: on for BPE and tokenizer files that "
        "have one, and for bytes without packing (vocabulary 257, id 256); off for packed bytes (keel's byte "
        "stream, vocabulary 256).",
    )
    cache_dir: str | None = Field(
        None, description="Where trained tokenizers and tokenized data are cached (default: $KEEL_CACHE_DIR or "
        "~/.cache/keel).",
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        from keel.data.documents import is_hf_source, parse_hf_source

        if is_hf_source(value):
            parse_hf_source(value)
        elif value not in BUILTIN_CORPORA and not Path(value).expanduser().exists():
            raise ValueError(
                f"'{value}' does not exist; allowed: {', '.join(BUILTIN_CORPORA)}, a text file, a folder of "
                "text files, a .jsonl file, hf:FORMAT:PATH, a .bin uint16 token file, or a folder with train.bin "
                "and val.bin"
            )
        return value

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_syntax(cls, value: str | dict[str, int]) -> str | dict[str, int]:
        from keel.data.tokenizer import BPE_MIN_VOCAB

        if isinstance(value, dict):
            if set(value) != {"bpe"}:
                raise KeelError(f"data.tokenizer: {value!r}; allowed: bytes, {{bpe: VOCAB}} or a tokenizer.json path")
            if value["bpe"] < BPE_MIN_VOCAB:
                raise KeelError(f"data.tokenizer.bpe: {value['bpe']} is too small a vocabulary for the data (a "
                                f"byte-level BPE needs the 256 bytes and <|endoftext|>); allowed: at least "
                                f"{BPE_MIN_VOCAB}")
        elif value != "bytes" and not Path(value).expanduser().is_file():
            raise KeelError(f"data.tokenizer: '{value}' is not a file; allowed: bytes, {{bpe: VOCAB}} or the path of "
                            "a tokenizer.json")
        return value

    @model_validator(mode="after")
    def _batch_tokens_without_packing(self) -> "DataConfig":
        if self.batch_tokens is not None and self.packing:
            raise KeelError(f"data.batch_tokens: {self.batch_tokens} is for data.packing: false (packed windows are "
                             "data.batch_size x model.block_size); allowed: null, or data.packing: false")
        return self


class ModelConfig(_Block):
    """The language model of task lm: keel's decoder-only GPT, or a Hugging Face causal LM (extra keel[hf])."""

    n_layer: int = Field(4, ge=1, le=MAX_LAYERS, description="Transformer blocks (depth; at most 1024).")
    n_head: int = Field(4, ge=1, le=MAX_WIDTH, description="Attention heads; must divide n_embd.")
    n_embd: int = Field(128, ge=1, le=MAX_WIDTH, description="Width of the residual stream (at most 65536).")
    block_size: int = Field(128, ge=2, le=MAX_BLOCK_SIZE, description="Context length in tokens (at most 2**24, "
                            "and shorter than the training split).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    bias: bool = Field(True, description="Biases in linear layers and layer norms.")
    norm_position: Literal["pre", "post", "residual"] = Field(
        "pre", description="Where each block's LayerNorm sits: 'pre' x + f(Norm(x)) (GPT-2), 'post' Norm(x + f(x)) "
        "(original Transformer), 'residual' x + Norm(f(x)) (Tuning Playbook: norm as the last operation of the "
        "residual branch).",
    )
    zero_init_residual: bool = Field(
        False, description="Gate each residual branch by a learned scalar initialised to 0 (ReZero): every block "
        "starts as the identity.",
    )
    hf_config: dict[str, Any] | None = Field(
        None, description="A transformers config of a causal LM to build instead of the GPT (randomly initialised), "
        "e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}; vocab_size defaults to the data's.",
    )
    hf_pretrained: str | None = Field(
        None, description="A local directory written by transformers' save_pretrained, loaded instead of the GPT.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.hf_config is not None and self.hf_pretrained is not None:
            raise ValueError("model.hf_config and model.hf_pretrained are both set; allowed: at most one")
        if (self.hf_config is not None or self.hf_pretrained is not None) and (
                self.norm_position != "pre" or self.zero_init_residual):
            raise ValueError("model.norm_position and model.zero_init_residual are options of keel's GPT, not of a "
                             "Hugging Face model; allowed with hf_config/hf_pretrained: norm_position pre, "
                             "zero_init_residual false")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_head: {self.n_head} does not divide model.n_embd: {self.n_embd}; "
                "allowed: a divisor of n_embd"
            )
        return self


class SampleConfig(_Block):
    """The short text generated at each evaluation."""

    prompt: str = Field("The ", description="Fixed prompt the sample continues.")
    tokens: int = Field(64, ge=0, le=MAX_SAMPLE_TOKENS,
                        description="Tokens to generate (0 turns samples off; at most 65536).")
    temperature: float = Field(0.8, gt=0.0, description="Sampling temperature.")
    top_k: int | None = Field(40, ge=1, description="Sample among the k most likely tokens (null: all).")


class LrScalingConfig(_Block):
    """Scale every LR of the schedule from a reference global batch to the run's (docs/distributed.md).

    factor = global_batch / base_batch (``linear``, Goyal et al. 2017, with warmup) or its square root (``sqrt``, for
    adaptive optimizers); global_batch = data.batch_size x grad_accum x world size.
    """

    rule: Literal["linear", "sqrt"] | None = Field(
        None, description="'linear' (LR x global_batch / base_batch), 'sqrt' (LR x its square root), or null (off).",
    )
    base_batch: int | None = Field(
        None, ge=1, description="The global batch (examples per optimizer step) optimizer.lr and the schedule were "
        "tuned for.",
    )
    global_batch: int | None = Field(
        None, ge=1, description="Recorded by the trainer at every start: the global batch this run trains with.",
    )
    factor: float | None = Field(
        None, gt=0, description="Recorded by the trainer at every start: the factor applied to every LR of the "
        "schedule.",
    )
    lr: float | None = Field(
        None, gt=0, description="Recorded by the trainer at every start: optimizer.lr x factor.",
    )

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
    ``early_stopping``, ...), validated by the technique's own config model.
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
    max_steps: int = Field(600, ge=1, le=MAX_RUN_STEPS, description="Optimizer updates in the run (at most 10**12).")
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
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_OPTIMIZER),
        description="Optimizer: name and hyperparameters (see `keel.optim.names()`); no weight decay on "
        "biases, norms and embeddings.",
    )
    schedule: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SCHEDULE),
        description="Learning-rate schedule: name and parameters (see docs/schedules.md); its peak LR is "
        "optimizer.lr unless the schedule sets lr; cosine decays to min_lr, by default a tenth of the peak.",
    )
    clip: ClipConfig = Field(default_factory=ClipConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    eval_interval: int = Field(100, ge=1, description="Evaluate every this many steps (and always at the end).")
    log_interval: int = Field(1, ge=1, description="Write a metrics record every this many steps.")
    checkpoint_interval: int = Field(100, ge=1, description="Checkpoint every this many steps (and at the end).")
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
    resume_warmup: int | str | None = Field(
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
    sample: SampleConfig = Field(default_factory=SampleConfig)
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard package).")
    progress_interval: int | str = Field(
        "30s", description="Without a terminal (CI, nohup, cluster logs), print a progress line every this many "
        "steps (e.g. 100) or seconds (e.g. '30s').",
    )

    @model_validator(mode="before")
    @classmethod
    def _complete_default_recipe(cls, raw: Any) -> Any:
        """The recipe (``recipe:``, else the task's default; ``keel.recipes``) fills in the keys the config leaves
        out. An optimizer block naming adamw, or a schedule naming cosine, starts from the baseline recipe's values;
        a cosine schedule with no ``min_lr`` decays to a tenth of its peak LR."""
        if not isinstance(raw, dict):
            return raw
        raw = apply_recipe(dict(raw))
        optimizer = raw.get("optimizer", {})
        if isinstance(optimizer, dict) and optimizer.get("name", DEFAULT_OPTIMIZER["name"]) == DEFAULT_OPTIMIZER["name"]:
            raw["optimizer"] = optimizer = {**DEFAULT_OPTIMIZER, **optimizer}
        schedule = raw.get("schedule", {})
        if isinstance(schedule, dict) and schedule.get("name", DEFAULT_SCHEDULE["name"]) == DEFAULT_SCHEDULE["name"]:
            schedule = {**DEFAULT_SCHEDULE, **schedule}
            if "min_lr" not in schedule:
                from keel.optim import check_config

                try:
                    peak = schedule.get("lr", check_config(optimizer)["lr"])
                    schedule["min_lr"] = float(peak) / 10
                except (KeelError, TypeError, ValueError):
                    pass  # the optimizer block is invalid: its own error is reported below
            raw["schedule"] = schedule
        return raw

    @field_validator("task")
    @classmethod
    def _task_syntax(cls, value: str) -> str:
        from keel.tasks import check_task_name

        return check_task_name(value)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a choice; allowed: auto, true, false")

    @field_validator("progress_interval")
    @classmethod
    def _progress_syntax(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value >= 1:
            return value
        if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?s", value.strip()) and float(value.strip()[:-1]) > 0:
            return value.strip()
        raise ValueError(f"{value!r} is not an interval; allowed: steps (an int >= 1) or seconds ('30s')")

    @model_validator(mode="after")
    def _technique_blocks(self) -> "TrainConfig":
        """Validate each technique's block with its registered model; unknown keys are errors."""
        registry = techniques()
        extra = self.__pydantic_extra__
        for key in list(extra):
            if key not in registry:
                allowed = [*type(self).model_fields, *registry]
                close = _nested_match(key) or difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise KeelError(f"unknown key '{key}'{hint} allowed here: {', '.join(allowed)}")
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

    @field_validator("resume_warmup")
    @classmethod
    def _resume_warmup_syntax(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            from keel.timeunits import resolve_steps

            resolve_steps(value, name="resume_warmup", total_steps=1, steps_per_epoch=1, tokens_per_step=1)
        return value

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
        from keel.optim import check_config
        from keel.schedules import from_config

        optimizer = check_config(self.optimizer, key="optimizer")
        if self.task == "lm":
            train_tokens = train_token_count(self.data.source, self.data.val_fraction)
            if self.model.hf_config is None and self.model.hf_pretrained is None:
                self._check_lm_sizes(train_tokens, optimizer["name"])
            lengths = {"steps_per_epoch": self.steps_per_epoch(train_tokens), "tokens_per_step": self.tokens_per_step}
        else:  # the task's data sizes are known once it is built; the trainer resolves lengths again then
            lengths = {"steps_per_epoch": 1, "tokens_per_step": 1}
        from_config(self.schedule, base_lr=float(optimizer["lr"]), total_steps=self.max_steps, key="schedule",
                    **lengths)
        if self.tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError as error:
                raise KeelError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard); "
                    "allowed without it: false"
                ) from error
        return self

    def _check_lm_sizes(self, train_tokens: int, optimizer: str) -> None:
        """Task lm with keel's GPT: a window fits in the training split, and a step fits in memory (estimated by
        ``keel.models.memory``, before anything is allocated; a token file's vocabulary, unknown until it is read,
        counts as ``data.vocab_size`` or else 256, so the estimate stays a lower bound)."""
        from keel.models.memory import available_memory, estimate_gpt_training, format_bytes

        block_size = self.model.block_size
        if block_size + 1 >= train_tokens:
            raise KeelError(
                f"model.block_size: {block_size} is too long for the {train_tokens:,} training tokens of data.source "
                f"'{self.data.source}'; allowed: at most {max(train_tokens - 2, 0):,}, or a larger source"
            )
        estimate = estimate_gpt_training(
            n_layer=self.model.n_layer, n_embd=self.model.n_embd, vocab_size=self.data.vocab_size or 256,
            block_size=block_size, batch_size=self.data.batch_size, grad_accum=self.grad_accum,
            precision=self._precision_on(self.device), optimizer=optimizer, bias=self.model.bias,
        )
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        checks = [(device, estimate.total)]
        if device != "cpu":
            checks.append(("cpu", estimate.parameters))  # the model is built on the CPU, then moved
        for where, needed in checks:
            available = available_memory(where)
            if available is not None and needed > available:
                what = f"({estimate.breakdown()})" if needed == estimate.total else "for the parameters while the " \
                    "model is built"
                raise KeelError(
                    f"model: about {format_bytes(needed)} needed {what}, {format_bytes(available)} available on "
                    f"{where}; allowed: a smaller model.n_layer/n_embd/block_size or data.batch_size/grad_accum"
                )

    def _precision_on(self, device: str) -> str:
        """``precision`` with auto resolved for ``device`` (``keel.precision.resolve_precision``)."""
        if self.precision != "auto":
            return self.precision
        import torch

        from keel.precision import resolve_precision

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return resolve_precision("auto", device)[0]

    def steps_per_epoch(self, train_tokens: int) -> int:
        """Optimizer steps in one epoch of ``train_tokens`` (whole batches of windows, at least 1)."""
        return max(1, max(1, train_tokens // (self.data.batch_size * self.model.block_size)) // self.grad_accum)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step of task lm (full windows)."""
        return self.data.batch_size * self.model.block_size * self.grad_accum

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


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Free-form blocks (optimizer, schedule) merge key by key too."""
    merged = dict(base)
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
    for name, field in TrainConfig.model_fields.items():
        annotation = field.annotation
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


#: Keys only the language-model task reads: left out of another task's config.yaml so it does not describe a GPT.
LM_ONLY = {"model": True, "sample": True, "data": {"source", "vocab_size", "eval_tokens", "text_field", "tokenizer",
                                                   "packing", "batch_tokens", "long_documents", "eod", "cache_dir"}}


def dump_config(config: TrainConfig) -> str:
    """The fully resolved config as YAML (what ``config.yaml`` in a run directory holds); a task other than ``lm``
    leaves out the keys only the language model reads (their defaults apply if the file is loaded again)."""
    exclude = None if config.task == "lm" else LM_ONLY
    return yaml.safe_dump(config.model_dump(mode="json", exclude=exclude), sort_keys=False)


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default and description (for ``keel train --help``)."""
    lines = []
    if model is TrainConfig:
        for key, technique in techniques().items():
            lines.extend(describe_fields(technique.config, f"{key}."))
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {prefix}{name} = {default!r}\n      {field.description or ''}")
    return lines
