"""Imports run one way: config -> models / data -> parallel -> train / checkpoint / convert -> cli.

Every ``import`` in ``internevo/**/*.py`` (module level and inside functions) is read with
``ast``; an import from a lower layer into a higher one, or a cycle between modules, fails.
Run alone: ``python -m pytest tests/test_imports.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "internevo"

LAYERS = {
    "internevo.config": 0,
    "internevo.errors": 0,
    "internevo.models": 1,
    "internevo.data": 1,
    "internevo.parallel": 2,
    "internevo.launch": 2,
    "internevo.profiling": 3,
    "internevo.train": 3,
    "internevo.checkpoint": 3,
    "internevo.convert": 3,
    "internevo.cli": 4,
    "internevo.demo": 4,
    "internevo.entry": 5,
}
"""Layer of each top-level module or package (a module may import its own layer or lower)."""

ALLOWED_UPWARD = {
    # config validates model_type and the model.* keys against the registry, lazily (inside
    # the validation function): the registry owns the model list, config does not keep one
    ("internevo.config", "internevo.models.registry"),
}


def module_name(path: Path) -> str:
    """``internevo/models/internlm/spec.py`` -> ``internevo.models.internlm.spec``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The internevo modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] == "internevo")
    return out


def layer_of(name: str) -> int:
    """The layer of a module (its top-level package's)."""
    top = ".".join(name.split(".")[:2])
    assert top in LAYERS, f"{name}: not in tests/test_imports.py LAYERS; give it a layer"
    return LAYERS[top]


def import_graph() -> dict[str, set[str]]:
    """Module -> the internevo modules it imports."""
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (as a path that returns to its start), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_no_upward_imports():
    graph = import_graph()
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in graph.items() for b in targets
                    if layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_UPWARD)
    assert not upward, "imports must run config -> models/data -> parallel -> train -> cli:\n" \
        + "\n".join(upward)


def test_no_import_cycles():
    graph = {a: {b for b in targets if (a, b) not in ALLOWED_UPWARD}
             for a, targets in import_graph().items()}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_checker_sees_an_upward_import_and_a_cycle():
    """The checker itself: a made-up graph with one upward edge and one cycle."""
    graph = {"internevo.config": {"internevo.parallel.comm"},
             "internevo.parallel.comm": {"internevo.parallel.zero"},
             "internevo.parallel.zero": {"internevo.parallel.comm"}}
    assert layer_of("internevo.parallel.comm") > layer_of("internevo.config")
    assert find_cycle(graph) == ["internevo.parallel.comm", "internevo.parallel.zero",
                                 "internevo.parallel.comm"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
