"""Mixed precision policy: autocast for the forward pass and a dynamic loss scaler for fp16.

Weights, gradients and optimizer state stay in float32; only the operations autocast selects run in
bf16/fp16. Micikevicius et al. (2018), "Mixed Precision Training". `precision: auto` (the default) is bf16 on a
CUDA device with native bf16 (compute capability 8.0 and later: A100, H100, L4, RTX 30xx ...), fp16 with the loss
scaler on older CUDA devices (V100, T4), fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from keel.errors import KeelError
from keel.grad.finite import all_ranks_agree

PrecisionMode = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(mode: str, device: torch.device | str) -> tuple[str, str]:
    """The precision `mode` means on `device` ("auto" decided; others kept), and why, for the run banner."""
    device = torch.device(device)
    if mode != "auto":
        return mode, "given"
    if device.type != "cuda":
        return "fp32", f"auto: fp32 on {device.type}"
    try:
        capability = torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError):  # no CUDA here (a config checked away from its GPU): assume a current one
        return "bf16", "auto: bf16 (CUDA is not available here to ask the device)"
    if capability >= (8, 0):
        return "bf16", f"auto: bf16 autocast on a CUDA device with bf16 (compute capability {capability[0]}.{capability[1]})"
    return "fp16", (f"auto: fp16 autocast with loss scaling on a CUDA device without bf16 (compute capability "
                    f"{capability[0]}.{capability[1]})")


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 training.

    The loss is multiplied by `scale` before backward so small gradients do not flush to zero in fp16;
    gradients are divided by `scale` before clipping and the optimizer step. If any gradient is inf/NaN
    the update is skipped and `scale <- scale * backoff_factor`; after `growth_interval` consecutive
    finite updates `scale <- scale * growth_factor`. Micikevicius et al. (2018), Section 3.2; the same
    defaults as `torch.amp.GradScaler`. Its state is plain numbers (safe for `torch.load(weights_only=True)`).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 2.0**-24,
    ):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise KeelError(
                f"DynamicLossScaler: init_scale={init_scale}, growth_factor={growth_factor}, "
                f"backoff_factor={backoff_factor}, growth_interval={growth_interval}; allowed: init_scale > 0, "
                "growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1"
            )
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.growth_tracker = 0  # consecutive finite updates since the last change of scale
        self.found_inf: bool | None = None  # set by unscale_, consumed by update

    def unscale_(self, parameters) -> bool:
        """Divide all gradients by `scale` in place; return whether all of them are finite (agreed by all ranks)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        found = []
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in by_device.items():
            flag = torch.zeros(1, device=device)
            inv = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
            found.append(flag.cpu())
        any_inf = bool(torch.cat(found).any()) if found else False
        finite = all_ranks_agree(not any_inf)
        self.found_inf = not finite
        return finite

    def update(self) -> None:
        """Back off after an overflow, grow after `growth_interval` finite updates. Call once per update attempt."""
        if self.found_inf is None:
            return
        if self.found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker >= self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0
        self.found_inf = None

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "growth_tracker": self.growth_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.growth_tracker = int(state.get("growth_tracker", 0))
        self.found_inf = None


class Precision:
    """Autocast and loss scaling for one training run: `precision: auto | fp32 | bf16 | fp16` (config `precision`).

    One update reads:

        with precision.autocast():
            loss = model(x, y)
        precision.scale(loss).backward()
        precision.unscale_(optimizer)          # before clipping
        clipper(model.parameters(), step)
        if precision.step(optimizer): ...      # False: fp16 overflow, update skipped
        precision.update()

    fp32 does nothing; bf16 autocasts without scaling (bf16 has fp32's exponent range); fp16 autocasts and
    uses a `DynamicLossScaler`. Parameters and optimizer state are never cast.
    """

    def __init__(self, mode: PrecisionMode = "fp32", device: torch.device | str = "cpu", **scaler_options):
        if mode not in _DTYPES and mode != "auto":
            raise KeelError(f"precision: {mode!r} is not a precision; allowed: auto, {', '.join(_DTYPES)}")
        self.device = torch.device(device)
        self.mode, self.reason = resolve_precision(mode, self.device)  # auto: the mode chosen for the device
        self.dtype = _DTYPES[self.mode]
        self.scaler = DynamicLossScaler(**scaler_options) if self.mode == "fp16" else None
        self._unscaled = False

    def autocast(self):
        """Context manager for the forward pass (and loss): torch.autocast in bf16/fp16, a no-op in fp32."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: loss * scale with fp16, the loss itself otherwise."""
        return loss * self.scaler.scale if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16) and record overflow; call before clipping. Idempotent per update."""
        if self.scaler is None or self._unscaled:
            return
        self.scaler.unscale_(p for group in optimizer.param_groups for p in group["params"])
        self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply `optimizer.step()` unless the fp16 gradients overflowed; return whether the update was applied."""
        if self.scaler is not None:
            self.unscale_(optimizer)
            if self.scaler.found_inf:
                return False
        optimizer.step()
        return True

    def update(self) -> None:
        """Adjust the loss scale after an update attempt (fp16); call once per attempt, applied or skipped."""
        if self.scaler is not None:
            self.scaler.update()
        self._unscaled = False

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


def _tf32_now() -> tuple[str, object]:
    """Which of torch's two TF32 switches for CUDA matmuls is in use, and its value (reading the legacy one after
    the new one was set is an error in torch >= 2.9, and the reverse is not)."""
    matmul = torch.backends.cuda.matmul
    try:
        return "legacy", matmul.allow_tf32
    except RuntimeError:
        return "new", matmul.fp32_precision


def _set_tf32(api: str, value: object) -> None:
    if api == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = bool(value)
    else:
        torch.backends.cuda.matmul.fp32_precision = value


@contextlib.contextmanager
def cuda_tf32(enabled: bool):
    """float32 matrix products on CUDA run on TF32 tensor cores (`enabled`) or in full float32 inside the block;
    the previous setting is restored after it. Affects only CUDA (CPU products are never TF32)."""
    api, before = _tf32_now()
    _set_tf32(api, enabled if api == "legacy" else ("tf32" if enabled else "ieee"))
    try:
        yield
    finally:
        _set_tf32(api, before)
