"""Typed config blocks for weight averaging in the trainer: `ema`, `polyak`, `swa`, `snapshot`, `average`.

Each block is disabled by default; `keel.averaging.callbacks` registers each block with its trainer callback.
Lengths (`start`, `every`, `half_life`, ...) accept keel time units: 500 or "500" (steps), "2%" (share of the
run), "3ep" (epochs), "2Mtok" (tokens), "50kex" (examples), resolved to the first step at which the run's clock
reaches them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.errors import KeelError
from keel.timeunits import Time

#: A length in keel's time units, parsed when the config is read; its steps are resolved when the run starts.
Length = Time
DType = Literal["float32", "float64", "bfloat16", "float16"]


class _AveragingBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(False, description="Turn this averaging on.")
    device: str | None = Field(
        None,
        description="Device of the averaged copy, e.g. 'cpu' to keep it off the accelerator; "
        "null keeps it beside each parameter.",
    )
    dtype: DType | None = Field(
        None,
        description="Dtype of the averaged copy, e.g. 'float32' for bf16 weights; null keeps each parameter's dtype.",
    )
    include_buffers: bool = Field(
        True,
        description="Also average floating-point buffers (e.g. BatchNorm running statistics); integer buffers "
        "are copied from the model.",
    )
    evaluate: bool = Field(
        True,
        description="At each evaluation also evaluate the averaged weights (swapped in place, no third copy) "
        "and log the loss as val_loss_<name>.",
    )
    save: bool = Field(
        True, description="Write the averaged weights into every checkpoint as <name>.safetensors."
    )


class EMAConfig(_AveragingBlock):
    """Exponential moving average of the weights: shadow <- shadow - (1 - d) * (shadow - weight)."""

    decay: float = Field(
        0.9999,
        gt=0.0,
        lt=1.0,
        description="Decay d per update (fixed), or its upper bound with dynamic_decay / warmup_gamma.",
    )
    dynamic_decay: bool = Field(
        False,
        description="OpenNMT-tf's dynamic decay: at the k-th update d = min(decay, (1 + k) / (10 + k)).",
    )
    warmup_gamma: float | None = Field(
        None,
        gt=0.0,
        description="Warmup form d = min(decay, 1 - (1 + step / warmup_gamma) ** -warmup_power); "
        "set with warmup_power.",
    )
    warmup_power: float | None = Field(
        None, gt=0.0, description="Exponent of the warmup form; set with warmup_gamma (e.g. 2/3 or 3/4)."
    )
    half_life: Length | None = Field(
        None,
        description="Half-life of the average in time units (e.g. '2000', '5%', '10Mtok'); sets "
        "d = 0.5 ** (every / half_life_steps) and replaces decay.",
    )
    every: Length = Field(1, description="Update the average every this many optimizer steps.")
    start: Length = Field(0, description="First step at which the average is updated (steps before are ignored).")
    checkpoint_weights: Literal["raw", "ema"] = Field(
        "raw",
        description="Weights written to model.safetensors: 'raw' (the trained weights) or 'ema' "
        "(OpenNMT-tf's mode: the saved checkpoint holds the averaged weights; the raw ones are kept for resume).",
    )

    @model_validator(mode="after")
    def _one_decay_form(self) -> EMAConfig:
        forms = [
            name
            for name, on in (
                ("dynamic_decay", self.dynamic_decay),
                ("warmup_gamma", self.warmup_gamma is not None or self.warmup_power is not None),
                ("half_life", self.half_life is not None),
            )
            if on
        ]
        if len(forms) > 1:
            raise KeelError(f"ema: {' and '.join(forms)} are both set; allowed: at most one decay form")
        if (self.warmup_gamma is None) != (self.warmup_power is None):
            raise KeelError("ema: warmup_gamma and warmup_power must be set together")
        return self


class PolyakConfig(_AveragingBlock):
    """Polyak-Ruppert averaging: the uniform running mean of the weights from a start step on."""

    start: Length = Field(
        "50%", description="First step included in the mean (time units; e.g. '50%' averages the second half)."
    )
    every: Length = Field(1, description="Add the weights to the mean every this many optimizer steps.")


class SWAConfig(_AveragingBlock):
    """Stochastic Weight Averaging (Izmailov et al. 2018): its own LR phase, a uniform mean, BatchNorm recomputed."""

    start: Length = Field("75%", description="Step at which the SWA phase begins (time units).")
    lr: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of the SWA phase; null keeps the run's schedule.",
    )
    anneal_steps: Length = Field(
        0, description="Steps over which the LR moves from the schedule's value to lr at the phase start."
    )
    anneal_strategy: Literal["cos", "linear"] = Field("cos", description="Shape of that LR transition.")
    every: Length = Field(
        1, description="Add the weights to the mean every this many steps (the SWA cycle; e.g. '1ep')."
    )
    include_buffers: bool = Field(
        False,
        description="Also average floating-point buffers; by default they follow the model and BatchNorm "
        "statistics are recomputed (bn_update), as in torch.optim.swa_utils.",
    )
    bn_update: bool = Field(
        True,
        description="Recompute BatchNorm running statistics of the averaged model with a pass over training data "
        "before it is evaluated or saved (only if the model has BatchNorm layers).",
    )
    bn_batches: int | None = Field(
        None, gt=0, description="Batches in that pass; null uses 100 batches (or one epoch, if shorter)."
    )


class SnapshotConfig(BaseModel):
    """Snapshot ensembles (Huang et al. 2017): keep the weights at the end of each cosine-restart cycle."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Collect a snapshot at the end of each cycle.")
    cycle: Length | None = Field(
        None,
        description="Cycle length in time units; null takes the cycle of the run's cosine-restart schedule.",
    )
    cycle_mult: float = Field(
        1.0, ge=1.0, description="Each cycle is this many times longer than the previous (SGDR's T_mult)."
    )
    keep: int | None = Field(None, gt=0, description="Keep only the last this many snapshots; null keeps all.")


class CheckpointAverageConfig(BaseModel):
    """Checkpoint averaging at the end of training (OpenNMT-tf's `average_last_checkpoints`): the arithmetic mean of
    the last N checkpoints, written beside the model as `averaged.safetensors`, evaluated and reported."""

    model_config = ConfigDict(extra="forbid")

    last: int | None = Field(
        None, ge=2, description="Average the last this many checkpoints when training ends (null: off); the run "
        "keeps at least this many checkpoints (keep_last is raised to it).",
    )
    weights: str = Field(
        "model", pattern=r"^[A-Za-z0-9_\-]+$",
        description="What is averaged: 'model' (each checkpoint's model.safetensors: the raw weights, or the EMA "
        "under ema.checkpoint_weights: ema, as OpenNMT-tf averages), 'raw', or a saved average: 'ema', 'polyak', "
        "'swa'.",
    )


__all__ = ["EMAConfig", "PolyakConfig", "SWAConfig", "SnapshotConfig", "CheckpointAverageConfig", "Length"]
