"""Optimizers: a registry over torch's update rules and keel's own (Lion, AdEMAMix, SOAP, SGD-HD, Adam-HD), and param-group helpers.

`create(name, model_or_params, lr, **hparams)` builds any registered optimizer; `names()` lists them;
`from_config(spec, model)` and `check_config(spec)` serve the trainer's `optimizer:` config section.
"""

from keel.optim import builtin as _builtin  # noqa: F401  (registers torch's optimizers)
from keel.optim.ademamix import AdEMAMix
from keel.optim.hypergradient import SGDHD, AdamHD
from keel.optim.lion import Lion
from keel.optim.muon import MuonWithAdamW
from keel.optim.param_groups import (
    NO_DECAY_DEFAULT,
    build_param_groups,
    freeze,
    layer_depths,
    parameter_categories,
    unfreeze,
)
from keel.optim.registry import (OptimizerConfig, OptimizerSpec, check_config, chosen_kernels, create, from_config, get,
                                 names, register)
from keel.optim.soap import SOAP

__all__ = [
    "NO_DECAY_DEFAULT",
    "SGDHD",
    "SOAP",
    "AdamHD",
    "AdEMAMix",
    "Lion",
    "MuonWithAdamW",
    "OptimizerConfig",
    "OptimizerSpec",
    "build_param_groups",
    "check_config",
    "chosen_kernels",
    "create",
    "freeze",
    "from_config",
    "get",
    "layer_depths",
    "names",
    "parameter_categories",
    "register",
    "unfreeze",
]
