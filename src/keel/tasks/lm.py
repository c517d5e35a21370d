"""``task: lm``: next-token prediction on text or token files, with keel's GPT or a Hugging Face causal LM.

Data come from ``data.source`` (built-in corpora, the user's text, nanoGPT token files); training batches are
random windows of ``model.block_size + 1`` tokens; evaluations read fixed consecutive windows from the start of
the validation split (``val``) and of the training split (``train``), ``data.eval_tokens`` each.

The model is keel's GPT (``model.n_layer`` ...) unless ``model.hf_config`` (a transformers config, e.g.
``{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}``) or ``model.hf_pretrained`` (a local directory for
``from_pretrained``) names a Hugging Face model; that needs the optional extra ``keel[hf]``. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from keel.data import RandomWindowSampler, load_tokens, sequential_windows, unigram_cross_entropy
from keel.errors import KeelError
from keel.grad import count_tokens
from keel.models import GPT, GPTConfig, lm_loss_sum, sample_tokens
from keel.tasks.base import Task


class LanguageModelTask(Task):
    """Causal language modelling: the default task, exactly keel's original trainer behaviour."""

    name = "lm"

    def bind(self, config) -> LanguageModelTask:
        self.config = config
        data = config.data
        self.data = load_tokens(data.source, data.val_fraction, data.vocab_size)
        self.block_size = config.model.block_size
        self.sampler = RandomWindowSampler(self.data.train, self.block_size, data.batch_size, config.seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.tokens_per_batch = data.batch_size * self.block_size
        self.num_classes = self.data.vocab_size
        self._unigram: float | None = None
        return self

    # ---- model --------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model_config = self.config.model
        if model_config.hf_config is not None or model_config.hf_pretrained is not None:
            return build_hf_model(model_config, self.data.vocab_size, self.block_size)
        fields = model_config.model_dump(exclude={"hf_config", "hf_pretrained"})
        return GPT(GPTConfig(vocab_size=self.data.vocab_size, **fields))

    # ---- data and loss ------------------------------------------------------------------------------------------
    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(index, rank, world_size)

    def count(self, batch) -> int:
        return count_tokens(batch[1])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return lm_loss_sum(self.logits(model, x), y)

    def eval_batches(self, split: str, rank: int = 0, world_size: int = 1):
        tokens = self.data.val if split == "val" else self.data.train
        batches = sequential_windows(tokens, self.block_size, self.config.data.batch_size,
                                     self.config.data.eval_tokens)
        return (b for i, b in enumerate(batches) if i % world_size == rank)

    # ---- reporting ----------------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, generator: torch.Generator, autocast) -> str:
        cfg = self.config.sample
        if cfg.tokens == 0:
            return ""
        device = next(model.parameters()).device
        prompt = (list(cfg.prompt.encode("utf-8")) or [10]) if self.data.is_bytes else [0]
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        with autocast():
            out = sample_tokens(lambda x: self.logits(model, x), idx, cfg.tokens, self.block_size, cfg.temperature,
                                cfg.top_k, generator)[0].tolist()
        model.train(was_training)
        if self.data.is_bytes:
            return bytes(out).decode("utf-8", errors="replace")
        return " ".join(map(str, out))

    def unigram_baseline(self) -> float:
        if self._unigram is None:
            self._unigram = unigram_cross_entropy(self.data.train, self.data.val, self.data.vocab_size)
        return self._unigram

    def describe(self) -> list[str]:
        return [f"data: {self.data.description}; train {len(self.data.train):,} / val {len(self.data.val):,} tokens",
                f"unigram baseline (validation cross-entropy of token frequencies): {self.unigram_baseline():.4f}"]

    def reference_metrics(self) -> dict[str, float]:
        return {"unigram_baseline": self.unigram_baseline()}


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
