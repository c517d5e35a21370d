"""Non-finite checks for losses and gradients, agreed across data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from keel.errors import TrainingUnstableError  # noqa: F401  (re-exported by keel.grad)
from keel.grad.clip import Parameters, _grads, _group


def all_ranks_agree(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """True only if `flag` is true on every rank (an all_reduce with MIN); `flag` itself without a process group.

    Every data-parallel rank must take the same skip decision, otherwise the replicas drift apart.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    if device is None:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.as_tensor(flag, dtype=torch.int32).reshape(1).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def grads_are_finite(parameters: Parameters, *, sync: bool = True) -> bool:
    """Whether every gradient element is finite: max_p ||g_p||_inf is finite (one fused reduction, one sync).

    The max-abs norm cannot overflow for finite inputs, unlike the L2 norm. With `sync` and an initialised
    process group, the answer is agreed by all ranks (false if any rank saw a NaN or inf).
    """
    grads = _grads(parameters)
    finite = True
    if grads:
        peaks = []
        for (device, _), group in _group(grads).items():
            peaks.append(torch.stack(torch._foreach_norm(group, float("inf"))).float().max().cpu())
        finite = bool(torch.isfinite(torch.stack(peaks)).all())
    return all_ranks_agree(finite) if sync else finite


def loss_is_finite(loss: torch.Tensor | float, *, sync: bool = True) -> bool:
    """Whether the loss is finite (all elements), agreed by all data-parallel ranks when `sync`."""
    finite = bool(torch.isfinite(torch.as_tensor(loss).detach()).all())
    return all_ranks_agree(finite) if sync else finite
