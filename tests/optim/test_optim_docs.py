"""The runnable examples in docs/optimizers.md run as written, and its config examples pass check_config."""

import re
from pathlib import Path

import pytest
import torch

import keel.optim
from keel.config import load_yaml, validate

DOC = Path(__file__).resolve().parents[2] / "docs" / "optimizers.md"
TEXT = DOC.read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", TEXT, re.S)
CONFIGS = re.findall(r"```yaml\n(.*?)```", TEXT, re.S)


def test_the_doc_has_examples():
    assert len(EXAMPLES) >= 4 and len(CONFIGS) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index):
    if "muon" in EXAMPLES[index] and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    exec(compile(EXAMPLES[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc_example__"})


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_config_example_is_valid(index):
    raw = load_yaml(CONFIGS[index])
    keel.optim.check_config(raw["optimizer"])
    validate(raw)  # and the whole run config accepts it


def test_every_registered_name_is_documented():
    for name in keel.optim.names():
        assert f"| `{name}` |" in TEXT
