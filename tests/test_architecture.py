"""The import graph (docs/architecture.md, "Layers"): no two prunebench modules import each other,
directly or through others, and the lower layers import nothing from the stages or the front end.

Every import counts, module-level or inside a function (a lazy import is still a dependency), read
from the source with `ast`: `from prunebench.a import b` is an edge to `prunebench.a.b` when that is
a module, else to `prunebench.a` (a package's __init__ is a module of its own).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prunebench"
# Layers that only look down: they import nothing from the stages (pruners, recovery, evals) nor from
# what drives them (pipeline, app, cli, tracking, report).
LOW = ("cache", "placement", "registry", "models", "data", "config", "knobs", "results")
HIGH = ("pruners", "recovery", "evals", "pipeline", "app", "cli", "tracking", "report")
# Stages that never import each other, either way: what both need (forward hooks, the layer-wise
# driver, the encoder classifier's head and scores) lives below them, in models.
APART = (("pruners", "evals"),)
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the prunebench modules it imports (anywhere in the file)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "prunebench"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] != "prunebench":
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in mods else owner(base))
        graph[name] = targets - {name, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
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
                    found.append(sorted(component))
    return found


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    detail = [f"{a} -> {b}" for c in found for a in c for b in sorted(graph[a] & set(c))]
    assert not found, f"import cycles {found}: {detail}"


def test_lower_layers_never_import_upward():
    upward = [
        f"{a} -> {b}"
        for a, targets in sorted(import_graph().items())
        if layer(a) in LOW
        for b in sorted(targets)
        if layer(b) in HIGH
    ]
    assert not upward, upward


def test_apart_stages_never_import_each_other():
    crossing = [
        f"{a} -> {b}"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        for pair in APART
        if {layer(a), layer(b)} == set(pair)
    ]
    assert not crossing, crossing


def test_the_checker_sees_function_level_imports_and_cycles():
    """The checks above would pass vacuously if the parser missed lazy imports or cycles."""
    graph = import_graph()
    assert "prunebench.models.export" in graph["prunebench.models.loading"]  # imported inside save_checkpoint
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_file_is_too_large():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}, f"over {MAX_LINES} lines"
    pruners = {p: n for p, n in sizes.items() if p.startswith("prunebench/pruners/") and n > 500}
    assert not pruners, f"pruners over 500 lines: {pruners}"
