"""The package's layers, checked from its source: who may import whom, and who may spell a directory's names.

- curation and the audit do not import each other: what both need (embeddings, k-NN, the policy's rules, the
  prepared directory) lives beneath them;
- the prepared directory's file names are spelled in prepared/layout.py only, the run directory's (and those of
  a samples folder and an audit report) in rundir.py only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_imports import import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "sfbd_guard"
PREPARED_NAMES = {"card.json", "card.sig", "manifest.parquet"}
RUN_NAMES = {"config.resolved.yaml", "run.json", "metrics.parquet", "checkpoints", "snapshots", "bank.npy",
             "samples.json", "grid.png", "done.json", "summary.json", "samples.parquet", "similarity.png",
             "report.html", "DATASHEET.md"}


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports (test_imports.py's graph: relative, lazy and type-only imports count)."""
    return import_graph()[name]


def test_imports_of_sees_the_moved_modules() -> None:
    """Positive control of the checks below."""
    assert "sfbd_guard.policy.rules" in imports_of("sfbd_guard.curation.prepare")
    assert "sfbd_guard.embedding.embed" in imports_of("sfbd_guard.auditing.service")


@pytest.mark.parametrize(("lower", "upper"), [("sfbd_guard.curation", "sfbd_guard.auditing"),
                                              ("sfbd_guard.auditing", "sfbd_guard.curation")])
def test_curation_and_audit_do_not_import_each_other(lower: str, upper: str) -> None:
    for name in import_graph():
        if name.startswith(lower + ".") or name == lower:
            bad = sorted(m for m in imports_of(name) if m == upper or m.startswith(upper + "."))
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("layer", ["sfbd_guard.prepared", "sfbd_guard.keys", "sfbd_guard.policy",
                                   "sfbd_guard.embedding", "sfbd_guard.datasets"])
def test_the_lower_layers_import_nothing_above_them(layer: str) -> None:
    """The shared layers never climb back up into the commands that use them."""
    above = ("sfbd_guard.curation", "sfbd_guard.auditing", "sfbd_guard.engine", "sfbd_guard.compliance",
             "sfbd_guard.cli", "sfbd_guard.stages")
    for name in import_graph():
        if name.startswith(layer + ".") or name == layer:
            bad = sorted(m for m in imports_of(name) if any(m == a or m.startswith(a + ".") for a in above))
            assert not bad, f"{name} imports {bad}"


def spelled(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """String constants in the code of `path` that are exactly one of `names` (docstrings aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
            and id(node) not in docstrings]


def test_spelled_finds_names_in_code_and_f_strings(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text('"""card.json"""\nA = "card.json"\nB = f"{root / \'manifest.parquet\'}"\nC = "the card.json"\n')
    assert spelled(source, PREPARED_NAMES) == [(2, "card.json"), (3, "manifest.parquet")]


@pytest.mark.parametrize(("owner", "names"), [("prepared/layout.py", PREPARED_NAMES), ("rundir.py", RUN_NAMES)])
def test_only_the_owner_spells_a_directory_s_names(owner: str, names: set[str]) -> None:
    assert spelled(PACKAGE / owner, names), "positive control: the owner spells them"
    offenders = {str(p.relative_to(PACKAGE)): found for p in PACKAGE.rglob("*.py")
                 if p != PACKAGE / owner and (found := spelled(p, names))}
    assert not offenders, f"spelled outside {owner}: {offenders}"


# Libraries whose import costs more than a tenth of a second here (measured with -X importtime; pydantic with the
# contracts built on it): a module that needs them late imports them, or a module that loads them, in the function.
HEAVY = {"torch", "torchvision", "faiss", "open_clip", "ray", "jinja2", "opacus", "duckdb", "pyarrow", "sklearn", "scipy",
         "numpy", "webdataset", "huggingface_hub", "pydantic", "diffusers", "accelerate", "datasets", "mlflow",
         "tensorboard"}


def _module_level(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level packages) `name` imports at module level, run time only (no TYPE_CHECKING)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    internal, external = set(), set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    (internal if alias.name.startswith("sfbd_guard") else external).add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                if module.startswith("sfbd_guard"):
                    internal.update(f"{module}.{a.name}" for a in node.names)
                    internal.add(module)
                else:
                    external.add(module)

    visit(ast.parse(path.read_text()).body)
    return internal, {e.split(".")[0] for e in external}


def test_function_local_imports_are_only_for_heavy_modules() -> None:
    """An import inside a function is there to keep `guard --help` and `import sfbd_guard` fast: only a module whose
    import loads a heavy library (directly or through the package modules it imports) may be imported there."""
    import sys

    paths = _paths()
    heavy: dict[str, bool] = {}

    def is_heavy(module: str, seen: frozenset[str] = frozenset()) -> bool:
        if module not in heavy:
            internal, external = _module_level(module, paths[module])
            parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
            inner = {m for m in internal | parents if m in paths and m != module and m not in seen}
            heavy[module] = bool(external & HEAVY) or any(is_heavy(m, seen | {module}) for m in inner)
        return heavy[module]

    light = []
    for name, path in paths.items():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = package[: len(package) - node.level + 1] if node.level else []
                    module = ".".join([*base, *([node.module] if node.module else [])])
                    targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names]
                for target in targets:
                    if target.split(".")[0] in sys.stdlib_module_names or (target in paths and not is_heavy(target)):
                        light.append(f"{name}:{node.lineno} imports {target}")
    assert not light, f"function-local imports of light modules (move them to the top): {light}"


def _paths() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["sfbd_guard", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found
