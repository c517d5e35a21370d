"""docs/integrations.md: each trainer's example runs as it is (about 30 lines), and `keel diagnose` reads what it
wrote, as the page says."""

import re
from pathlib import Path

import pytest

from keel.cli.main import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def python_blocks(title: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section(title), flags=re.S)


def run_blocks(title: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(title):
        exec(compile(block, str(DOC), "exec"), namespace)


def diagnose(path, capsys) -> str:
    code = main(["diagnose", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_lightning_example_trains_and_keel_diagnose_reads_its_log(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    example = python_blocks("Lightning")[0]
    assert len(example.strip().splitlines()) <= 36
    run_blocks("Lightning", monkeypatch, tmp_path)
    assert "keel diagnose runs/lightning" in section("Lightning")
    out = diagnose(tmp_path / "runs" / "lightning", capsys)
    assert "reading Lightning CSV log" in out and "clip_threshold" in out and "update_ratio" in out


def test_hf_example_trains_and_keel_diagnose_reads_its_state(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    blocks = python_blocks("Hugging Face Trainer")
    assert len(blocks) == 2 and len(blocks[0].strip().splitlines()) <= 36
    run_blocks("Hugging Face Trainer", monkeypatch, tmp_path)  # the example, then the workaround's class
    assert (tmp_path / "runs" / "hf" / "checkpoint-200" / "keel_ema.safetensors").is_file()
    out = diagnose(tmp_path / "runs" / "hf", capsys)
    assert "reading Hugging Face trainer_state.json" in out and "clip_threshold" in out


def test_readme_lightning_snippet_builds_a_trainer_with_keels_callbacks():
    pytest.importorskip("lightning")
    readme = DOC.parents[1] / "README.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
                 if "keel.integrations.lightning" in b)
    namespace: dict = {}
    exec(compile(block, str(readme), "exec"), namespace)
    names = {type(c).__name__ for c in namespace["trainer"].callbacks}
    assert {"EMA", "Clip", "NonFinite"} <= names
