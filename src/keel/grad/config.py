"""Typed config for training stability: keys `clip`, `nonfinite` and `spike`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keel.errors import KeelError


class ClipConfig(BaseModel):
    """Gradient clipping (config key `clip`).

    The unclipped global L2 norm is always computed and logged (`grad_norm`), whatever the mode.
    With a loss scaler (fp16) the gradients are unscaled before clipping.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["norm", "value", "agc", "percentile", "none"] = Field(
        "norm",
        description=(
            "norm: scale all gradients by min(1, max_norm / ||g||) (Pascanu et al. 2013); "
            "value: clamp every element to [-max_value, max_value]; "
            "agc: adaptive gradient clipping, unit-wise ||G|| <= clipping * max(||W||, eps) (Brock et al. 2021); "
            "percentile: clip by global norm at the `percentile`-th percentile of the unclipped norms of the "
            "last `window` updates, after `calibration_steps` updates without clipping (Deep Learning Tuning "
            "Playbook); none: only measure the norm."
        ),
    )
    max_norm: float = Field(1.0, gt=0, description="Threshold on the global L2 norm (mode 'norm').")
    max_value: float = Field(1.0, gt=0, description="Bound on each gradient element's magnitude (mode 'value').")
    percentile: float = Field(
        90.0, gt=0, le=100, description="Percentile of recent unclipped norms used as threshold (mode 'percentile')."
    )
    window: int = Field(1000, ge=1, description="Number of recent unclipped norms kept (mode 'percentile').")
    calibration_steps: int = Field(
        100,
        ge=1,
        description="Updates observed (norms recorded, nothing clipped) before percentile clipping starts.",
    )
    clipping: float = Field(
        0.01, gt=0, description="AGC ratio lambda: largest allowed ||G_unit|| / max(||W_unit||, eps) (mode 'agc')."
    )
    eps: float = Field(1e-3, gt=0, description="AGC floor on the unit weight norm, so zero-initialised units can move.")
    start_after_warmup: bool = Field(
        False,
        description=(
            "Clip only from step == warmup_steps on (step = updates already applied, so the first update after "
            "warmup is clipped). Norms are still measured and logged during warmup."
        ),
    )

    @model_validator(mode="after")
    def _calibration_fits_window(self) -> "ClipConfig":
        if self.mode == "percentile" and self.calibration_steps > self.window:
            raise KeelError(
                f"clip.calibration_steps: {self.calibration_steps} is larger than clip.window: {self.window}; "
                "allowed: calibration_steps <= window"
            )
        return self


class NonFiniteConfig(BaseModel):
    """Non-finite guard (config key `nonfinite`): a NaN/inf loss or gradient skips the update.

    A skipped update changes nothing: parameters, optimizer state, schedule position, EMA and the step
    counter stay as they were; the skip is counted (`skipped` in metrics records). Every data-parallel rank
    takes the same decision.
    """

    model_config = ConfigDict(extra="forbid")

    max_consecutive_skips: int = Field(
        10,
        ge=1,
        description=(
            "Stop the run with an error after this many consecutive skipped updates; the last good checkpoint "
            "is kept. fp16 loss-scale overflows with a finite loss do not count while the scale is above 1."
        ),
    )


class SpikeConfig(BaseModel):
    """Loss-spike rollback (config key `spike`), in the manner of PaLM (Chowdhery et al. 2022, Section 5.1).

    A loss l is a spike when l > m + max(factor * 1.4826 * MAD, min_rise * |m|), with m and MAD the median and
    median absolute deviation of the last `window` training losses. On a spike the run reloads the newest
    checkpoint written before it, skips the batches from that checkpoint up to and including the spiking
    one (plus `skip_batches` more), and multiplies the learning rate by `lr_factor`.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Detect spikes and roll back; when false nothing is checked.")
    window: int = Field(100, ge=1, description="Number of recent training losses in the running statistic.")
    factor: float = Field(6.0, gt=0, description="Robust z-score above the median that counts as a spike.")
    min_history: int = Field(20, ge=1, description="Losses seen before detection starts.")
    min_rise: float = Field(
        0.05, ge=0, description="Smallest rise over the median, relative to |median|, that counts as a spike."
    )
    skip_batches: int = Field(
        0, ge=0, description="Extra batches skipped after the spiking one (PaLM skipped about 200-500 in all)."
    )
    lr_factor: float = Field(
        1.0, gt=0, le=1, description="Multiply the learning rate by this after each rollback (1.0: unchanged)."
    )
    max_rollbacks: int = Field(5, ge=1, description="Stop the run with an error after this many rollbacks.")

    @model_validator(mode="after")
    def _history_fits_window(self) -> "SpikeConfig":
        if self.min_history > self.window:
            raise KeelError(
                f"spike.min_history: {self.min_history} is larger than spike.window: {self.window}; "
                "allowed: min_history <= window"
            )
        return self
