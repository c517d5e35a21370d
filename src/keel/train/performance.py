"""How fast a run goes, and the settings that make it fast: the GPU's peak, model FLOPs utilisation (MFU), and
whether `compile: auto` compiles.

MFU (Chowdhery et al. 2022, PaLM, Appendix B) = model FLOPs per token x tokens per second / peak FLOP/s. The model
FLOPs per token come from the task (`Task.flops_per_token`: 6N plus attention for keel's GPT, None where unknown);
the peak from `mfu_peak_tflops`, else from `PEAK_TFLOPS`, the dense bf16 tensor-core peak of known GPUs as their
datasheets give it (fp16 for GPUs without bf16). A run's MFU is against the bf16 peak whatever its precision (an
fp32 run shows how far it is from what the GPU could do).
"""

from __future__ import annotations

import re
import time

import torch

__all__ = [
    "COMPILE_AUTO_MIN_SECONDS",
    "EAGER_MFU",
    "PEAK_TFLOPS",
    "MfuMeter",
    "choose_compile",
    "mfu",
    "peak_tflops",
    "table_peak",
]

#: Dense bf16 (fp16 where the GPU has no bf16) tensor-core peaks in TFLOP/s, by a word of the device name as
#: torch.cuda.get_device_name gives it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4"); the first
#: match wins, so specific names come before general ones. GPUs not listed need `mfu_peak_tflops`.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX A6000", 155.0),
    ("V100", 125.0),
    ("T4", 65.0),
]

#: `compile: auto` compiles on CUDA when the run's estimated eager training time reaches this many seconds.
COMPILE_AUTO_MIN_SECONDS = 600.0
#: The MFU assumed for an eager step in that estimate (keel's GPT at GPT-2-small shapes: 0.32 on an H200).
EAGER_MFU = 0.3


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """The peak TFLOP/s MFU is measured against: `given` (config `mfu_peak_tflops`), else the table's entry for a
    CUDA device's name, else None (unknown: no MFU)."""
    if given is not None:
        return float(given)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return table_peak(torch.cuda.get_device_name(device))


def table_peak(name: str) -> float | None:
    """`PEAK_TFLOPS`' entry for a device name (whole words: "A10" is not the "A100" or the "A10G"), or None."""
    for key, peak in PEAK_TFLOPS:
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", name, flags=re.IGNORECASE):
            return peak
    return None


def choose_compile(choice: bool | str, device: torch.device, flops_per_token: float | None,
                   tokens_per_step: int, steps: int, peak: float | None) -> tuple[bool, str]:
    """Whether to torch.compile the model, and why (for the run banner).

    `compile: true` / `false` are kept. `auto` compiles on CUDA when the run is long enough to repay the compile
    (up to a minute or two for a GPT-2-sized model, and seconds with torch's on-disk cache; the compiled step of
    keel's GPT is about 1.2x faster): when the estimated eager training time, model FLOPs x tokens /
    (`EAGER_MFU` x peak), reaches `COMPILE_AUTO_MIN_SECONDS` (10 minutes, of which the ~17% a compiled step saves
    is 100 s). Never on the CPU, or where the model's FLOPs or the GPU's peak are unknown.
    """
    if isinstance(choice, bool):
        return choice, "compile: true" if choice else "compile: false"
    if device.type != "cuda":
        return False, "auto: not a CUDA run"
    if flops_per_token is None or peak is None:
        missing = "the model's FLOPs per token" if flops_per_token is None else "this GPU's peak (mfu_peak_tflops)"
        return False, f"auto: {missing} unknown, so the run's length cannot be weighed against the compile time"
    seconds = flops_per_token * tokens_per_step * steps / (EAGER_MFU * peak * 1e12)
    if seconds >= COMPILE_AUTO_MIN_SECONDS:
        return True, f"auto: about {seconds / 60:.0f} min of eager training repays the compile"
    return False, (f"auto: about {seconds:.0f} s of eager training, under the {COMPILE_AUTO_MIN_SECONDS:.0f} s that "
                   "repay a compile")


class MfuMeter:
    """MFU over the training seconds between two step records (evaluations and checkpoints excluded).

    `start_step()` at the top of each step, `end_step(tokens)` when its update is counted, `read(flops_per_token)`
    at a record: the MFU of the steps since the last read, or None when the peak or the FLOPs are unknown."""

    def __init__(self, peak: float | None, world_size: int = 1) -> None:
        self.peak, self.world_size = peak, world_size
        self.seconds = 0.0
        self.tokens = 0
        self._started: float | None = None

    def start_step(self) -> None:
        self._started = time.perf_counter()

    def end_step(self, tokens: int) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.tokens += tokens
            self._started = None

    def read(self, flops_per_token: float | None) -> float | None:
        seconds, tokens = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return mfu(flops_per_token, tokens, seconds, self.peak, self.world_size)


def mfu(flops_per_token: float | None, tokens: int, seconds: float, peak: float | None,
        world_size: int = 1) -> float | None:
    """flops_per_token x tokens / seconds / (peak TFLOP/s x 1e12 x world_size); None if anything is unknown."""
    if flops_per_token is None or peak is None or seconds <= 0 or tokens <= 0:
        return None
    return flops_per_token * tokens / seconds / (peak * 1e12 * world_size)
