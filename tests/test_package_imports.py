"""The package's import structure, read from the source (ast): no import circle between fastnas's
modules; the Triton kernels (``kernels/``, installed as ``fastnas.kernels``) take nothing private
from the layers above them and nothing of them but the leaves; the leaves import nothing of fastnas.

Every import counts, at module level or inside a function (a deferred import still ties the two
modules together). ``from package import name`` is an import of ``package.name`` when that is a
module, of ``package`` otherwise; importing a module does not count as importing its parents."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastnas"
KERNELS = "fastnas.kernels"
LEAVES = ("fastnas.contract", "fastnas.extension", "fastnas.switches")
"""Modules every layer may import, which import nothing of fastnas."""


def package_modules(root: Path) -> dict[str, Path]:
    """``{module name: file}`` of the package: ``fastnas/`` and ``kernels/`` (as ``fastnas.kernels``,
    the mapping setup.py installs; a ``fastnas/kernels`` link to it is skipped)."""
    modules = {}
    for folder, name in ((root / "fastnas", PACKAGE), (root / "kernels", KERNELS)):
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if name == PACKAGE and relative.parts[0] == "kernels":
                continue
            parts = [name, *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the package (None outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


class Imports:
    """What one module imports from the package: the modules, the private names taken (``from m
    import _x``, ``m._x`` through a name bound to a module, an import of a private module), with lines."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path]) -> None:
        self.edges: dict[str, int] = {}
        self.private: list[tuple[int, str]] = []
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: dict[str, str] = {}  # local name -> package module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _imported_module(alias.name, modules)
                    if target is not None:
                        self._add(target, node.lineno)
                        if alias.asname:
                            bound[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, path.name == "__init__.py")
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    target = full if full in modules else _imported_module(source, modules)
                    if target is None:
                        continue
                    self._add(target, node.lineno)
                    if target == full:
                        bound[alias.asname or alias.name] = target
                    elif alias.name.startswith("_"):
                        self.private.append((node.lineno, f"{source}.{alias.name}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
                target = bound.get(node.value.id)
                if target is not None and not node.attr.startswith("__"):
                    self.private.append((node.lineno, f"{target}.{node.attr}"))

    def _add(self, target: str, line: int) -> None:
        self.edges.setdefault(target, line)
        if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
            self.private.append((line, target))


def import_graph(root: Path) -> dict[str, Imports]:
    modules = package_modules(root)
    return {name: Imports(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, Imports]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one importing itself
    (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v].edges:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v].edges:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, Imports]) -> list[str]:
    """What ``fastnas.kernels`` takes from above it (a private name, or any module but the leaves),
    and what the leaves import of fastnas."""
    found = []
    for module, imports in sorted(graph.items()):
        in_kernels = module == KERNELS or module.startswith(KERNELS + ".")
        if in_kernels:
            for line, name in imports.private:
                if not name.startswith(KERNELS + "."):
                    found.append(f"{module}:{line} takes the private name {name}")
            for target, line in imports.edges.items():
                if not (target.startswith(KERNELS) or target in LEAVES):
                    found.append(f"{module}:{line} imports {target}, above the kernels")
        if module in LEAVES:
            for target, line in imports.edges.items():
                found.append(f"{module}:{line} imports {target}: a leaf imports nothing of fastnas")
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph(ROOT)
    assert {"fastnas.backend", "fastnas.ops.mixed_sum", "fastnas.kernels.mixed_sum"} <= set(graph)
    assert circles(graph) == []


def test_the_kernels_import_only_leaves_and_nothing_private_and_the_leaves_nothing():
    graph = import_graph(ROOT)
    assert "fastnas.contract" in graph["fastnas.kernels.mixed_sum"].edges  # the graph sees the kernels' imports
    assert layer_violations(graph) == []


def test_the_checks_find_circles_and_private_imports(tmp_path):
    """The checks above on a small package that breaks every rule."""
    files = {
        "fastnas/__init__.py": "from fastnas import backend\n",
        "fastnas/backend.py": "def f():\n    from fastnas.ops import mixed_sum\n",
        "fastnas/ops/__init__.py": "",
        "fastnas/ops/mixed_sum.py": "from fastnas import backend\n_layout = 1\n",
        "fastnas/ops/_private.py": "",
        "fastnas/contract.py": "from . import backend\n",
        "kernels/__init__.py": "",
        "kernels/launch.py": "from fastnas import backend\nbackend._reason()\n",
        "kernels/mixed_sum.py": (
            "from fastnas.ops.mixed_sum import _layout\nimport fastnas.ops._private as p\n"
            "from fastnas.contract import x\nfrom fastnas.kernels.launch import _helper\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert circles(graph) == [["fastnas.backend", "fastnas.ops.mixed_sum"]]  # through a deferred import
    violations = layer_violations(graph)
    assert "fastnas.kernels.launch:2 takes the private name fastnas.backend._reason" in violations
    assert "fastnas.kernels.launch:1 imports fastnas.backend, above the kernels" in violations
    assert "fastnas.kernels.mixed_sum:1 takes the private name fastnas.ops.mixed_sum._layout" in violations
    assert "fastnas.kernels.mixed_sum:2 takes the private name fastnas.ops._private" in violations
    assert "fastnas.contract:1 imports fastnas.backend: a leaf imports nothing of fastnas" in violations
    assert not any("_helper" in v or "imports fastnas.contract" in v for v in violations)  # its own, a leaf
