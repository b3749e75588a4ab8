"""The package's layering, read from the source (nothing is imported): the data flows one way, the artifact
formats are the bottom floor, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import megrez_mlc

PACKAGE = Path(megrez_mlc.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The megrez_mlc modules a file imports, at any depth in the file (function-level imports count)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found |= {n for n in [target, *names] if n.startswith("megrez_mlc")}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("megrez_mlc")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # `from .x import name` names an attribute, not a module, unless x.name is a module itself
    return {
        name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()
    }


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                circle = [*trail[trail.index(target) :], target] if target in trail else [module, target]
                raise AssertionError(f"import circle: {' -> '.join(circle)}")
            if target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_layers() -> None:
    edges = graph()

    def arrows(source: str, target: str) -> list[str]:
        return sorted(
            f"{a} -> {b}"
            for a, targets in edges.items()
            if a.startswith(source)
            for b in targets
            if b.startswith(target)
        )

    assert arrows("megrez_mlc.runtime", "megrez_mlc.quantize") == []
    assert arrows("megrez_mlc.compile", "megrez_mlc.quantize") == []
    assert arrows("megrez_mlc.runtime", "megrez_mlc.compile") == []
    for step in ("quantize", "compile", "runtime", "serve", "package", "cli"):
        assert arrows("megrez_mlc.artifacts", f"megrez_mlc.{step}") == []
