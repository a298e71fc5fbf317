"""The layers of chatgate, checked on its import graph.

Every ``import`` and ``from … import`` statement of a module counts, wherever it stands: at the
top, inside a function, or under ``if TYPE_CHECKING:``. A deferred or type-only import still
couples the two modules, and moving an import into a function is how a cycle gets hidden
rather than removed. Imports spelled as strings (``__import__``, ``importlib``) are not read.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "chatgate"
PACKAGE = "chatgate"

Graph = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class Rule:
    """Modules within ``sources`` (minus those within ``exempt``) must not import any module
    within ``forbidden``."""

    sources: str
    forbidden: tuple[str, ...]
    why: str
    exempt: tuple[str, ...] = ()

    def breaks(self, importer: str, imported: str) -> bool:
        if not within(importer, self.sources) or any(within(importer, e) for e in self.exempt):
            return False
        return any(within(imported, f) for f in self.forbidden)


RULES = (
    Rule(
        "chatgate.vocabulary",
        ("chatgate",),
        "the shared words are a leaf: the standard library only",
    ),
    Rule(
        "chatgate.store",
        ("chatgate.providers", "chatgate.chat", "chatgate.api"),
        "storage knows conversations, not who generates them or how clients ask",
    ),
    Rule(
        "chatgate.providers",
        ("chatgate.chat", "chatgate.api", "chatgate.store"),
        "an adapter streams one request; turns, clients and storage are above it",
    ),
    Rule(
        "chatgate.chat",
        ("chatgate.api", "chatgate.cluster", "chatgate.telemetry"),
        "the chat service is the same for every wire protocol, one instance or many, watched or not",
    ),
    Rule(
        "chatgate.providers",
        ("chatgate.telemetry",),
        "an adapter offers hooks (its outgoing headers); telemetry fills them",
    ),
    Rule(
        "chatgate.telemetry",
        ("chatgate.api", "chatgate.cluster"),
        "telemetry watches generations and requests from outside; the wire and the cluster call it",
    ),
    Rule(
        "chatgate.cluster",
        ("chatgate.api", "chatgate.providers"),
        "what instances share is below the wire protocols and beside the upstreams",
    ),
    Rule(
        "chatgate",
        ("chatgate.testing",),
        "the fake upstream is for tests; only the `fake-llm` command serves it",
        exempt=("chatgate.testing", "chatgate.cli"),
    ),
)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_files(root: Path = PACKAGE_ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package is its ``__init__.py``."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The modules among ``known`` that ``source`` (the text of ``module``) imports.

    ``from a.b import c`` imports module ``a.b.c`` when there is one, else ``a.b`` itself.
    Relative imports are resolved against the package ``module`` is in (or is).
    """
    here = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_nearest_known(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in known else _nearest_known(origin, known))
    found.discard("")
    found.discard(module)
    return found


def _nearest_known(name: str, known: set[str]) -> str:
    """``name`` or its closest enclosing package among ``known``; "" when outside them."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {
        module: imports_of(module, path.name == "__init__.py", path.read_text(), known)
        for module, path in files.items()
    }


def cycles(graph: Graph) -> list[list[str]]:
    """One shortest cycle for each group of modules that import each other, in import order
    (each module imports the next, the last imports the first)."""
    edges = {module: sorted(set(targets)) for module, targets in graph.items()}
    found: list[list[str]] = []
    for group in _strongly_connected(edges):
        start = min(group)
        if len(group) > 1 or start in edges.get(start, ()):
            found.append(_shortest_cycle(start, edges, group))
    return sorted(found)


def _strongly_connected(edges: Mapping[str, list[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative so that a deep graph cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(edges.get(successor, ()))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
    return groups


def _shortest_cycle(start: str, edges: Mapping[str, list[str]], group: set[str]) -> list[str]:
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in edges.get(node, ()):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if successor in group and successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is in no cycle")


def forbidden_imports(graph: Graph, rules: Iterable[Rule] = RULES) -> list[str]:
    return sorted(
        f"{importer} -> {imported}: {rule.why}"
        for rule in rules
        for importer, targets in graph.items()
        for imported in targets
        if rule.breaks(importer, imported)
    )


def describe(cycle: list[str]) -> str:
    return " -> ".join([*cycle, cycle[0]])


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph(module_files()))
    assert not found, "import cycles:\n" + "\n".join(describe(cycle) for cycle in found)


def test_no_layer_imports_a_layer_it_must_not() -> None:
    broken = forbidden_imports(import_graph(module_files()))
    assert not broken, "forbidden imports:\n" + "\n".join(broken)


def test_the_graph_reads_every_kind_of_import() -> None:
    """Checked on modules written here, so that a blind spot in the reader cannot pass for a
    clean package."""
    known = {
        "chatgate",
        "chatgate.api",
        "chatgate.api.http",
        "chatgate.chat",
        "chatgate.chat.service",
        "chatgate.config",
        "chatgate.testing.fake_llm",
    }
    source = """
from typing import TYPE_CHECKING

import aiohttp
from chatgate.api import http, router
from .. import config
from .service import Turn

if TYPE_CHECKING:
    from chatgate.testing.fake_llm import FakeSettings

def late():
    import chatgate.api.http.missing
"""
    assert imports_of("chatgate.chat.limits", False, source, known) == {
        "chatgate.api",
        "chatgate.api.http",
        "chatgate.chat.service",
        "chatgate.config",
        "chatgate.testing.fake_llm",
    }
    assert imports_of(
        "chatgate.chat", True, "from . import service\nfrom .. import api", known
    ) == {
        "chatgate.chat.service",
        "chatgate.api",
    }


def test_a_cycle_is_reported_in_import_order() -> None:
    graph = {
        "chatgate.a": {"chatgate.b"},
        "chatgate.b": {"chatgate.c", "chatgate.d"},
        "chatgate.c": {"chatgate.a"},
        "chatgate.d": set(),
        "chatgate.e": {"chatgate.e"},
    }
    assert cycles(graph) == [["chatgate.a", "chatgate.b", "chatgate.c"], ["chatgate.e"]]
    assert describe(cycles(graph)[0]) == "chatgate.a -> chatgate.b -> chatgate.c -> chatgate.a"
    assert cycles({"chatgate.a": {"chatgate.b"}, "chatgate.b": set()}) == []


def test_a_forbidden_import_is_reported() -> None:
    graph = {
        "chatgate.store.sqlite": {"chatgate.providers.base", "chatgate.store.base"},
        "chatgate.vocabulary": {"chatgate.config"},
        "chatgate.api.http": {"chatgate.testing.fake_llm", "chatgate.chat.service"},
        "chatgate.cli": {"chatgate.testing.fake_llm"},
        "chatgate.testing.fake_llm": {"chatgate.testing.fake_wire"},
    }
    assert [line.split(":")[0] for line in forbidden_imports(graph)] == [
        "chatgate.api.http -> chatgate.testing.fake_llm",
        "chatgate.store.sqlite -> chatgate.providers.base",
        "chatgate.vocabulary -> chatgate.config",
    ]
