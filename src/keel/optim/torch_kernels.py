"""Which of torch's three implementations a torch optimizer runs: its fused kernel, its multi-tensor (foreach) ops,
or its per-tensor loop, chosen per optimizer and per device.

torch itself never turns `fused` on by default, and turns `foreach` on only where the device has fast
multi-tensor kernels (`torch.optim.optimizer._get_foreach_kernels_supported_devices()`: CUDA, XPU, MTIA,
privateuse1). On CPU, `torch.optim.AdamW()` therefore runs the per-tensor loop, which makes one pass over memory
per elementwise op, where `fused=True` reads and writes each tensor once: on one CPU thread the loop took 3.6x
the fused step's time at nanoGPT-char shapes (10.8M) and 4.8x at GPT-2 small (124M) (median step times,
`benchmarks/results/optim.json`; 7-8x has been measured on another machine). keel decides the flags left null:

- `fused=True` where torch has a fused kernel for this optimizer on every parameter's device type, every
  parameter is floating point, and no parameter belongs to a sparse embedding (fused kernels take no sparse
  gradients). Whether the kernel exists is found by trying it once per optimizer class and device type on a
  two-element tensor (torch 2.13 has fused CPU kernels for Adam, AdamW, SGD and Adagrad; on other devices the
  trial decides).
- otherwise `foreach=True` where torch has fast multi-tensor kernels for every parameter's device (its own list).
- otherwise `foreach=False`, torch's per-tensor loop. On CPU torch's `_foreach_*` ops are that same loop of
  per-tensor ops run over the whole model op by op, so each op's temporaries stream through memory instead of
  staying in cache: RMSprop, NAdam, RAdam and Adafactor ran no faster with `foreach=True` on one CPU thread at
  nanoGPT-char shapes (foreach took 1.07-1.35x the loop's median step time; `benchmarks/results/optim.json`).

A flag the user sets (true or false) is kept as given; only null ones are decided. `fused: false` alone leaves
`foreach` to be decided, and `foreach: false` alone leaves `fused` to be decided; both false is torch's
per-tensor loop.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch
from torch import nn

from keel.errors import KeelError

__all__ = ["choose_kernels", "fast_foreach_devices", "fused_kernel_available", "has_sparse_embedding"]


@functools.cache
def fused_kernel_available(optimizer_class: type, device_type: str) -> bool:
    """Whether `optimizer_class(..., fused=True)` steps a float32 tensor on `device_type` (tried once, cached)."""
    try:
        p = torch.zeros(2, device=device_type, requires_grad=True)
        p.grad = torch.ones(2, device=device_type)
        optimizer_class([p], lr=1e-3, fused=True).step()
    except Exception:  # noqa: BLE001  (no kernel, no such device, or a torch too old: not available)
        return False
    return True


def plain_on_cuda(params: list[torch.Tensor]) -> bool:
    """Whether there are parameters and every one is a plain tensor on a CUDA device: where keel's batched GPU
    paths (Muon's stacked Newton-Schulz, SOAP's stacked factors) are chosen when left null (tensor subclasses, e.g.
    DTensor shards, keep the per-parameter path)."""
    return bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type == "cuda" for p in params)


def fast_foreach_devices() -> set[str]:
    """The device types with fast multi-tensor (foreach) kernels, as torch lists them (not CPU)."""
    try:
        from torch.optim.optimizer import _get_foreach_kernels_supported_devices
    except ImportError:  # a private helper; without it, trust the devices torch has long had kernels for
        return {"cuda"}
    return set(_get_foreach_kernels_supported_devices())


def has_sparse_embedding(model: nn.Module) -> bool:
    """Whether `model` has an `nn.Embedding` or `nn.EmbeddingBag` with `sparse=True` (sparse gradients)."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules())


def choose_kernels(
    optimizer_class: type,
    params: Iterable[torch.Tensor],
    *,
    fused: bool | None = None,
    foreach: bool | None = None,
    sparse: bool = False,
    key: str = "optimizer",
) -> dict[str, bool]:
    """The `fused` / `foreach` arguments for `optimizer_class` over `params`: the given ones kept, null ones decided.

    Returns only the arguments `optimizer_class` accepts. `sparse`: some parameters will get sparse gradients.

    >>> choose_kernels(torch.optim.AdamW, [torch.zeros(3)])      # on CPU
    {'fused': True, 'foreach': False}
    >>> choose_kernels(torch.optim.RMSprop, [torch.zeros(3)])
    {'foreach': False}
    """
    if fused is True and foreach is True:
        raise KeelError(f"{key}.fused, {key}.foreach: both true; allowed: at most one of them true")
    params = list(params)
    accepts = inspect.signature(optimizer_class.__init__).parameters
    device_types = {p.device.type for p in params}
    plain = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) for p in params)
    out: dict[str, bool] = {}
    if "fused" in accepts:
        if fused is None:
            fused = (
                foreach is not True
                and plain
                and not sparse
                and all(torch.is_floating_point(p) for p in params)
                and all(fused_kernel_available(optimizer_class, d) for d in device_types)
            )
        out["fused"] = fused
    if "foreach" in accepts:
        if foreach is None:
            foreach = not out.get("fused", False) and plain and device_types <= fast_foreach_devices()
        out["foreach"] = foreach
    return out
