"""Named recipes: ``recipe: baseline`` and ``recipe: fast`` in a run config fill in the keys that make a recipe.

A recipe is a set of config values (optimizer, schedule, clipping, techniques). The keys a config gives itself
win, key by key: ``optimizer.lr`` refines the recipe's optimizer, while another ``optimizer.name`` replaces it
(as with keel's default recipe); a technique block (``ema:``, ``seq_warmup:``) given in the config is merged over
the recipe's. ``config.yaml`` records the recipe's name and every value it resolved to, so a run stays
reproducible if a recipe is changed in a later version.

- ``baseline``: the GPT training loop's recipe (AdamW with betas (0.9, 0.95) and decoupled weight decay 0.1,
  linear warmup over 5% of the run, cosine decay to a tenth of the peak LR, clipping the global gradient norm at
  1.0): keel's defaults, written out.
- ``fast``: the most robust winner of ``benchmarks/bench_recipes.py`` (see the ``recipes`` section of
  ``benchmarks/RESULTS.md`` for the measured ratio and its conditions).
"""

from __future__ import annotations

import copy
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {
        "optimizer": {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"name": "cosine", "warmup": "5%"},
        "clip": {"max_norm": 1.0},
    },
    "fast": {
        "optimizer": {"name": "adamw", "lr": 4e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"name": "wsd", "warmup_steps": "5%", "decay_steps": "20%", "shape": "1-sqrt"},
        "clip": {"max_norm": 1.0},
    },
}
NAMED_BLOCKS = ("optimizer", "schedule")  # blocks with a name: another name replaces the recipe's block


def apply_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the values of its ``recipe`` filled in under the keys it gives (unchanged without a known
    recipe: an unknown name is reported by the ``recipe`` field's validation)."""
    name = raw.get("recipe")
    if not isinstance(name, str) or name not in RECIPES:
        return raw
    merged = dict(raw)
    for key, value in RECIPES[name].items():
        given = raw.get(key)
        if given is None:
            merged[key] = copy.deepcopy(value)
        elif isinstance(given, dict) and isinstance(value, dict):
            if key in NAMED_BLOCKS and given.get("name", value.get("name")) != value.get("name"):
                continue  # another optimizer or schedule: the config's block alone
            merged[key] = {**copy.deepcopy(value), **given}
    return merged
