"""No import cycles among the project's modules under ``src/``, counting imports inside functions too.

A cycle hidden in a function body works until the day the import order changes; then a name is missing from a
half-initialised module. The graph is read from the source with ``ast`` (nothing is imported), so the test is fast
and sees every import, wherever it sits.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path
from typing import Optional

SRC = Path(__file__).resolve().parents[2] / "src"
# The project's top-level modules and packages under src/ (kd_losses may be a module or a package).
PROJECT = ("torchtune_kd", "kd_losses")


def project_modules(root: Path, tops: tuple[str, ...] = PROJECT) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the ``tops`` modules/packages under ``root``.

    A package is named by its ``__init__.py`` (``torchtune_kd.core`` -> ``torchtune_kd/core/__init__.py``).
    """
    modules: dict[str, Path] = {}
    for top in tops:
        single = root / f"{top}.py"
        if single.is_file():
            modules[top] = single
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (``from . import x`` inside ``a.b`` -> ``a``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The longest prefix of ``name`` that is a project module (``a.b.func`` -> ``a.b``), or ``None``."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (top level, functions, ``if`` blocks).

    ``from pkg import x`` counts as an import of the module ``pkg.x`` when that module exists (else of ``pkg``).
    """
    path = modules[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = SRC, tops: tuple[str, ...] = PROJECT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root, tops)
    return {module: imports_of(module, modules) for module in modules}


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest way from ``start`` back to itself through ``members`` (breadth-first)."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return path[::-1] + [start]
            if nxt in members and nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in no cycle of {sorted(members)}")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import each other, sorted; empty if none.

    Tarjan's strongly connected components; a component of two or more modules (or one importing itself) holds
    a cycle, which a breadth-first search inside the component spells out.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        start = component[0]
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_cycle_through(start, set(component), graph))
    return sorted(cycles)


def describe(cycles: list[list[str]]) -> str:
    """The failure message: one cycle per line, ``a -> b -> a``."""
    return "import cycles (counting imports inside functions):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_src_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "torchtune_kd.core.preflight" in graph and "kd_losses" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, describe(cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        # `from pkg import a` names the module pkg.a; the import sits in a function body.
        "pkg/b.py": "def late():\n    from pkg import a\n    return a\n",
        "pkg/c.py": "from pkg.a import something\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.a" in describe(cycles)


def test_relative_imports_and_longer_cycles_are_followed(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import x\n",
        "pkg/sub/x.py": "from ..y import f\n",
        "pkg/y.py": "import pkg.z as z\n",
        "pkg/z.py": "if True:\n    from .sub import x\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub"] == {"pkg.sub.x"} and graph["pkg.sub.x"] == {"pkg.y"}
    assert find_cycles(graph) == [["pkg.sub.x", "pkg.y", "pkg.z", "pkg.sub.x"]]


def test_modules_without_a_cycle_pass(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "import os\n"})
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []
