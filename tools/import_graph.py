"""The package's import graph: cycles, imports that go up the layers, sizes.

Run from the checkout: ``python tools/import_graph.py`` (``--json`` for the figures).
Every import counts, lazy ones inside functions too, and so do the modules named
in a lazy table (``_LAZY = {name: module}``, as ``__init__`` imports its public
names on first use); only those under ``if TYPE_CHECKING:`` are left out (they
never run). `LAYERS` is the intended
order, bottom first: a module may import its own layer and those below it.
tests/test_quality.py asserts that the graph has no cycle and no upward edge.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

PKG = "durable_heap"
ROOT = Path(__file__).resolve().parent.parent

#: Bottom first. A module not listed is reported (every module has a place).
LAYERS: list[tuple[str, set[str]]] = [
    ("errors", {"_errors"}),
    ("format", {"_format", "_options", "_zones"}),
    # Targets and their options parsed (no storage opened); the one error map.
    ("storage primitives", {"_targets", "_errormap", "_waits"}),
    ("storage backends", {"_fastpickle", "_allow", "_integrity", "_filestorage", "_groupcommit",
                          "_revisions", "_follow",
                          "_zeo_client", "_zeo", "_relstorage"}),
    ("storage", {"_storage"}),
    ("values", {"_values", "_kinds", "_snapshot", "_registry", "_watch", "_paths", "_storable",
                "_defaults"}),
    ("containers and state", {"_containers", "_counter", "_inline", "_state", "_jsonform"}),
    ("heap engine", {"_retry", "_notes", "_heap", "_engine"}),
    ("durable execution", {"_execution", "_workflows", "_timers", "_cron"}),
    ("programs", {"_program", "_migrations", "_rewrite", "_stubs", "_types", "_versions"}),
    ("faces", {"_facade", "__init__", "__main__", "cli", "testing", "pytest_plugin", "_zeo_server", "_copy",
               "_zeo_pipeline", "asgi", "wsgi", "_http", "_requests", "_serve", "_inspect", "_parent",
               "_ops", "_exchange", "_completion", "_rewrite_cli", "_callpool"}),
]


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted((ROOT / PKG).glob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for n in node.body:
                lines.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))
    return lines


def _is_lazy_table(node: ast.AST) -> bool:
    """``_LAZY = {...}`` (or annotated): public name -> the module imported on first use."""
    if isinstance(node, ast.AnnAssign):
        target = node.target
    elif isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    else:
        return False
    return isinstance(target, ast.Name) and target.id == "_LAZY" and isinstance(node.value, ast.Dict)


def graph() -> tuple[dict[str, set[str]], list[tuple[int, str]]]:
    """(module -> modules of the package it imports, [(lines, function)])."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    functions: list[tuple[int, str]] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    if node.module:
                        deps.add(node.module.split(".")[0])
                    else:
                        deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith(PKG + "."):
                    deps.add(node.module.split(".")[1])
                elif node.module == PKG:
                    deps.add("__init__")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PKG + "."):
                        deps.add(a.name.split(".")[1])
            elif _is_lazy_table(node):
                deps.update(v.value for v in node.value.values  # type: ignore[attr-defined]
                            if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))  # type: ignore[operator]
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges, sorted(functions, reverse=True)


def layer_of(name: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        if name in members:
            return i
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def report() -> dict[str, object]:
    edges, functions = graph()
    unplaced = sorted(m for m in edges if layer_of(m) is None)
    upward = sorted(
        f"{a} -> {b}" for a, deps in edges.items() for b in deps
        if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)  # type: ignore[operator]
    )
    sizes = sorted(((len(p.read_text().splitlines()), n) for n, p in modules().items()), reverse=True)
    return {
        "cycles": cycles(edges),
        "upward": upward,
        "unplaced": unplaced,
        "sizes": {n: s for s, n in sizes},
        "longest_functions": {n: s for s, n in functions[:10]},
        "edges": {k: sorted(v) for k, v in sorted(edges.items())},
    }


def main() -> int:
    data = report()
    if "--json" in sys.argv:
        print(json.dumps(data, indent=2))
    else:
        for i, (label, members) in enumerate(LAYERS):
            present = sorted(m for m in members if m in data["edges"])  # type: ignore[operator]
            if present:
                print(f"layer {i} {label}: " + ", ".join(
                    f"{m} ({data['sizes'][m]} lines) -> {', '.join(data['edges'][m]) or '-'}"  # type: ignore[index]
                    for m in present))
        print("longest functions:", ", ".join(f"{n} {s}" for n, s in data["longest_functions"].items()))  # type: ignore[attr-defined]
        for c in data["cycles"]:  # type: ignore[attr-defined]
            print("cycle:", " <-> ".join(c))
        for u in data["upward"]:  # type: ignore[attr-defined]
            print("upward:", u)
        for m in data["unplaced"]:  # type: ignore[attr-defined]
            print("unplaced:", m)
    bad = data["cycles"] or data["upward"] or data["unplaced"]
    return 1 if bad else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
