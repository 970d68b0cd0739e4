"""No import cycle in src/modelhost, type-only imports aside (issue 19 item 21).

The graph is built from the source with `ast`, not by importing anything: a module's edges
are every `import` / `from ... import` it contains, at module level *and inside functions*
(a deferred import still ties the two modules together: the cycle is only hidden from the
import system, not from a reader), except those under `if TYPE_CHECKING:`, which never run.
`from pkg import name` counts as an edge to `pkg.name` when that is a module, else to `pkg`.
Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, but those are not counted
as edges: otherwise every submodule would be "in a cycle" with its package's `__init__`.

Imports by name count too: a string literal anywhere in a module that is exactly a modelhost
module's dotted name (`import_off_loop("modelhost.runtime.inference")`, the warm-up's list),
or such a name and an attribute (`"modelhost.runtime.families.vits:VitsAdapter"`, the family
registry's entries), is an edge to that module: `importlib` runs it as surely as an `import`
statement would. A literal naming one of the module's own packages is not (`catalog.py`'s
`__package__` fallback, a resource anchor): a package is imported before its submodules run.
An f-string counts when every part it joins is text or a module-level string constant of
the same module (`f"{_PACKAGE}.vits:VitsAdapter"`). Names only known at run time (a
function's argument, `MODELHOST_FAMILIES`) cannot be read from the source; a test below
checks that every built-in family of the registry is an edge.

The strongly connected components (Tarjan) of more than one module are the cycles. The
allow-list below is empty: any cycle fails the test, which prints what it found. (It would
hold a tolerated cycle exactly, so that one growing or changing would fail too.)
"""

from __future__ import annotations

import ast
import re
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


# `modelhost.a.b` or `modelhost.a.b:Name` (`Name` may be dotted), the whole literal.
STRING_IMPORT = re.compile(rf"({PACKAGE}(?:\.\w+)+)(?::\w+(?:\.\w+)*)?")


def string_constants(tree: ast.AST) -> dict[str, str]:
    """The module-level `NAME = "text"` assignments (what an f-string may join)."""
    found: dict[str, str] = {}
    for node in getattr(tree, "body", []):
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            if isinstance(value.value, str):
                found[target.id] = value.value
    return found


def string_value(node: ast.AST, constants: dict[str, str]) -> str | None:
    """The text of a string literal, or of an f-string joining text and `constants` only;
    None for anything else (a name only known at run time)."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if not isinstance(node, ast.JoinedStr):
        return None
    parts = []
    for part in node.values:
        if isinstance(part, ast.FormattedValue):
            plain = part.conversion == -1 and part.format_spec is None
            if not (plain and isinstance(part.value, ast.Name) and part.value.id in constants):
                return None
            parts.append(constants[part.value.id])
        else:
            parts.append(string_value(part, constants) or "")
    return "".join(parts)


def string_imports(module: str, tree: ast.AST, modules: set[str]) -> set[str]:
    """The modelhost modules that `module` names in a string, to import by name (see the
    module docstring): its own packages left out."""
    ancestors = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
    constants = string_constants(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        text = string_value(node, constants)
        match = STRING_IMPORT.fullmatch(text) if text is not None else None
        if match and match[1] in modules and match[1] not in ancestors:
            found.add(match[1])
    return found


def edges_of(module: str, is_package: bool, tree: ast.AST, modules: set[str]) -> set[str]:
    """The modelhost modules that `module` imports, by statement or by name (self-imports
    dropped)."""
    targets = string_imports(module, tree, modules)
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


def test_the_graph_sees_imports_by_name() -> None:
    """A `module:Name` or module-name literal is an edge, and so is an f-string of the
    module's own constants; prose, an f-string of a run-time name, a module that does not
    exist and the module's own package are not."""
    source = (
        'ADAPTER = "modelhost.x.b:Thing"\n'
        'WARM = ("modelhost.c",)\n'
        'ANCHOR = "modelhost.x"\n'
        '_PACKAGE = "modelhost"\n'
        'BUILT = f"{_PACKAGE}.f:Thing"\n'
        "def f(name):\n"
        '    import_off_loop("modelhost.d")\n'
        '    import_off_loop(f"modelhost.{name}")\n'
        '    return "see modelhost.e for why", "modelhost.nope:Thing"\n'
    )
    modules = {
        "modelhost.x",
        "modelhost.x.a",
        "modelhost.x.b",
        "modelhost.c",
        "modelhost.d",
        "modelhost.e",
        "modelhost.f",
    }
    found = edges_of("modelhost.x.a", False, ast.parse(source), modules)
    assert found == {"modelhost.x.b", "modelhost.c", "modelhost.d", "modelhost.f"}


def test_every_builtin_family_is_an_edge_of_the_registry() -> None:
    """The graph reads the registry's entries (they are not names only known at run time)."""
    from modelhost.runtime.families.registry import BUILTIN

    edges = import_graph()["modelhost.runtime.families.registry"]
    assert {entry.partition(":")[0] for entry in BUILTIN} <= edges


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
