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
