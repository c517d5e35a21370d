"""How much memory training keel's GPT needs, estimated from the config before anything is allocated.

The estimate counts what a training step holds at its peak, in bytes:

* parameters: ``4 P`` (fp32 weights; autocast leaves them fp32), with
  ``P = V E + B E + L (12 E^2 + 13 E) + 2 E + E V`` (biases on; ``12 E^2 + 2 E`` per block without them),
  for ``L = n_layer``, ``E = n_embd``, ``V`` the vocabulary, ``B = block_size``;
* gradients: ``4 P``;
* optimizer state: ``4 k P`` with ``k`` floats per parameter (AdamW's two moments: ``k = 2``; see
  ``OPTIMIZER_STATE_FLOATS``);
* activations kept for the backward pass of one micro-batch of ``b = batch_size`` windows of ``T = block_size``
  tokens: about ``16 E`` values per token and layer (layer-norm inputs, q, k, v, the attention output, the MLP's
  ``4 E`` hidden values before and after GELU), at ``a`` bytes each (4 in fp32, 2 under bf16/fp16 autocast), plus
  the logits, their fp32 copy and their gradient: ``a b T (16 L E + 2 E) + 12 b T V``; attention scores are not
  counted (PyTorch's fused attention does not keep them);
* batches: the ``grad_accum`` micro-batches of int64 inputs and targets the step holds, ``16 b (T + 1)`` bytes each.

Activation recomputation, averaging copies (EMA, SWA) and allocator overhead are left out, so the estimate is a
lower bound of the order of magnitude: a config it refuses cannot run; one it accepts may still be tight. The
accounting follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryEstimate", "OPTIMIZER_STATE_FLOATS", "available_memory", "estimate_gpt_training",
           "gpt_parameter_count", "format_bytes"]

#: Floats of optimizer state per parameter (a lower bound where the optimizer keeps more, e.g. SOAP's
#: preconditioners); optimizers not listed count 2, as AdamW.
OPTIMIZER_STATE_FLOATS = {"sgd": 0, "momentum": 1, "nesterov": 1, "rmsprop": 1, "adam": 2, "adamw": 2, "nadam": 2,
                          "radam": 2, "adafactor": 0, "muon": 1, "lion": 1, "ademamix": 3, "soap": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step of keel's GPT holds, by kind (see the module docstring for the formulas)."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    batches: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.batches

    def breakdown(self) -> str:
        """``parameters 203 GiB, gradients 203 GiB, optimizer state 406 GiB, activations 12 GiB, batches 2 MiB``."""
        return ", ".join(f"{name.replace('_', ' ')} {format_bytes(getattr(self, name))}"
                         for name in ("parameters", "gradients", "optimizer_state", "activations", "batches"))


def gpt_parameter_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = True) -> int:
    """Parameters of ``keel.models.GPT``: embeddings, ``n_layer`` blocks, the final norm and the untied head."""
    norm = 2 * n_embd if bias else n_embd
    block = 12 * n_embd * n_embd + 2 * norm + (9 * n_embd if bias else 0)
    return vocab_size * n_embd + block_size * n_embd + n_layer * block + norm + n_embd * vocab_size


def estimate_gpt_training(
    *,
    n_layer: int,
    n_embd: int,
    vocab_size: int,
    block_size: int,
    batch_size: int,
    grad_accum: int = 1,
    precision: str = "fp32",
    optimizer: str = "adamw",
    bias: bool = True,
) -> MemoryEstimate:
    """The memory one training step of keel's GPT needs, from its sizes alone (nothing is allocated).

    >>> estimate_gpt_training(n_layer=4, n_embd=128, vocab_size=256, block_size=128, batch_size=32).parameters
    3501056
    """
    params = gpt_parameter_count(n_layer, n_embd, vocab_size, block_size, bias)
    tokens = batch_size * block_size
    activation_bytes = 4 if precision == "fp32" else 2
    activations = activation_bytes * tokens * (16 * n_layer * n_embd + 2 * n_embd) + 12 * tokens * vocab_size
    return MemoryEstimate(
        parameters=4 * params,
        gradients=4 * params,
        optimizer_state=4 * OPTIMIZER_STATE_FLOATS.get(optimizer, 2) * params,
        activations=activations,
        batches=16 * grad_accum * batch_size * (block_size + 1),
    )


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now on ``device``: free CUDA memory for ``cuda``/``cuda:N``; for the CPU, Linux's
    MemAvailable, capped by the cgroup's limit (containers), else the physical memory. None when unknown."""
    if device.startswith("cuda"):
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    found = [value for value in (_meminfo_available(), _cgroup_room()) if value is not None]
    if found:
        return min(found)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1) minus what the cgroup uses; None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def format_bytes(count: int | float) -> str:
    """``1536`` -> ``'2 KiB'``; ``812 * 2**30`` -> ``'812 GiB'``; whole units, the largest that gives at least 1."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value, unit = float(count), units[0]
    for unit in units:
        if value < 1024 or unit == units[-1]:
            break
        value /= 1024
    if unit == "bytes":
        return f"{int(count):,} bytes"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
