"""No import cycle in src/modelhost, type-only imports aside (issue 19 item 21).

The graph is built from the source with `ast`, not by importing anything: a module's edges
are every `import` / `from ... import` it contains, at module level *and inside functions*
(a deferred import still ties the two modules together: the cycle is only hidden from the
import system, not from a reader), except those under `if TYPE_CHECKING:`, which never run.
`from pkg import name` counts as an edge to `pkg.name` when that is a module, else to `pkg`.
Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, but those are not counted
as edges: otherwise every submodule would be "in a cycle" with its package's `__init__`.

The strongly connected components (Tarjan) of more than one module are the cycles. The
allow-list below is empty: any cycle fails the test, which prints what it found. (It would
hold a tolerated cycle exactly, so that one growing or changing would fail too.)
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "modelhost"

# Cycles tolerated for now, each listed exactly (a frozenset of its modules, with a comment
# saying why it is there and what breaks it). Empty: there is no cycle left, and a new one
# fails the test. Keep it empty; an entry is a debt, to be removed when its cycle is broken.
ALLOWED_CYCLES: list[frozenset[str]] = []


def module_name(path: Path) -> str:
    """`src/modelhost/fetch/engine.py` -> `modelhost.fetch.engine` (packages without `__init__`)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree` that can run: all but the `if TYPE_CHECKING:` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:  # an `else:` branch does run
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` names, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a module's `.` is its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges_of(module: str, is_package: bool, tree: ast.AST, modules: set[str]) -> set[str]:
    """The modelhost modules that `module` imports (self-imports dropped)."""
    targets: set[str] = set()
    for node in runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        source = resolve_from(module, is_package, node)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            targets.add(submodule if submodule in modules else source)
    return {t for t in targets if t in modules and t != module}


def import_graph() -> dict[str, set[str]]:
    """module -> the modelhost modules it imports, for every module under src/modelhost."""
    files = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    modules = set(files)
    return {
        name: edges_of(name, path.name == "__init__.py", ast.parse(path.read_text()), modules)
        for name, path in files.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to worry about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(frozenset(component))
    return found


def cycles() -> list[frozenset[str]]:
    """The components of more than one module."""
    return [c for c in strongly_connected(import_graph()) if len(c) > 1]


def describe(components: list[frozenset[str]]) -> str:
    """One line per cycle, its modules sorted, for the failure message."""
    return "\n".join("  {" + ", ".join(sorted(c)) + "}" for c in components) or "  (none)"


def test_the_graph_sees_function_level_imports_and_skips_type_checking() -> None:
    """The rules above, on a small source: a deferred import counts, TYPE_CHECKING does not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n"
        "    from .c import Thing\n"
        "def f():\n"
        "    from .d import g\n"
    )
    modules = {"p", "p.a", "p.b", "p.c", "p.d"}
    assert edges_of("p.a", False, ast.parse(source), modules) == {"p.b", "p.d"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    """A three-module loop is one component; a module only pointing into it is not in it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [frozenset("abc")]


def test_no_import_cycle_but_the_allowed_ones() -> None:
    found = cycles()
    unexpected = [c for c in found if c not in ALLOWED_CYCLES]
    gone = [c for c in ALLOWED_CYCLES if c not in found]
    assert not unexpected, (
        "import cycles (new, or an allowed one that changed):\n"
        + describe(unexpected)
        + "\nall cycles found:\n"
        + describe(found)
    )
    assert not gone, "allowed cycles that no longer exist (remove them):\n" + describe(gone)
