"""A decoder-only GPT: pre-norm transformer blocks, causal self-attention, GELU MLP (after GPT-2 and nanoGPT).

Two options of the residual blocks are remedies the Deep Learning Tuning Playbook lists for training instability
(FAQ "How can I fix training instability?"): where the norm sits (``norm_position``: ``pre`` by default, ``post``
as in the original Transformer, ``residual`` for the Playbook's "normalise as the last operation before the
residual", ``x + Norm(f(x))``) and zero-initialised residual branches (``zero_init_residual``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm_position: str = "pre"  # pre: x + f(Norm(x)); post: Norm(x + f(x)); residual: x + Norm(f(x))
    zero_init_residual: bool = False  # a learned scalar gate on each residual branch, initialised to 0 (ReZero)

NORM_POSITIONS = ("pre", "post", "residual")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, width)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A residual block of attention then MLP; ``norm_position`` says where each LayerNorm sits:

    - ``pre`` (default, GPT-2): ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``;
    - ``post`` (Vaswani et al. 2017): ``ln_1(x + attn(x))``, then ``ln_2(x + mlp(x))``;
    - ``residual``: ``x + ln_1(attn(x))``, then ``x + ln_2(mlp(x))`` (the Tuning Playbook's ``x + Norm(f(x))``,
      the res-post-norm of Swin Transformer V2, Liu et al. 2022).

    ``zero_init_residual`` multiplies each branch by a learned scalar gate initialised to 0 (``attn_gate``,
    ``mlp_gate``): ReZero, Bachlechner et al. 2021, "ReZero is all you need: fast convergence at large depth",
    ``x + alpha * f(x)`` with ``alpha = 0`` at initialisation, so every block starts as the identity (with
    ``post`` the gate sits inside the norm: ``Norm(x + alpha * f(x))``). A gate rather than zeroed output
    projections, because with ``residual`` a zero branch would feed LayerNorm a zero vector, whose gradient is
    scaled by 1/sqrt(eps).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position {config.norm_position!r}; allowed: {', '.join(NORM_POSITIONS)}")
        self.norm_position = config.norm_position
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        if config.zero_init_residual:
            self.attn_gate = nn.Parameter(torch.zeros(()))
            self.mlp_gate = nn.Parameter(torch.zeros(()))
        else:
            self.attn_gate = self.mlp_gate = None

    @staticmethod
    def _gated(branch: torch.Tensor, gate: nn.Parameter | None) -> torch.Tensor:
        return branch if gate is None else gate * branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_position == "pre":
            x = x + self._gated(self.attn(self.ln_1(x)), self.attn_gate)
            return x + self._gated(self.mlp(self.ln_2(x)), self.mlp_gate)
        if self.norm_position == "post":
            x = self.ln_1(x + self._gated(self.attn(x), self.attn_gate))
            return self.ln_2(x + self._gated(self.mlp(x), self.mlp_gate))
        x = x + self._gated(self.ln_1(self.attn(x)), self.attn_gate)
        return x + self._gated(self.ln_2(self.mlp(x)), self.mlp_gate)


class GPT(nn.Module):
    """Decoder-only language model returning next-token logits of shape ``(batch, time, vocab_size)``.

    Initialisation follows GPT-2: normal(0, 0.02) weights, residual projections scaled by ``1/sqrt(2 * n_layer)``.
    The final ``ln_f`` is kept whatever ``norm_position`` (with ``post`` it only adds a learned affine map), so
    parameter names do not depend on the option.
    Parameter names are stable (``tok_emb``, ``pos_emb``, ``blocks.N.*``, ``ln_f``, ``head``) so the
    parameter-group helpers can tell embeddings, norms, biases and depth apart.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"sequence of length {time} exceeds block_size {self.config.block_size}")
        pos = torch.arange(time, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx``; a private ``generator`` leaves the global RNG untouched."""
        return sample_tokens(self, idx, max_new_tokens, self.config.block_size, temperature, top_k, generator)


@torch.no_grad()
def sample_tokens(
    logits_of,
    idx: torch.Tensor,
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Autoregressive sampling from any causal LM: ``logits_of(idx)`` returns ``(batch, time, vocab)`` logits;
    the last ``context`` tokens are fed each time.

    A model whose weights diverged gives non-finite logits, and softmax then NaN probabilities: such a row is
    sampled uniformly, so the run's report goes on instead of failing (the non-finite guard handles training)."""
    for _ in range(max_new_tokens):
        logits = logits_of(idx[:, -context:])[:, -1, :] / max(temperature, 1e-6)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits.float(), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # finite rows pass unchanged (and nothing waits for the device)
        probs = torch.where(probs.sum(dim=-1, keepdim=True) > 0, probs, torch.ones_like(probs))
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) over the targets that are not ``ignore_index`` (torch's -100).

    Summing and dividing once by the global batch's token count makes gradient accumulation match one large
    batch even when micro-batches hold different numbers of tokens.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
