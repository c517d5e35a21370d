"""benchmarks/bench_param_memory.py: bytes per parameter of weights, gradients, master copy and AdamW state in the
four storage layouts, counted from the tensors of a real update (docs/stability.md, 'Half-precision weights')."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_param_memory as bench  # noqa: E402


@pytest.mark.parametrize("layout, expected", [("fp32", 16), ("bf16 + fp32 master", 20),
                                              ("bf16 weights, fp32 state", 12), ("pure bf16", 8)])
def test_bytes_per_parameter_of_each_layout(layout, expected):
    row = bench.measure(layout, bench.SHAPES["small"])
    assert row["bytes_per_parameter"] == expected
    assert (row["bytes"]["master"] > 0) == (layout == "bf16 + fp32 master")


def test_without_a_master_small_updates_are_rounded_away():
    shares = [bench.rounded_away(bench.SHAPES["small"], lr) for lr in (1e-3, 1e-5)]
    assert 0 <= shares[0] < shares[1] <= 1 and shares[1] > 0.3


def test_the_script_prints_the_table_without_writing(capsys):
    assert bench.main(["--small", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| pure bf16 | 2 | 2 | 0 | 4 | 8.00 | 0.50x |" in out and "keel therefore keeps fp32 weights" in out
