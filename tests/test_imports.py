"""The package's import graph has no cycle (a cycle ties modules into one knot that must be read together).

Every `import` and `from ... import` of a `sfbd_guard` module counts, at module level or inside a function
(lazy imports still tie the modules together), and under `if TYPE_CHECKING:` too (a type-only import is
still a dependency of the design). Relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sfbd_guard

PACKAGE = "sfbd_guard"
ROOT = Path(sfbd_guard.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` refers to: itself, or its longest importable prefix (`a.b.func` → `a.b`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (a package's `__init__` is the package's own node)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from .x import y`: y may be a submodule (x.y) or a name defined in x
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for imported in names:
                target = _target(imported, modules) if imported.startswith(PACKAGE) else None
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_relative_lazy_and_package_imports() -> None:
    graph = import_graph()
    assert len(graph) > 30
    assert "sfbd_guard.engine.config" in graph["sfbd_guard.engine.trainer"], "relative import `from .config import`"
    assert "sfbd_guard.config" in graph["sfbd_guard.engine.config"], "`from ..config import`"
    assert "sfbd_guard.engine.trainer" in graph["sfbd_guard.engine.service"], "an import inside a function"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])
