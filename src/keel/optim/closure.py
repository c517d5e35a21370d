"""The ``step(closure)`` contract every torch optimizer keeps, in one place for keel's own optimizers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss ``closure()`` returns, evaluated with gradients enabled (inside a ``no_grad`` step), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
