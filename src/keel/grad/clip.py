"""Gradient clipping: by global L2 norm, by value, adaptive (AGC) and at a percentile of recent norms."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from keel.errors import KeelError
from keel.grad.config import ClipConfig

Parameters = Iterable[torch.nn.Parameter] | Iterable[torch.Tensor]


def _grads(parameters: Parameters) -> list[torch.Tensor]:
    """The `.grad` tensors of `parameters` that exist (a single tensor counts as one parameter)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _group(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _norm_of_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_i ||t_i||_2^2) over all tensors, accumulated in at least float32, as a 0-d tensor."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    partial = []
    for (dev, dtype), group in _group(tensors).items():
        if dtype in (torch.float32, torch.float64):
            norms = torch._foreach_norm(group, 2.0)
        else:  # fp16/bf16 gradients: square in float32 so that the norm does not overflow
            norms = [torch.linalg.vector_norm(t, 2.0, dtype=torch.float32) for t in group]
        partial.append(torch.linalg.vector_norm(torch.stack(norms).float(), 2.0).to(device))
    return torch.linalg.vector_norm(torch.stack(partial), 2.0)


def global_norm(parameters: Parameters) -> torch.Tensor:
    """Global L2 norm of all gradients, ||g|| = sqrt(sum_p ||g_p||^2), as a 0-d float32 tensor (0 without grads).

    A NaN or inf in any gradient makes the norm NaN or inf.
    """
    return _norm_of_tensors(_grads(parameters))


def clip_by_global_norm(parameters: Parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / ||g||); return the unclipped global norm ||g||.

    Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks".
    Unlike `torch.nn.utils.clip_grad_norm_` there is no epsilon in the denominator, so clipping twice
    changes nothing (up to float rounding). Gradients are left untouched when the norm is not finite
    (the non-finite guard skips such an update instead).
    """
    if max_norm <= 0:
        raise KeelError(f"max_norm: {max_norm!r} is not a positive number; allowed: max_norm > 0")
    grads = _grads(parameters)
    norm = _norm_of_tensors(grads)
    if grads:
        # min(1, max_norm / norm) computed on the device; a non-finite norm gives factor 1 (nothing changes).
        factor = torch.clamp(max_norm / norm, max=1.0)
        factor = torch.where(torch.isfinite(norm), factor, torch.ones_like(factor))
        for (device, _), group in _group(grads).items():
            torch._foreach_mul_(group, factor.to(device))
    return norm


def clip_by_value(parameters: Parameters, max_value: float) -> bool:
    """Clamp every gradient element to [-max_value, max_value]; return whether any element was changed."""
    if max_value <= 0:
        raise KeelError(f"max_value: {max_value!r} is not a positive number; allowed: max_value > 0")
    grads = _grads(parameters)
    if not grads:
        return False
    over = []
    for _, group in _group(grads).items():
        peaks = torch._foreach_norm(group, float("inf"))  # max |g| per tensor
        over.append((torch.stack(peaks) > max_value).any().cpu())
        torch._foreach_clamp_min_(group, -max_value)
        torch._foreach_clamp_max_(group, max_value)
    return bool(torch.stack(over).any())


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit: over all dims but the first for ndim >= 2, over the whole tensor otherwise.

    Layout follows PyTorch (out_features, in_features, *kernel); Brock et al. (2021), NFNets.
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, 2.0)
    return torch.linalg.vector_norm(x, 2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_clip(parameters: Parameters, clipping: float = 0.01, eps: float = 1e-3) -> bool:
    """Adaptive gradient clipping (AGC); return whether any unit was clipped.

    For every unit i (row of a weight): if ||G_i|| / max(||W_i||, eps) > clipping, then
    G_i <- G_i * clipping * max(||W_i||, eps) / ||G_i||.
    Brock, De, Smith & Simonyan (2021), "High-Performance Large-Scale Image Recognition Without
    Normalization". The paper does not clip the final classifier layer: pass only the parameters to clip.
    """
    if clipping <= 0 or eps <= 0:
        raise KeelError(f"adaptive_clip: clipping={clipping!r}, eps={eps!r}; allowed: both > 0")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clipped = []
    with torch.no_grad():
        for p in parameters:
            if p.grad is None:
                continue
            g = p.grad
            max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clipping
            g_norm = unitwise_norm(g).to(max_norm.dtype)
            over = g_norm > max_norm
            factor = torch.where(over, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
            g.mul_(factor.to(g.dtype))
            clipped.append(over.any())
    return bool(torch.stack(clipped).any()) if clipped else False


@dataclass(frozen=True)
class ClipResult:
    """What one call to a `Clipper` did: the unclipped global L2 norm and whether gradients were changed."""

    norm: float
    clipped: bool
    threshold: float | None = None


class Clipper:
    """Gradient clipping as configured by `ClipConfig`, with the state that percentile mode needs.

    Call it after backward (and after unscaling with fp16), before the optimizer step:
    `result = clipper(model.parameters(), step)`. `step` is the number of updates already applied.
    With `start_after_warmup`, clipping applies from `step >= warmup_steps` (the nanoGPT-style check
    `step > warmup` is off by one: it leaves the first post-warmup update unclipped).

    Percentile mode (Deep Learning Tuning Playbook, "clip at the 90th percentile of gradient norms"):
    the threshold is the `percentile`-th percentile (linear interpolation, as numpy) of the unclipped norms
    of the last `window` finite updates, not counting the current one; no clipping until
    `calibration_steps` norms were seen.
    """

    def __init__(self, config: ClipConfig | None = None, warmup_steps: int = 0):
        self.config = config if config is not None else ClipConfig()
        if warmup_steps < 0:
            raise KeelError(f"warmup_steps: {warmup_steps!r} is negative; allowed: an int >= 0")
        self.warmup_steps = int(warmup_steps)
        self.norms: deque[float] = deque(maxlen=self.config.window)

    def active(self, step: int) -> bool:
        """Whether clipping applies at `step` (updates already applied)."""
        return not self.config.start_after_warmup or step >= self.warmup_steps

    def threshold(self) -> float | None:
        """The current percentile threshold, or None while calibrating (percentile mode only)."""
        if len(self.norms) < self.config.calibration_steps:
            return None
        values = torch.tensor(list(self.norms), dtype=torch.float64)
        return float(torch.quantile(values, self.config.percentile / 100.0))

    def __call__(self, parameters: Parameters, step: int) -> ClipResult:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        cfg = self.config
        active = self.active(step)
        threshold: float | None = None
        if cfg.mode == "norm" and active:
            norm = float(clip_by_global_norm(parameters, cfg.max_norm))
            threshold = cfg.max_norm
            clipped = math.isfinite(norm) and norm > cfg.max_norm
        elif cfg.mode == "percentile":
            threshold = self.threshold() if active else None
            if threshold is not None:
                norm = float(clip_by_global_norm(parameters, threshold))
                clipped = math.isfinite(norm) and norm > threshold
            else:
                norm, clipped = float(global_norm(parameters)), False
            if math.isfinite(norm):
                self.norms.append(norm)
        else:
            norm = float(global_norm(parameters))
            clipped = False
            if active and math.isfinite(norm):
                if cfg.mode == "value":
                    clipped = clip_by_value(parameters, cfg.max_value)
                    threshold = cfg.max_value
                elif cfg.mode == "agc":
                    clipped = adaptive_clip(parameters, cfg.clipping, cfg.eps)
        return ClipResult(norm=norm, clipped=clipped, threshold=threshold)

    def state_dict(self) -> dict:
        """The window of recent unclipped norms (percentile mode); plain floats, safe for weights_only loads."""
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.norms = deque((float(x) for x in state.get("norms", [])), maxlen=self.config.window)
