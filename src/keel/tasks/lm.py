"""``task: lm``: next-token prediction on text or token files, with keel's GPT or a Hugging Face causal LM.

Data come from ``data.source`` (built-in corpora, the user's text, JSONL, Hugging Face datasets, nanoGPT token
files) through ``data.tokenizer`` (bytes, a BPE, a tokenizer.json). Packed (``data.packing: true``, the default),
training batches are random windows of ``model.block_size + 1`` tokens and evaluations read fixed consecutive
windows from the start of the validation split (``val``) and of the training split (``train``),
``data.eval_tokens`` each. Without packing, each sequence is one document (cut at the context length), batches
hold sequences of similar length under ``data.batch_tokens`` (``keel.data.BucketSampler``), padded to the
longest with the pads masked out of the loss and the count; evaluations read the first documents of each split
the same way. See docs/data.md.

The model is keel's GPT (``model.n_layer`` ...) unless ``model.hf_config`` (a transformers config, e.g.
``{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}``) or ``model.hf_pretrained`` (a local directory for
``from_pretrained``) names a Hugging Face model; that needs the optional extra ``keel[hf]``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from keel.config import DataConfig
from keel.data import (BucketSampler, RandomWindowSampler, document_spans, load_tokens, padded_batch,
                       sequential_buckets, sequential_windows, train_token_count, unigram_cross_entropy)
from keel.data.corpora import BUILTIN_CORPORA
from keel.errors import KeelError
from keel.grad import count_tokens
from keel.grad.accumulate import IGNORE_INDEX
from keel.models import GPT, GPTConfig, lm_loss_sum, sample_tokens
from keel.precision import resolve_precision
from keel.tasks.base import Task
from keel.task_registry import TaskSpec, register_task
from keel.timeunits import Time

# Hard bounds on sizes, far above any run this toolkit is for, so an absurd value fails here with its key rather
# than as a failed allocation or a hang; what fits in memory is checked against the machine (check_lm).
MAX_LAYERS = 1024
MAX_WIDTH = 65536
MAX_BLOCK_SIZE = 1 << 24
MAX_EVAL_TOKENS = 10**12
MAX_SAMPLE_TOKENS = 1 << 16


# ---------------------------------------------------------------------------------------------- settings
# The blocks task lm owns in a run config: data (beside the core data keys), model and sample.

class LMDataConfig(DataConfig):
    """The language model's data: where the tokens come from, how they are tokenized and batched (documents,
    tokenizers, packing: docs/data.md); beside the core data keys (batch_size, val_fraction, ...)."""

    source: str = Field(
        "pydoc",
        description="'pydoc' (CPython's reference topics), 'stdlib' (the standard library's source), a text "
        "file, a folder of text files (one document each), a .jsonl file (one document per line), "
        "'hf:FORMAT:PATH' (local files through Hugging Face datasets, e.g. hf:json:data/*.jsonl), a .bin uint16 "
        "token file, or a folder with train.bin and val.bin.",
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
    def _batch_tokens_without_packing(self) -> "LMDataConfig":
        if self.batch_tokens is not None and self.packing:
            raise KeelError(f"data.batch_tokens: {self.batch_tokens} is for data.packing: false (packed windows are "
                             "data.batch_size x model.block_size); allowed: null, or data.packing: false")
        return self


class ModelConfig(BaseModel):
    """The language model of task lm: keel's decoder-only GPT, or a Hugging Face causal LM (extra keel[hf])."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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


class SampleConfig(BaseModel):
    """The short text generated at each evaluation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field("The ", description="Fixed prompt the sample continues.")
    tokens: int = Field(64, ge=0, le=MAX_SAMPLE_TOKENS,
                        description="Tokens to generate (0 turns samples off; at most 65536).")
    temperature: float = Field(0.8, gt=0.0, description="Sampling temperature.")
    top_k: int | None = Field(40, ge=1, description="Sample among the k most likely tokens (null: all).")


def check_lm(config: Any) -> None:
    """Task lm, when its config is loaded: the source exists and holds tokens; with keel's GPT a window fits in the
    training split, and a step fits in memory (estimated by ``keel.models.memory``, before anything is allocated;
    a token file's vocabulary, unknown until it is read, counts as ``data.vocab_size`` or else 256, so the estimate
    stays a lower bound)."""
    train_tokens = train_token_count(config.data.source, config.data.val_fraction)
    if config.model.hf_config is not None or config.model.hf_pretrained is not None:
        return
    optimizer = config.optimizer.name
    from keel.models.memory import available_memory, estimate_gpt_training, format_bytes

    block_size = config.model.block_size
    if block_size + 1 >= train_tokens:
        raise KeelError(
            f"model.block_size: {block_size} is too long for the {train_tokens:,} training tokens of data.source "
            f"'{config.data.source}'; allowed: at most {max(train_tokens - 2, 0):,}, or a larger source"
        )
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    estimate = estimate_gpt_training(
        n_layer=config.model.n_layer, n_embd=config.model.n_embd, vocab_size=config.data.vocab_size or 256,
        block_size=block_size, batch_size=config.data.batch_size, grad_accum=config.grad_accum,
        precision=resolve_precision(config.precision, device)[0], optimizer=optimizer, bias=config.model.bias,
    )
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




class LanguageModelTask(Task):
    """Causal language modelling: the default task, exactly keel's original trainer behaviour."""

    name = "lm"
    token_unit = "tokens"

    def bind(self, config) -> LanguageModelTask:
        self.config = config
        data = config.data
        self.data = load_tokens(data.source, data.val_fraction, data.vocab_size, tokenizer=data.tokenizer,
                                text_field=data.text_field, packing=data.packing, eod=data.eod,
                                cache_dir=data.cache_dir)
        self.block_size = config.model.block_size
        self.packing = data.packing
        if self.packing:
            self._check_val_window(config)
            self.sampler = RandomWindowSampler(self.data.train, self.block_size, data.batch_size, config.seed)
        else:
            self._bind_documents(config)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.num_classes = self.data.vocab_size
        self._unigram: float | None = None
        return self

    def _check_val_window(self, config) -> None:
        """Packed evaluation needs one whole window (block_size + 1 tokens) of the validation split."""
        needed, held = self.block_size + 1, len(self.data.val)
        if held < needed:
            total = held + len(self.data.train)
            raise KeelError(
                f"data.val_fraction: {config.data.val_fraction} leaves {held:,} validation tokens of the "
                f"{total:,} of data.source '{config.data.source}', fewer than one window of model.block_size + 1 = "
                f"{needed:,}; allowed: a val_fraction of at least {needed / total:.3g}, or a smaller "
                "model.block_size")

    def _bind_documents(self, config) -> None:
        """One document per sequence: the sequences of each split and the length-bucketing sampler."""
        data = config.data
        self.batch_tokens = data.batch_tokens or data.batch_size * self.block_size
        if self.batch_tokens < self.block_size:
            raise KeelError(f"data.batch_tokens: {self.batch_tokens} is smaller than one sequence (model.block_size "
                            f"{self.block_size} tokens); allowed: at least {self.block_size}")
        self.train_spans = document_spans(self.data.train_offsets, self.block_size, data.long_documents)
        self.val_spans = document_spans(self.data.val_offsets, self.block_size, data.long_documents)
        if len(self.train_spans) == 0 or len(self.val_spans) == 0:
            raise KeelError(f"data.source: '{data.source}' has no {'training' if not len(self.train_spans) else 'validation'} "
                            "document of two or more tokens (an empty document set); allowed: documents with text")
        lengths = self.train_spans[:, 1] - 1
        self.sampler = BucketSampler(lengths, self.batch_tokens, config.seed)
        self.batch_counts_vary = True
        sorted_lengths, bounds = np.sort(lengths), self.sampler.bounds
        # a bucket holds the same lengths whichever of equally long sequences it gets: its counts are known
        self.bucket_rows = np.diff(bounds)
        self.bucket_tokens = np.add.reduceat(sorted_lengths, bounds[:-1]) if len(bounds) > 1 else np.zeros(0)
        padded = sum(int(sorted_lengths[e - 1]) * int(e - b) for b, e in zip(bounds[:-1], bounds[1:]))
        self.expected_pad_fraction = 1.0 - float(lengths.sum()) / padded

    # ---- model --------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model_config = self.config.model
        if model_config.hf_config is not None or model_config.hf_pretrained is not None:
            return build_hf_model(model_config, self.data.vocab_size, self.block_size)
        fields = model_config.model_dump(exclude={"hf_config", "hf_pretrained"})
        return GPT(GPTConfig(vocab_size=self.data.vocab_size, **fields))

    # ---- data and loss ------------------------------------------------------------------------------------------
    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packing:
            return self.sampler.batch(index, rank, world_size)
        return padded_batch(self.data.train, self.train_spans[self.sampler.indices(index, rank, world_size)])

    def count(self, batch) -> int:
        return count_tokens(batch[1])

    def epoch(self) -> Time:
        """A pass over the training tokens: packed, the split's tokens (windows are drawn at random, so an epoch is
        as many targets as the split holds); without packing, the targets of every sequence."""
        if self.packing:
            return Time(len(self.data.train), "token")
        return Time(int(self.bucket_tokens.sum()), "token")

    def batch_counts(self, index: int, world_size: int = 1) -> tuple[float, float]:
        """Exact: packed, ``batch_size`` windows of ``block_size`` targets per rank; without packing, the rows and
        the unpadded targets of the bucket each rank draws (known from the lengths alone)."""
        if self.packing:
            rows = self.sampler.batch_size * world_size
            return rows, rows * self.block_size
        buckets = [int(self.sampler.buckets.locate(index, rank, world_size)[1][0]) for rank in range(world_size)]
        return (sum(int(self.bucket_rows[b]) for b in buckets), sum(int(self.bucket_tokens[b]) for b in buckets))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return lm_loss_sum(self.logits(model, x), y)

    def eval_batches(self, split: str, rank: int = 0, world_size: int = 1):
        tokens = self.data.val if split == "val" else self.data.train
        if self.packing:
            batches = sequential_windows(tokens, self.block_size, self.config.data.batch_size,
                                         self.config.data.eval_tokens)
        else:
            spans = self.val_spans if split == "val" else self.train_spans
            batches = sequential_buckets(tokens, spans, self.batch_tokens, self.config.data.eval_tokens)
        return (b for i, b in enumerate(batches) if i % world_size == rank)

    def step_metrics(self, batches) -> dict[str, float]:
        """Without packing: ``pad_fraction``, the share of the step's positions that are padding."""
        if self.packing:
            return {}
        positions = sum(b[1].numel() for b in batches)
        pads = sum(int((b[1] == IGNORE_INDEX).sum()) for b in batches)
        return {"pad_fraction": round(pads / max(positions, 1), 6)}

    def flops_per_token(self, model: nn.Module, batch=None) -> float | None:
        """6 N + 12 L d T (Kaplan et al. 2020; Chowdhery et al. 2022, Appendix B): N the parameters of the matrix
        products (every parameter but the embedding tables), and for keel's GPT the attention scores and their
        weighted sum over a context of T tokens (the batch's length, else model.block_size), L layers of width d,
        counted without the causal mask's saving as PaLM counts them. A Hugging Face model: 6 N. An output head
        tied to an embedding table (GPT-2's) is a product too: it counts, although its weight is the table's."""
        matrices = sum(p.numel() for name, p in model.named_parameters()
                       if not _is_embedding(model, name))
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        matrices += sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, nn.Linear) and id(m.weight) in tables)
        flops = 6.0 * matrices
        if isinstance(model, GPT):
            context = batch[0].shape[1] if batch is not None else self.block_size
            flops += 12.0 * model.config.n_layer * model.config.n_embd * context
        return flops

    def run_files(self) -> dict[str, str]:
        """A Hugging Face tokenizer's ``tokenizer.json`` (ASCII-escaped JSON), kept in the run directory, so
        ``data.tokenizer: RUN/tokenizer.json`` reuses it."""
        json_text = getattr(self.data.tokenizer, "json_text", None)
        return {"tokenizer.json": json.dumps(json.loads(json_text))} if json_text else {}

    # ---- reporting ----------------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, generator: torch.Generator, autocast) -> str:
        cfg = self.config.sample
        if cfg.tokens == 0:
            return ""
        device = next(model.parameters()).device
        tokenizer = self.data.tokenizer
        if tokenizer is None:  # a token file without a tokenizer: ids
            prompt = [0]
        elif self.data.is_bytes:
            prompt = list(cfg.prompt.encode("utf-8")) or [10]
        else:
            prompt = tokenizer.encode_text(cfg.prompt) or [tokenizer.eod_id or 0]
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        with autocast():
            out = sample_tokens(lambda x: self.logits(model, x), idx, cfg.tokens, self.block_size, cfg.temperature,
                                cfg.top_k, generator)[0].tolist()
        model.train(was_training)
        if tokenizer is None:
            return " ".join(map(str, out))
        return tokenizer.decode([i for i in out if i < tokenizer.vocab_size])

    def unigram_baseline(self) -> float:
        if self._unigram is None:
            self._unigram = unigram_cross_entropy(self.data.train, self.data.val, self.data.vocab_size)
        return self._unigram

    def describe(self) -> list[str]:
        lines = [f"data: {self.data.description}; train {len(self.data.train):,} / val {len(self.data.val):,} tokens"]
        if not self.packing:
            lines.append(f"sequences: {len(self.train_spans):,} train / {len(self.val_spans):,} val (documents cut at "
                         f"{self.block_size} tokens); {self.sampler.batches_per_epoch:,} length buckets of at most "
                         f"{self.batch_tokens:,} padded tokens; padding {self.expected_pad_fraction:.1%} of positions")
        lines.append(f"unigram baseline (validation cross-entropy of token frequencies): {self.unigram_baseline():.4f}")
        return lines

    def reference_metrics(self) -> dict[str, float]:
        return {"unigram_baseline": self.unigram_baseline()}


def _is_embedding(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to an ``nn.Embedding`` (a lookup, not a matrix product)."""
    module_name = name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name) if module_name else model, nn.Embedding)


def build_hf_model(model_config: Any, vocab_size: int, block_size: int) -> nn.Module:
    """A transformers causal LM from ``model.hf_config`` (randomly initialised) or ``model.hf_pretrained``."""
    try:
        import transformers
    except ImportError:
        raise KeelError("model.hf_config / model.hf_pretrained need the transformers package; install the extra: "
                        "pip install 'keel[hf]'") from None
    transformers.logging.set_verbosity_error()
    if model_config.hf_pretrained is not None:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_config.hf_pretrained,
                                                                      local_files_only=True)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise KeelError(f"model.hf_pretrained: '{model_config.hf_pretrained}' does not load as a transformers "
                            f"causal LM ({first}); allowed: a local directory written by save_pretrained") from None
    else:
        options = dict(model_config.hf_config)
        model_type = options.pop("model_type", None)
        if not model_type:
            raise KeelError("model.hf_config: no model_type; allowed: a transformers config with model_type, "
                            "e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}")
        options.setdefault("vocab_size", vocab_size)
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **options)
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            first = str(error).strip().splitlines()[0]
            raise KeelError(f"model.hf_config: {first}; allowed: a transformers config of a causal LM") from None
    config = model.config
    vocab = getattr(config, "vocab_size", vocab_size)
    if vocab < vocab_size:
        raise KeelError(f"model.hf_config: vocab_size {vocab} is smaller than the data's vocabulary ({vocab_size}); "
                        f"allowed: at least {vocab_size}")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < block_size:
        raise KeelError(f"model.block_size: {block_size} exceeds the Hugging Face model's {positions} positions; "
                        f"allowed: at most {positions}")
    return model


register_task(TaskSpec(
    "lm", "keel.tasks.lm:LanguageModelTask", "a language model on data.source (keel's GPT or a Hugging Face causal LM)",
    settings={"data": LMDataConfig, "model": ModelConfig, "sample": SampleConfig}, recipe="fast", check=check_lm,
    context_length=lambda config: config.model.block_size,
))
