"""The import graph of `src/anomalens` has no cycle (layers: contracts/data/backbones → methods → engine
users → cli).

Edges: every ``import``/``from ... import`` statement of a module of the package, at module level *and*
inside functions (a lazy import of a higher layer from a lower one is exactly the cycle this test is for).
Not edges: imports under ``if TYPE_CHECKING:`` (never executed), the implicit import of a parent package
that Python runs before a submodule (packages re-export their submodules, so counting it would call every
re-export a cycle), and imports by string through `importlib` (plugin discovery: `methods.base` imports
the method modules it finds in its folder without naming them).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "anomalens"
# Known cycles still to remove, as (importer, imported) edges the check ignores; any other cycle fails.
# data.synthetic's "transfer" kind imports data.captions lazily, and captions imports synthetic's
# drawing helpers: the helpers belong in a module below both (they landed together, unresolved).
KNOWN_EDGES = {("anomalens.data.synthetic", "anomalens.data.captions")}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the package folder `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package modules it imports (edges as in the module docstring)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
                continue
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets |= {full} if full in modules else {base} & modules.keys()
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if start in state:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph(module_files(PACKAGE_ROOT))
    for importer, imported in KNOWN_EDGES:
        graph[importer].discard(imported)
    assert len(graph) > 40 and "anomalens.methods.base" in graph["anomalens.methods.crane"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_function_level_imports_and_skips_type_checking(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import low\n")
    (package / "sub" / "low.py").write_text("def f():\n    from pkg import high\n")
    (package / "high.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .sub.low import f\nif TYPE_CHECKING:\n    import pkg.top\n"
    )
    (package / "top.py").write_text("from pkg import high\n")
    graph = import_graph(module_files(package))
    assert graph["pkg.high"] == {"pkg.sub.low"} and graph["pkg.top"] == {"pkg.high"}
    assert find_cycle(graph) == ["pkg.high", "pkg.sub.low", "pkg.high"]
    (package / "sub" / "low.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(module_files(package))) is None
