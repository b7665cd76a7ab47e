"""The package's structure: no import circle among helpers modules, lazy imports inside functions included."""
from __future__ import annotations

import ast

from helpers.paths import PROJECT_ROOT


def helpers_imports() -> dict[str, set[str]]:
    """Each helpers module and the helpers modules it imports anywhere in its source."""
    modules = {p.stem: p for p in (PROJECT_ROOT / "helpers").glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                parts = imported.split(".")
                if parts[0] == "helpers" and len(parts) > 1 and parts[1] in modules and parts[1] != name:
                    graph[name].add(parts[1])
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (a -> b -> a)."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_helpers_module_imports_one_that_imports_it_back():
    assert not circles(helpers_imports()), "import circles: " + "; ".join(
        " -> ".join(circle) for circle in circles(helpers_imports()))
