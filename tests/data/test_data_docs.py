"""The Python examples of docs/data.md run as written."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, tmp_path, monkeypatch):
    if "tokenizer=" in BLOCKS[index]:
        pytest.importorskip("tokenizers")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/data.md block {index}", "exec"), {})


def test_the_keys_the_doc_names_exist():
    from keel.config import describe_fields

    keys = {line.split("=")[0].strip() for line in describe_fields() if "=" in line.split("\n")[0]}
    for key in re.findall(r"^\| `((?:data|seq_warmup)\.[a-z_]+)`", DOC.read_text(), flags=re.M):
        assert key in keys, key
