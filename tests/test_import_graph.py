"""keel's modules import one another without a circle: every import counts (inside functions, under
TYPE_CHECKING), and no registry hides one behind a list of its plugins' names."""

import ast
from pathlib import Path

import keel

ROOT = Path(keel.__file__).resolve().parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("keel", *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the keel modules it imports, anywhere in its source (``from keel import optim`` is keel.optim;
    ``from keel.tasks.base import Task`` is keel.tasks.base)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets |= {resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                            for alias in node.names}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_module_import_graph_is_acyclic():
    graph = import_graph()
    assert "keel.train.loop" in graph["keel.train"] or graph["keel.train.loop"]  # the walk sees the code
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_registry_lists_its_plugins():
    """The technique and task registries name no module of keel's to import: their plugins are found (package
    discovery, entry points), so the arrows point from each plugin to its registry."""
    groups = {"keel", "keel.techniques", "keel.tasks"}  # the package itself and entry-point groups: no plugin
    known = modules()
    for name in ("techniques.py", "task_registry.py", "plugins.py", "tasks/__init__.py"):
        path = ROOT / name
        if not path.exists():
            continue
        named = [node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and node.value.split(":")[0] in known and node.value not in groups]
        assert not named, (name, named)


def test_keels_techniques_and_tasks_are_found_without_a_list():
    from keel.task_registry import task_specs
    from keel.techniques import techniques

    assert {"ema", "polyak", "swa", "snapshot", "early_stopping", "seq_warmup", "diagnostics", "sweep",
            "log"} <= set(techniques())
    assert list(techniques())[-1] == "log"  # tracking records what the others put in the summary: last
    assert {"lm", "digits"} <= set(task_specs())
