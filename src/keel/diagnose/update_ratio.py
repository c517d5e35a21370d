"""Update-to-weight ratios, ``||ΔW|| / ||W||`` per weight tensor: the unit and the trainer technique ``diagnostics``.

The training-dynamics notes (Karpathy, "Building makemore" part 3) watch the ratio of each update to the weight it
updates: around ``1e-3`` is healthy; far below, that layer learns too slowly (LR too low for it); far above, the
update rewrites the weight each step (LR too high). Only weights with at least two dimensions are measured (linear,
convolution and embedding matrices), as in the notes: biases and norm gains start at 0 or 1 and their ratio means
something else.

``diagnostics.update_ratio_every: N`` (off by default) measures every N-th update: the weights are copied in
``on_step_start`` of that step and compared in ``on_step_end``, and one record of kind ``diagnostic`` is logged::

    {"kind": "diagnostic", "step": 40, "diagnostic": "update_ratio",
     "ratios": {"blocks.0.attn.qkv.weight": 1.1e-3, ...}}

``step`` is the update measured (keel's step: 0 for the first). A skipped update logs nothing. The cost per
measured step is one copy of the weights and two fused norms (``benchmarks/bench_diagnostics.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field

from keel.techniques import Callback, register_technique

RECORD_TYPE = "update_ratio"  # the ``diagnostic`` key of update-ratio records
#: Healthy band of the ratio around the notes' 1e-3 (a decade either side).
HEALTHY_RATIO = (1e-4, 1e-2)


class DiagnosticsConfig(BaseModel):
    """Measurements the trainer logs for ``keel diagnose`` and ``keel report`` (config key `diagnostics`)."""

    model_config = ConfigDict(extra="forbid")

    update_ratio_every: int | None = Field(
        None, ge=1, description="Log ||ΔW||/||W|| of every weight matrix every this many updates (null: off).",
    )


class UpdateRatio:
    """``snapshot(named)`` before an update, ``ratios(named)`` after it: ``{name: ||W_new - W_old|| / ||W_new||}``.

    ``named`` is ``model.named_parameters()``; parameters with fewer than two dimensions, without gradients, or
    with zero norm are left out. Works in a plain PyTorch loop::

        unit = UpdateRatio()
        unit.snapshot(model.named_parameters())
        optimizer.step()
        print(unit.ratios(model.named_parameters()))
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._buffers: list[torch.Tensor] = []
        self._armed = False

    @staticmethod
    def _weights(named: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple[list[str], list[torch.Tensor]]:
        names, tensors = [], []
        for name, param in named:
            if param.requires_grad and param.dim() >= 2:
                names.append(name.removeprefix("module."))  # a DistributedDataParallel wrapper's prefix
                tensors.append(param.detach())
        return names, tensors

    @torch.no_grad()
    def snapshot(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        names, tensors = self._weights(named)
        if names == self._names and len(self._buffers) == len(tensors):
            torch._foreach_copy_(self._buffers, tensors)  # reuse the buffers: no allocation per measured step
        else:
            self._names, self._buffers = names, [t.clone() for t in tensors]
        self._armed = bool(tensors)

    @property
    def armed(self) -> bool:
        return self._armed

    @torch.no_grad()
    def ratios(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> dict[str, float]:
        names, after = self._weights(named)
        if not self._armed or names != self._names or not after:
            self._armed = False
            return {}
        self._armed = False
        torch._foreach_sub_(self._buffers, after)  # W_old - W_new, in place: its norm is ||ΔW||
        norms = torch.stack(torch._foreach_norm([*self._buffers, *after])).tolist()  # one reduction, one sync
        count = len(after)
        return {name: update / weight for name, update, weight in zip(names, norms[:count], norms[count:])
                if weight > 0}


class UpdateRatioCallback(Callback):
    """Measures ``||ΔW||/||W||`` on every ``every``-th update and logs it (see the module docstring)."""

    name = "diagnostics"

    def __init__(self, every: int):
        self.every = every
        self.unit = UpdateRatio()
        self._step: int | None = None

    def on_run_start(self, trainer) -> None:
        self.unit, self._step = UpdateRatio(), None  # a rollback reloads the weights: a snapshot is stale

    def on_step_start(self, trainer) -> None:
        step = trainer.state.step
        if step % self.every == 0:
            self.unit.snapshot(trainer.model.named_parameters())
            self._step = step
        else:
            self._step = None

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step - 1  # the update just applied
        if self._step != step or not self.unit.armed:
            return
        ratios = self.unit.ratios(trainer.model.named_parameters())
        if ratios:
            trainer.log({"kind": "diagnostic", "step": step, "diagnostic": RECORD_TYPE, "ratios": ratios})


def _make(block: DiagnosticsConfig) -> Callback | None:
    return UpdateRatioCallback(block.update_ratio_every) if block.update_ratio_every else None


register_technique("diagnostics", DiagnosticsConfig, _make)
