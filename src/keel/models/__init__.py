"""Built-in models."""

from keel.models.gpt import GPT, GPTConfig, lm_loss_sum, sample_tokens

__all__ = ["GPT", "GPTConfig", "lm_loss_sum", "sample_tokens"]
