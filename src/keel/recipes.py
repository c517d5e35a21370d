"""Named recipes: ``recipe: baseline``, ``recipe: gpt-loop`` and ``recipe: fast`` fill in the keys of a recipe.

Without ``recipe:``, a config gets its task's recipe (``default_recipe``): a language model (task ``lm``) trains
with ``fast``, every other task with ``baseline``.

A recipe is a set of config values (optimizer, schedule, clipping, techniques). The keys a config gives itself
win, key by key: ``optimizer.lr`` refines the recipe's optimizer, while another ``optimizer.name`` replaces it
(as with keel's default recipe); a technique block (``ema:``, ``seq_warmup:``) given in the config is merged over
the recipe's. A key the config gives in another spelling replaces the recipe's (``schedule.decay`` over the
recipe's ``decay_steps``): the config's spelling wins. The recipe is chosen once the task is known, wherever it
comes from (``task:``, a factory, a Python object handed to ``keel.train``). ``config.yaml`` records the recipe's
name and every value it resolved to, so a run stays reproducible if a recipe is changed in a later version.

- ``baseline``: keel's AdamW recipe (AdamW with betas (0.9, 0.95) and decoupled weight decay 0.1, linear warmup
  from 0 over 5% of the run, cosine decay to a tenth of the peak LR, clipping the global gradient norm at 1.0 from
  the first step): keel's default before ``fast``, and still the default of every task but ``lm``.
- ``gpt-loop``: the GPT training loop of article 003 exactly: as ``baseline``, but the warmup starts at
  ``initial_lr`` 3e-5, the cosine ends at ``min_lr`` 1e-6, and clipping starts at the end of the warmup.
- ``fast``: the most robust winner of ``benchmarks/bench_recipes.py`` (the ``recipes`` section of
  ``benchmarks/RESULTS.md`` has the measured ratios and their conditions; docs/recipes.md explains the choice):
  Muon on the hidden matrices (LR 0.02) with AdamW on embeddings, head, biases and norms (LR 2e-3), a
  warmup-stable-decay schedule (5% warmup, 1-sqrt cooldown over the last 20%), clipping at 1.0, and where the
  batches are sequences (``seq_warmup.enabled: auto``) sequence-length warmup from 32 tokens (at most the context)
  over the first 30% of the run, rows truncated.
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
    # The GPT training loop of article 003 exactly: the baseline's AdamW and peak LR (the loop reads its peak from the
    # optimizer and takes the warmup length as an argument), a linear warmup from initial_lr 3e-5 (not 0) to the
    # peak, cosine decay to min_lr 1e-6 (not a tenth of the peak), and clipping at 1.0 only from the end of the
    # warmup on (step >= warmup steps).
    "gpt-loop": {
        "optimizer": {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"name": "cosine", "warmup": "5%", "warmup_init_lr": 3e-5, "min_lr": 1e-6},
        "clip": {"max_norm": 1.0, "start_after_warmup": True},
    },
    # bench_recipes.py --budget cpu (2026-12-02): reached the tuned baseline's final loss on 3 of 3 seeds with 3.44x
    # fewer tokens [3.26, 3.72] and 2.78x less training time [2.65, 3.16]; Muon's LR and the AdamW groups' LR are
    # the ones its sweep and the baseline's chose there.
    "fast": {
        "optimizer": {"name": "muon", "lr": 2e-2, "adam_lr": 2e-3},
        "schedule": {"name": "wsd", "warmup": "5%", "decay_steps": "20%", "shape": "1-sqrt"},
        "clip": {"max_norm": 1.0},
        "seq_warmup": {"enabled": "auto", "start": 32, "duration": "30%", "keep_tokens_per_step": False},
    },
}
NAMED_BLOCKS = ("optimizer", "schedule")  # blocks with a name: another name replaces the recipe's block


def default_recipe(task: Any) -> str:
    """The recipe a config without ``recipe:`` gets: the one its task registered (``keel.task_registry``: the
    language model's ``fast``, measured to beat the tuned baseline on every seed), ``baseline`` for every other
    task, where nothing measured says otherwise."""
    from keel.task_registry import DEFAULT_RECIPE, task_spec

    spec = task_spec(task)
    return spec.recipe if spec is not None else DEFAULT_RECIPE


def apply_recipe(raw: dict[str, Any], default_task: str = "lm") -> dict[str, Any]:
    """``raw`` with the values of its ``recipe`` (or its task's default recipe; ``default_task`` when it names
    none) filled in under the keys it gives, and ``recipe`` set to the name used (unchanged for an unknown name:
    the ``recipe`` field reports it)."""
    name = raw.get("recipe")
    if name is None:
        name = default_recipe(raw.get("task", default_task))
    if not isinstance(name, str) or name not in RECIPES:
        return raw
    merged = {**raw, "recipe": name}
    for key, value in RECIPES[name].items():
        given = raw.get(key)
        if given is None:
            merged[key] = copy.deepcopy(value)
        elif isinstance(given, dict) and isinstance(value, dict):
            if key in NAMED_BLOCKS and given.get("name", value.get("name")) != value.get("name"):
                continue  # another optimizer or schedule: the config's block alone
            merged[key] = fill_in(key, value, given)
    return merged


def fill_in(block: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (a config's block) with the ``defaults`` it leaves out; a key it gives in another spelling
    (``decay`` for ``decay_steps``) replaces the default's, so the config's spelling wins."""
    spelled = {_spelling(block, k) for k in given}
    kept = {k: v for k, v in defaults.items() if _spelling(block, k) not in spelled}
    return {**copy.deepcopy(kept), **given}


def _spelling(block: str, key: str) -> str:
    """What ``key`` of ``block`` sets, whatever its spelling: a schedule's ``decay`` and ``decay_steps`` are one
    argument (``keel.schedules.config``)."""
    if block == "schedule":
        from keel.schedules.config import argument_of

        return argument_of(key)
    return key

