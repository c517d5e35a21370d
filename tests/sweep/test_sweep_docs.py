"""docs/sweep.md: its config examples validate (search spaces checked in the whole config), and every
sweep_options key is in its table."""

import importlib.util
import re
from pathlib import Path

import pytest

from keel.config import load_yaml, validate
from keel.sweep.space import SweepOptions, check_space, space_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "sweep.md"
TEXT = DOC.read_text()
CONFIGS = re.findall(r"```yaml\n(.*?)```", TEXT, re.S)


def test_the_doc_has_config_examples():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_config_example_is_valid(index):
    raw = load_yaml(CONFIGS[index])
    if "log" in raw and not all(importlib.util.find_spec(m) for m in ("mlflow", "wandb")):
        pytest.skip("the log: example needs mlflow and wandb installed")
    validate(raw)
    check_space(raw, space_of(raw))


def test_every_sweep_option_is_documented():
    for name in SweepOptions.model_fields:
        assert f"| `{name}` |" in TEXT, name
