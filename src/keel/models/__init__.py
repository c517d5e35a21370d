"""Built-in models."""

from keel.models.gpt import GPT, GPTConfig, lm_loss_sum

__all__ = ["GPT", "GPTConfig", "lm_loss_sum"]
