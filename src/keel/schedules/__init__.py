"""Learning-rate schedules: pure functions of the step that return the absolute learning rate.

``step`` is the number of optimizer updates already applied (0 for the first update). Decays,
combinators (:func:`warmup`, :func:`join`, :func:`wrap`) and the metric-driven
:func:`reduce_on_plateau` compose freely; :func:`from_config` builds any of them from the run
config and :func:`set_lr` applies a value to every param group of a torch optimizer::

    from keel.schedules import cosine_decay, warmup, set_lr

    schedule = warmup(cosine_decay(3e-4, total_steps=900, min_lr=3e-5), steps=100)
    for step in range(1000):
        set_lr(optimizer, schedule(step))
        ...
        optimizer.step()
"""

from keel.schedules.base import Schedule, set_lr, warmup_steps
from keel.schedules.combinators import join, warmup, wrap
from keel.schedules.config import SCHEDULES, from_config, parse_spec
from keel.schedules.decays import (
    constant,
    cosine_decay,
    cosine_restarts,
    exponential_decay,
    inverse_sqrt,
    linear_decay,
    multistep_decay,
    noam,
    polynomial_decay,
    rsqrt,
    sqrt_decay,
    step_decay,
    wsd,
)
from keel.schedules.plateau import ReduceOnPlateau, reduce_on_plateau

__all__ = [
    "Schedule",
    "set_lr",
    "warmup_steps",
    "constant",
    "step_decay",
    "multistep_decay",
    "exponential_decay",
    "linear_decay",
    "cosine_decay",
    "sqrt_decay",
    "polynomial_decay",
    "inverse_sqrt",
    "noam",
    "rsqrt",
    "wsd",
    "cosine_restarts",
    "warmup",
    "join",
    "wrap",
    "reduce_on_plateau",
    "ReduceOnPlateau",
    "from_config",
    "parse_spec",
    "SCHEDULES",
]
