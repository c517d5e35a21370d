"""docs/diagnose.md names every finding kind keel diagnose can produce."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def finding_kinds() -> set[str]:
    kinds = {"lr_5x_probe", "lr_10x_probe"}  # f"lr_{factor}x_probe"
    for path in (ROOT / "src" / "keel" / "diagnose").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Finding" and node.args:
                first = node.args[0]
                for value in (first.body, first.orelse) if isinstance(first, ast.IfExp) else (first,):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        kinds.add(value.value)
    return kinds


def test_every_finding_kind_is_documented():
    kinds = finding_kinds()
    assert len(kinds) > 25
    text = (ROOT / "docs" / "diagnose.md").read_text()
    missing = sorted(k for k in kinds if f"`{k}`" not in text)
    assert missing == []
