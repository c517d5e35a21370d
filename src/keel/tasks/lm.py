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
from typing import Any

import numpy as np
import torch
from torch import nn

from keel.data import (BucketSampler, RandomWindowSampler, document_spans, load_tokens, padded_batch,
                       sequential_buckets, sequential_windows, unigram_cross_entropy)
from keel.errors import KeelError
from keel.grad import count_tokens
from keel.grad.accumulate import IGNORE_INDEX
from keel.models import GPT, GPTConfig, lm_loss_sum, sample_tokens
from keel.tasks.base import Task


class LanguageModelTask(Task):
    """Causal language modelling: the default task, exactly keel's original trainer behaviour."""

    name = "lm"

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
            self.tokens_per_batch = data.batch_size * self.block_size
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
        self.tokens_per_batch = max(1, int(round(lengths.sum() / self.sampler.batches_per_epoch)))
        sorted_lengths, bounds = np.sort(lengths), self.sampler.bounds
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
        counted without the causal mask's saving as PaLM counts them. A Hugging Face model: 6 N."""
        matrices = sum(p.numel() for name, p in model.named_parameters()
                       if not _is_embedding(model, name))
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
