"""No import cycle in ``anyad/``: lower modules never import higher ones.

The imports are read with ``ast``, not by importing: module-level and function-level
(lazy) imports alike, relative ones resolved, and those under ``if TYPE_CHECKING:``
left out (they never run). ``from pkg import name`` is an edge to ``pkg.name`` where that
is a module, else to ``pkg``; importing ``pkg.mod`` also runs ``pkg/__init__.py``, but that
implicit edge is not counted (a package's ``__init__`` importing its own modules would be
a cycle everywhere otherwise). Imports of modules that do not live under ``anyad/``
(``anyad.backends.*``, ``anyad.plugins.*``, the standard library, other packages) are
not edges.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anyad"

Graph = dict[str, dict[str, tuple[Path, int]]]  # module → {module it imports: (file, line)}


def modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` (a package folder), by its dotted name."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        elif path.with_suffix("").is_dir() and (path.with_suffix("") / "__init__.py").exists():
            continue  # a package beside a module of the same name: Python imports the package
        if all(p.isidentifier() for p in parts):
            out[".".join(parts)] = path
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST, package: str) -> list[tuple[str, str | None, int]]:
    """(module, name imported from it or None, line) for each import that runs; ``package``:
    the package relative imports start from."""
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.extend((module, alias.name, node.lineno) for alias in node.names)
        visit(node)

    visit(tree)
    return found


def import_graph(root: Path = PACKAGE) -> Graph:
    mods = modules(root)
    graph: Graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph[name] = {}
        for module, member, line in imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), package):
            target = f"{module}.{member}" if member and f"{module}.{member}" in mods else module
            if target in mods and target != name:
                edges.setdefault(target, (path, line))
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def a_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside it."""
    inside = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w in inside and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component has one


def describe(graph: Graph, root: Path) -> list[str]:
    out = []
    for component in strongly_connected(graph):
        cycle = a_cycle(graph, component)
        steps = [f"{a} -> {b} ({graph[a][b][0].relative_to(root.parent)}:{graph[a][b][1]})"
                 for a, b in zip(cycle, cycle[1:])]
        out.append(f"{' -> '.join(cycle)}\n      " + "\n      ".join(steps) +
                   (f"\n    (the cycle's component: {', '.join(component)})" if len(component) > len(cycle) - 1
                    else ""))
    return out


def test_no_import_cycle_in_anyad() -> None:
    cycles = describe(import_graph(), PACKAGE)
    assert not cycles, "import cycles in anyad/:\n  " + "\n  ".join(cycles)


def test_the_walk_finds_cycles(tmp_path: Path) -> None:
    """The walk itself, on a package made for it: lazy and relative imports count, a
    ``TYPE_CHECKING`` block does not, and a cycle is named with its files and lines."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    from pkg import low\n")
    (pkg / "low.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import high\n"
                                "else:\n    import json\n")
    (pkg / "high.py").write_text("from . import low\nfrom .sub import mod\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text("import os\n\ndef lazy():\n    from ..high import thing\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.low": (pkg / "__init__.py", 2)}
    assert graph["pkg.low"] == {}
    assert set(graph["pkg.high"]) == {"pkg.low", "pkg.sub.mod"}
    assert graph["pkg.sub.mod"] == {"pkg.high": (pkg / "sub" / "mod.py", 4)}
    assert strongly_connected(graph) == [["pkg.high", "pkg.sub.mod"]]
    assert describe(graph, pkg)[0].startswith("pkg.high -> pkg.sub.mod -> pkg.high\n"
                                              "      pkg.high -> pkg.sub.mod (pkg/high.py:2)\n"
                                              "      pkg.sub.mod -> pkg.high (pkg/sub/mod.py:4)")
