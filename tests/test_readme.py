"""The README's Python examples run as they are and do what the README says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_own_model_example_is_short_and_trains(tmp_path, monkeypatch, capsys):
    block = next(b for b in python_blocks() if "class Net" in b)
    assert len(block.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    accuracy = float(re.search(r"val_accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.9
    assert (tmp_path / "runs" / "circle" / "model.safetensors").is_file()


def test_own_model_example_trains_with_the_baseline_recipe_it_names(tmp_path, monkeypatch, capsys):
    """The plain-PyTorch example says 'AdamW, warmup + cosine': the recipe follows the task handed to train()
    (baseline), not the language model's default (fast, Muon), in config.yaml and in the start line."""
    import yaml

    block = next(b for b in python_blocks() if "class Net" in b)
    assert "AdamW, warmup + cosine" in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("max_steps=300", "max_steps=5"), "README.md", "exec"), {})
    recorded = yaml.safe_load((tmp_path / "runs" / "circle" / "config.yaml").read_text())
    assert recorded["task"] == "python" and recorded["recipe"] == "baseline"
    assert recorded["optimizer"]["name"] == "adamw" and recorded["optimizer"]["lr"] == 1e-2
    assert recorded["schedule"]["name"] == "cosine"
    assert "recipe: baseline (adamw, cosine, clip 1)" in capsys.readouterr().out
