"""A shadow copy of a model's weights, updated by one multi-tensor lerp, swappable in place.

This is the machinery under `EMA`, `Polyak` and `SWA`: each of them only decides the lerp weight of an update,
shadow <- shadow + w_k * (weight - shadow) = shadow - w_k * (shadow - weight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from keel.errors import KeelError

_SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CONVERT_CHUNK_ELEMENTS = 1 << 24  # bound on the temporary used when the shadow's device or dtype differs


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name ("float32", "bfloat16", ...); dtypes and None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise KeelError(f"dtype: {dtype!r} is not supported; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model saves: its parameters (tied ones once, first name wins) and persistent buffers."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name in persistent and buffer is not None:
            tensors[name] = buffer
    return tensors


class ShadowWeights:
    """A shadow of every parameter and persistent buffer of `model`, with explicit state.

    Floating-point tensors are averaged (buffers only if `include_buffers`, otherwise copied); integer buffers
    are copied from the model at each update. The shadow may live on another `device` or in another `dtype`
    (e.g. an fp32 shadow on the CPU for bf16 weights on an accelerator).
    """

    @classmethod
    def from_config(cls, model: nn.Module, config) -> ShadowWeights:
        """The unit a ``polyak:`` or ``swa:`` block describes (its ``include_buffers``, ``device``, ``dtype``), as
        keel's trainer and the Lightning and HF adapters all build it."""
        return cls(model, include_buffers=config.include_buffers, device=config.device, dtype=config.dtype)

    def __init__(
        self,
        model: nn.Module,
        *,
        include_buffers: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.include_buffers = include_buffers
        self.num_updates = 0
        self._swapped = False
        self._stash: list[torch.Tensor] | None = None
        dtype = as_dtype(dtype)
        params = {id(p) for p in model.parameters()}
        self.names: list[str] = []
        self._sources: list[torch.Tensor] = []
        self.shadow: dict[str, torch.Tensor] = {}
        averaged: list[int] = []
        copied: list[int] = []
        with torch.no_grad():
            for name, tensor in model_tensors(model).items():
                floating = tensor.is_floating_point()
                target_dtype = dtype if (floating and dtype is not None) else tensor.dtype
                target_device = torch.device(device) if device is not None else tensor.device
                shadow = tensor.detach().to(device=target_device, dtype=target_dtype, copy=True)
                index = len(self.names)
                self.names.append(name)
                self._sources.append(tensor)
                self.shadow[name] = shadow
                if floating and (id(tensor) in params or include_buffers):
                    averaged.append(index)
                else:
                    copied.append(index)
        self._averaged_groups = self._group(averaged)
        self._copied = copied

    def _group(self, indices: list[int]) -> list[tuple[bool, list[torch.Tensor], list[torch.Tensor]]]:
        """Group (shadow, source) pairs by (shadow device, shadow dtype, source device, source dtype)."""
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i in indices:
            src, dst = self._sources[i], self.shadow[self.names[i]]
            key = (dst.device, dst.dtype, src.device, src.dtype)
            groups.setdefault(key, ([], []))
            groups[key][0].append(dst)
            groups[key][1].append(src)
        return [
            (key[0] == key[2] and key[1] == key[3], shadows, sources)
            for key, (shadows, sources) in groups.items()
        ]

    # ---- updates -------------------------------------------------------------------------------------------
    def lerp_weight(self, k: int) -> float:
        """The weight w_k of the k-th update (k = 1 for the first); subclasses define it."""
        raise NotImplementedError

    @torch.inference_mode()  # like no_grad, and skips the autograd dispatch keys: ~1 us less per tensor
    def update(self) -> None:
        """Fold the model's current weights into the shadow; the first update copies them."""
        self._check_not_swapped("update")
        self.num_updates += 1
        weight = 1.0 if self.num_updates == 1 else float(self.lerp_weight(self.num_updates))
        for same, shadows, sources in self._averaged_groups:
            if same:
                if weight == 1.0:
                    torch._foreach_copy_(shadows, sources)
                else:
                    torch._foreach_lerp_(shadows, sources, weight)
            else:
                for shadow_chunk, converted in self._converted_chunks(shadows, sources):
                    if weight == 1.0:
                        torch._foreach_copy_(shadow_chunk, converted)
                    else:
                        torch._foreach_lerp_(shadow_chunk, converted, weight)
        for i in self._copied:
            self.shadow[self.names[i]].copy_(self._sources[i].detach())

    @staticmethod
    def _converted_chunks(
        shadows: list[torch.Tensor], sources: list[torch.Tensor]
    ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Sources cast to the shadow's device and dtype, a bounded number of elements at a time."""
        start, count = 0, 0
        for i, src in enumerate(sources):
            count += src.numel()
            if count >= _CONVERT_CHUNK_ELEMENTS or i == len(sources) - 1:
                chunk = shadows[start : i + 1]
                yield chunk, [
                    s.detach().to(device=d.device, dtype=d.dtype)
                    for s, d in zip(sources[start : i + 1], chunk)
                ]
                start, count = i + 1, 0

    # ---- using the averaged weights -----------------------------------------------------------------------
    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights with the shadow in place; calling it again swaps back.

        Where shadow and weight share device and dtype, their bits are exchanged in place (no extra memory).
        Otherwise the raw weights are stashed on the shadow's device while the averaged ones are swapped in.
        """
        if self.num_updates == 0:
            raise KeelError("averaged weights: no update yet; call update() before swapping them in")
        mixed = []
        for i, name in enumerate(self.names):
            src, dst = self._sources[i], self.shadow[name]
            if src.device == dst.device and src.dtype == dst.dtype:
                _xor_swap(src.detach(), dst)
            else:
                mixed.append(i)
        if mixed:
            if not self._swapped:
                self._stash = [
                    self._sources[i].detach().to(self.shadow[self.names[i]].device, copy=True) for i in mixed
                ]
                for i in mixed:
                    self._sources[i].detach().copy_(self.shadow[self.names[i]])
            else:
                assert self._stash is not None
                for i, raw in zip(mixed, self._stash):
                    self._sources[i].detach().copy_(raw)
                self._stash = None
        self._swapped = not self._swapped

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Context in which the model holds the averaged weights; the raw ones come back on exit."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Copy the averaged weights into `model` (the tracked model or one with the same names and shapes)."""
        self._check_not_swapped("copy_to")
        targets = model_tensors(model)
        for name in self.names:
            if name not in targets:
                raise KeelError(f"copy_to: model has no tensor {name!r} that the average holds")
            target, shadow = targets[name], self.shadow[name]
            if target.shape != shadow.shape:
                raise KeelError(
                    f"copy_to: tensor {name!r} has shape {list(target.shape)} in the model, "
                    f"{list(shadow.shape)} in the average"
                )
            target.detach().copy_(shadow)

    def averaged_state_dict(self, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """The averaged weights by name (CPU tensors), optionally cast to `dtype` (floating tensors only)."""
        self._check_not_swapped("averaged_state_dict")
        dtype = as_dtype(dtype)
        out = {}
        for name, tensor in self.shadow.items():
            tensor = tensor.detach().to("cpu")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[name] = tensor.contiguous()
        return out

    def export(self, path, dtype: torch.dtype | str | None = None, metadata: dict[str, str] | None = None) -> None:
        """Write the averaged weights to a safetensors file (atomically)."""
        from keel.safetensors_io import write_safetensors

        meta = {"keel_average": type(self).__name__, "num_updates": str(self.num_updates)}
        meta.update(metadata or {})
        write_safetensors(path, self.averaged_state_dict(dtype), metadata=meta)

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The state to checkpoint: the update count and the shadow tensors (plain containers, tensors only)."""
        self._check_not_swapped("state_dict")
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the update count and the shadow; names and shapes must match the tracked model."""
        self._check_not_swapped("load_state_dict")
        if "num_updates" not in state:
            raise KeelError("averaging state: key 'num_updates' is missing")
        shadow = state.get("shadow")
        if shadow is not None:
            missing = [n for n in self.names if n not in shadow]
            extra = [n for n in shadow if n not in self.shadow]
            if missing or extra:
                which = f"tensor {missing[0]!r} is missing" if missing else f"tensor {extra[0]!r} is unexpected"
                raise KeelError(f"averaging state: {which}; the state does not belong to this model")
            for name, tensor in shadow.items():
                if tuple(tensor.shape) != tuple(self.shadow[name].shape):
                    raise KeelError(
                        f"averaging state: tensor {name!r} has shape {list(tensor.shape)}, "
                        f"expected {list(self.shadow[name].shape)}"
                    )
                self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])

    def _check_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"{type(self).__name__}.{what}: the averaged weights are swapped in; swap back first")


def _xor_swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the contents of two tensors of the same dtype in place, bit for bit, without a temporary."""
    if a.shape != b.shape:
        raise KeelError(f"swap: shapes differ, {list(a.shape)} and {list(b.shape)}")
    if a.dtype == torch.bool:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    elif a.is_floating_point() or a.is_complex():
        int_dtype = _SAME_WIDTH_INT[a.element_size()] if not a.is_complex() else None
        if int_dtype is None:
            tmp = a.clone()
            a.copy_(b)
            b.copy_(tmp)
            return
        a, b = a.view(int_dtype), b.view(int_dtype)
    a.bitwise_xor_(b)
    b.bitwise_xor_(a)
    a.bitwise_xor_(b)
