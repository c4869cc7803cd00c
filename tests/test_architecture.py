"""The package's layout is its architecture: no import cycle, and layers import only downward.

The import graph is read from the source (every ``import`` statement, those inside functions
included), so an import hidden in a function cannot bring a cycle back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "petmonai"

# bottom up: a module may import from its own layer and the layers below it
LAYERS = [
    {"petmonai", "petmonai.errors", "petmonai.trust", "petmonai.config", "petmonai.runs", "petmonai.device"},
    {"petmonai.models"},
    {"petmonai.data"},
    {"petmonai.transforms"},
    {"petmonai.audit"},
    {"petmonai.evaluation"},
    {"petmonai.inference"},
    {"petmonai.training"},
    {"petmonai.studies"},
    {"petmonai.commands"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the petmonai modules it imports (``from a.b import c`` counts as a.b, or a.b.c
    where c is a module)."""
    modules = {module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_of(module: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "petmonai"):
            return depth
    assert module == "petmonai", f"{module}: in no layer; add it to LAYERS"
    return 0


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downward():
    upward = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts
              if layer_of(dst) > layer_of(src)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("package", sorted({m.split(".")[1] for m in import_graph() if m.count(".") >= 1}))
def test_every_subpackage_has_a_layer(package):
    layer_of(f"petmonai.{package}")
