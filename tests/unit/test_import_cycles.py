"""No import cycle in relay/: the module-level imports of every module,
read with ast (nothing is imported), form a graph without a cycle. Imports
inside functions (a backend opened on demand) and under `if TYPE_CHECKING:`
(annotations only) do not run when the module loads and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import relay

ROOT = Path(relay.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def module_level(body):
    """The statements that run when the module loads, blocks opened."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                yield from module_level(node.orelse)
                continue
            yield from module_level(node.body)
            yield from module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from module_level(block)
        elif isinstance(node, (ast.With,)):
            yield from module_level(node.body)
        else:
            yield node


def imports_of(name: str) -> set[str]:
    """The relay modules that loading `name` imports directly."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in module_level(tree.body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c; the parents of the
            # importing module itself are loaded before it and add no edge.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in MODULES and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_relay_has_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_two_parts_of_relay_import_each_other():
    """Also across packages: relay.store.common importing relay.archive while
    relay.archive imports relay.store is a cycle of the two parts even when no
    single module closes it (what issue 15 found)."""
    def part(name):
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for name in MODULES:
        graph.setdefault(part(name), set()).update(part(t) for t in imports_of(name) if part(t) != part(name))
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_store_uses_the_chain_and_the_archive_tools_never_import_the_store():
    graph = {name: imports_of(name) for name in MODULES}
    assert "relay.archive.chain" in graph["relay.store"]
    archive_modules = [name for name in MODULES if name == "relay.archive" or name.startswith("relay.archive.")]
    assert len(archive_modules) >= 5
    for name in archive_modules:
        assert not any(t == "relay.store" or t.startswith("relay.store.") for t in graph[name]), name


def test_the_walk_sees_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
