"""Training stability units: gradient clipping, non-finite checks, loss-spike detection, accumulation."""

from keel.grad.clip import (
    Clipper,
    ClipResult,
    adaptive_clip,
    clip_by_global_norm,
    clip_by_value,
    global_norm,
    unitwise_norm,
)
from keel.grad.config import ClipConfig
from keel.grad.finite import all_ranks_agree, grads_are_finite, loss_is_finite

__all__ = [
    "ClipConfig",
    "ClipResult",
    "Clipper",
    "adaptive_clip",
    "all_ranks_agree",
    "clip_by_global_norm",
    "clip_by_value",
    "global_norm",
    "grads_are_finite",
    "loss_is_finite",
    "unitwise_norm",
]
