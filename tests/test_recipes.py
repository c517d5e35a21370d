"""``recipe: baseline | fast``: a named recipe fills in its keys; the config's own keys win, key by key."""

from collections.abc import Mapping

import pytest
import yaml

from keel import recipes
from keel.config import dump_config, load_config, validate
from keel.recipes import RECIPES, apply_recipe


def _recipe_part(config):
    return {"optimizer": config.optimizer, "schedule": config.schedule, "clip": config.clip.model_dump()}


def test_the_language_model_defaults_to_fast_every_other_task_to_baseline():
    assert validate({}).recipe == "fast"
    assert _recipe_part(validate({})) == _recipe_part(validate({"recipe": "fast"}))
    assert validate({}).technique("seq_warmup").enabled == "auto"
    for task in ("digits", "user_task:make"):
        assert validate({"task": task}).recipe == "baseline"
    # the baseline recipe is what keel's defaults were: AdamW (0.9, 0.95), wd 0.1, cosine to a tenth, clip 1.0
    baseline = validate({"recipe": "baseline"})
    assert baseline.optimizer == {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}
    assert baseline.schedule == {"name": "cosine", "warmup": "5%", "min_lr": 2e-4} and baseline.clip.max_norm == 1.0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_sets_its_values(name):
    config = validate({"recipe": name})
    for key, value in RECIPES[name].items():
        resolved = getattr(config, key)
        resolved = dict(resolved) if isinstance(resolved, Mapping) else resolved.model_dump()
        assert {k: resolved[k] for k in value} == value, key


def test_the_configs_keys_win_key_by_key():
    fast = RECIPES["fast"]
    config = validate({"recipe": "fast", "optimizer": {"lr": 1.5e-3}, "clip": {"max_norm": 0.5}})
    assert config.optimizer == {**fast["optimizer"], "lr": 1.5e-3}  # refined, the rest from the recipe
    assert config.clip.max_norm == 0.5
    assert config.schedule["name"] == fast["schedule"]["name"]


def test_another_optimizer_or_schedule_name_replaces_the_block():
    config = validate({"recipe": "fast", "optimizer": {"name": "lion", "lr": 1e-4}, "schedule": {"name": "constant"}})
    assert config.optimizer == {"name": "lion", "lr": 1e-4}
    assert config.schedule == {"name": "constant"}


def test_technique_blocks_merge_over_the_recipes(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "fast", {**RECIPES["fast"], "ema": {"enabled": True, "half_life": "5%"}})
    config = validate({"recipe": "fast", "ema": {"half_life": "10%"}})
    assert config.technique("ema").enabled and config.technique("ema").half_life == "10%"


def test_apply_recipe_names_the_recipe_it_used():
    assert apply_recipe({"optimizer": {"lr": 1e-3}})["recipe"] == "fast"
    assert apply_recipe({"task": "digits"})["recipe"] == "baseline"
    assert apply_recipe({"recipe": "nonsense"}) == {"recipe": "nonsense"}  # the field's validation reports it


def test_seq_warmup_auto_is_off_where_batches_are_not_sequences_and_fits_a_short_context(tmp_path, tiny_overrides):
    from keel.train import train

    digits = load_config(None, ["task=digits", "recipe=fast", "max_steps=3", "device=cpu", "threads=1"])
    result = train(digits, run_dir=tmp_path / "digits", quiet=True)
    assert not [r for r in result["history"] if "seq_len" in r]  # off: no sequences
    overrides = [o for o in tiny_overrides if not o.startswith(("recipe", "optimizer.", "schedule."))]
    lm = load_config(None, [*overrides, "recipe=fast", "model.block_size=16", "max_steps=10", "sample.tokens=0"])
    lengths = [r["seq_len"] for r in train(lm, run_dir=tmp_path / "lm", quiet=True)["history"] if "seq_len" in r]
    assert lengths[0] == 16 and set(lengths) == {16}  # start 32 capped at the 16-token context


def test_config_yaml_records_the_recipe_and_its_values(tmp_path):
    config = load_config(None, ["recipe=fast", "optimizer.lr=3e-3"])
    text = dump_config(config)
    saved = yaml.safe_load(text)
    assert saved["recipe"] == "fast" and saved["optimizer"]["lr"] == 3e-3
    assert saved["schedule"]["name"] == RECIPES["fast"]["schedule"]["name"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(str(path), []) == config  # reloading resolves to the same run


def test_a_run_trains_with_the_fast_recipe(tmp_path, tiny_overrides):
    from keel.train import train

    overrides = [o for o in tiny_overrides if not o.startswith(("optimizer.", "schedule."))]
    config = load_config(None, [*overrides, "recipe=fast", "max_steps=40", "sample.tokens=0"])
    result = train(config, run_dir=tmp_path / "run", quiet=True)
    assert result["step"] == 40 and result["val_loss"] < 4.0  # below the uniform byte model's ln(256) = 5.55
    lrs = [r["lr"] for r in result["history"] if r.get("kind") == "step"]
    assert max(lrs) == pytest.approx(RECIPES["fast"]["optimizer"]["lr"])


def test_the_examples_of_docs_recipes_validate():
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
    commands = [line.split("#")[0] for lang, body in blocks if lang == "bash" for line in body.splitlines()
                if line.startswith("keel train")]
    assert len(commands) >= 3
    for command in commands:
        load_config(None, shlex.split(command)[2:])
    configs = [yaml.safe_load(body) for lang, body in blocks if lang == "yaml"]
    assert configs and all(validate(raw).recipe == raw["recipe"] for raw in configs)


def test_a_key_in_another_spelling_replaces_the_recipes():
    """Under the default recipe (fast: wsd with decay_steps 20%), a schedule written with the short spelling
    'decay' is the user's: no 'given twice' error, and the user's value is the one used."""
    config = validate({"schedule": {"name": "wsd", "warmup": 4, "decay": 4}})
    assert config.recipe == "fast"
    assert config.schedule == {"name": "wsd", "warmup": 4, "decay": 4, "shape": "1-sqrt"}


def test_the_recipe_follows_a_task_given_after_loading():
    config = load_config(None, ["max_steps=10", "optimizer.lr=1e-2"])
    assert config.recipe == "fast" and config.optimizer["name"] == "muon"  # task lm, so far
    python = config.for_task("python")
    assert python.recipe == "baseline" and python.optimizer["name"] == "adamw" and python.optimizer["lr"] == 1e-2
    assert python.schedule["name"] == "cosine" and python.max_steps == 10
    kept = load_config(None, ["recipe=fast"]).for_task("python")
    assert kept.recipe == "fast"  # a recipe the config names stays


def _articles_loop_lr(t, total, warmup, peak, initial_lr=3e-5, min_lr=1e-6):
    """The GPT training loop's LR at step t (0 for the first update): a linear warmup from initial_lr that reaches
    the peak at step `warmup`, then a half cosine from the peak to min_lr over the remaining steps."""
    import math

    if t < warmup:
        return initial_lr + t * (peak - initial_lr) / warmup
    progress = (t - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_gpt_loop_is_the_articles_loop_exactly():
    from keel.grad import Clipper
    from keel.schedules import from_config, warmup_steps

    config = validate({"recipe": "gpt-loop", "task": "digits", "max_steps": 200})
    assert config.recipe == "gpt-loop" and config.optimizer["name"] == "adamw"
    schedule = from_config(config.schedule, base_lr=config.optimizer["lr"], total_steps=200)
    peak, warmup = config.optimizer["lr"], warmup_steps(schedule)
    assert warmup == 10
    for t in range(200):
        assert schedule(t) == pytest.approx(_articles_loop_lr(t, 200, warmup, peak), rel=1e-12, abs=1e-18), t
    assert schedule(0) == 3e-5  # a first update that moves the weights, unlike the baseline's warmup from 0
    clipper = Clipper(config.clip, warmup_steps=warmup)
    assert [clipper.active(t) for t in (0, 9, 10, 199)] == [False, False, True, True]
    # the baseline differs in exactly these three ways
    baseline = validate({"recipe": "baseline", "task": "digits", "max_steps": 200})
    base_schedule = from_config(baseline.schedule, base_lr=baseline.optimizer["lr"], total_steps=200)
    assert base_schedule(0) == 0.0 and base_schedule(199) > 2e-4 * 0.99 and Clipper(baseline.clip).active(0)
    assert baseline.optimizer == config.optimizer


def test_a_gpt_loop_run_clips_only_after_warmup(tmp_path):
    from keel.train import train

    config = load_config(None, ["task=digits", "recipe=gpt-loop", "device=cpu", "threads=1", "max_steps=40",
                                "eval_interval=40",
                                "clip.max_norm=1e-6", f"out_dir={tmp_path / 'r'}"])
    steps = [r for r in train(config, quiet=True)["history"] if "grad_norm" in r]
    assert steps[0]["lr"] == 3e-5
    assert [r["clipped"] for r in steps] == [False, False] + [True] * 38  # warmup: 5% of 40 steps


def test_a_gpt_loop_run_in_epochs_stops_at_the_epoch_and_anneals_over_it(tmp_path):
    """The GPT loop's length in epochs (docs/recipes.md: `duration: 3ep`): the run stops at the first step whose
    examples reach the epochs, and the warmup and cosine span exactly those steps, device=cpu."""
    import math

    from keel.schedules import from_config, warmup_steps
    from keel.tasks.digits import load_digits_tensors
    from keel.train import train

    config = load_config(None, ["task=digits", "recipe=gpt-loop", "duration=2ep", "data.batch_size=256", "device=cpu",
                                "threads=1", "eval_interval=1000", f"out_dir={tmp_path / 'r'}"])
    result = train(config, quiet=True)
    n_all = len(load_digits_tensors(range(10))[1])
    n_train = n_all - max(1, round(n_all * config.data.val_fraction))
    steps = [r for r in result["history"] if "grad_norm" in r]
    assert result["step"] == len(steps) == math.ceil(2 * n_train / 256)
    assert result["examples"] - 256 < 2 * n_train <= result["examples"]
    schedule = from_config(config.schedule, base_lr=config.optimizer["lr"], total_steps=len(steps))
    warmup = warmup_steps(schedule)
    for record in steps:
        t = record["step"]
        assert record["lr"] == pytest.approx(_articles_loop_lr(t, len(steps), warmup, config.optimizer["lr"]),
                                             rel=1e-9), t
