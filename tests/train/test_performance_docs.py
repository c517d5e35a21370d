"""docs/performance.md: its Python example runs as written, and the figures it quotes are what the code computes."""

import re
from pathlib import Path

import torch

from keel.train import performance

DOC = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
TEXT = DOC.read_text()


def test_python_example_runs(capsys):
    (block,) = re.findall(r"```python\n(.*?)```", TEXT, re.S)
    exec(compile(block, DOC.name, "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert "MFLOP per token" in out and "(True, 'auto: about" in out


def test_quoted_rule_and_table_match_the_code():
    assert performance.COMPILE_AUTO_MIN_SECONDS == 600 and performance.EAGER_MFU == 0.3
    for name, peak in (("H200", 989), ("H100 PCIe", 756), ("A100", 312), ("L40S", 362), ("L4", 121)):
        assert performance.table_peak(f"NVIDIA {name}") == peak and f"{name} " in TEXT
    assert not performance.choose_compile("auto", torch.device("cuda"), 8.55e8, 16384, 300, 989.0)[0]
    assert performance.choose_compile("auto", torch.device("cuda"), 8.55e8, 16384, 20_000, 989.0)[0]
