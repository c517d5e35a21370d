"""Training stability units: gradient clipping, non-finite checks, loss-spike detection, accumulation."""

from keel.grad.accumulate import count_tokens, micro_batch_weights, split_micro_batches
from keel.grad.clip import (
    Clipper,
    ClipResult,
    adaptive_clip,
    clip_by_global_norm,
    clip_by_value,
    global_norm,
    unitwise_norm,
)
from keel.grad.config import ClipConfig, NonFiniteConfig, SpikeConfig
from keel.grad.finite import TrainingUnstableError, all_ranks_agree, grads_are_finite, loss_is_finite
from keel.grad.spike import LossSpikeDetector

__all__ = [
    "ClipConfig",
    "ClipResult",
    "Clipper",
    "LossSpikeDetector",
    "NonFiniteConfig",
    "SpikeConfig",
    "TrainingUnstableError",
    "adaptive_clip",
    "all_ranks_agree",
    "clip_by_global_norm",
    "clip_by_value",
    "count_tokens",
    "global_norm",
    "grads_are_finite",
    "loss_is_finite",
    "micro_batch_weights",
    "split_micro_batches",
    "unitwise_norm",
]
