"""Typed config for training stability: gradient clipping (top-level key `clip`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
            raise ValueError(
                f"clip.calibration_steps: {self.calibration_steps} is larger than clip.window: {self.window}; "
                "allowed: calibration_steps <= window"
            )
        return self
