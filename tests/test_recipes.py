"""``recipe: baseline | fast``: a named recipe fills in its keys; the config's own keys win, key by key."""

import copy

import pytest
import yaml

from keel import recipes
from keel.config import dump_config, load_config, validate
from keel.recipes import RECIPES, apply_recipe


def _recipe_part(config):
    return {"optimizer": config.optimizer, "schedule": config.schedule, "clip": config.clip.model_dump()}


def test_baseline_is_the_default_recipe_written_out():
    assert _recipe_part(validate({"recipe": "baseline"})) == _recipe_part(validate({}))
    assert validate({"recipe": "baseline"}).clip.max_norm == 1.0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_sets_its_values(name):
    config = validate({"recipe": name})
    for key, value in RECIPES[name].items():
        resolved = getattr(config, key)
        resolved = resolved if isinstance(resolved, dict) else resolved.model_dump()
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


def test_without_a_recipe_nothing_changes():
    raw = {"optimizer": {"lr": 1e-3}}
    assert apply_recipe(copy.deepcopy(raw)) == raw
    assert apply_recipe({"recipe": "nonsense"}) == {"recipe": "nonsense"}  # the field's validation reports it


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
