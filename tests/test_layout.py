"""The package's imports point one way: command-line tools and server -> runtime -> engine format <- converter.

The import graph is read from the source with `ast` (function bodies included: a lazy import is still an
import), so a cycle or a layer imported from below fails here, not in a reader's head.
"""

import ast
import os
from collections import defaultdict

import tp_runtime

ROOT = os.path.dirname(tp_runtime.__file__)

# What each layer may import besides itself (and the package's top-level helpers: errors, cpu, env, memory).
LAYERS = {
    "engine": set(),
    "convert": {"engine"},
    "distributed": set(),
    "runtime": {"engine", "distributed"},
    "serve": {"runtime", "engine", "distributed"},
    "cli": {"convert", "runtime", "serve", "engine", "distributed"},
}
TOP_HELPERS = {"tp_runtime.errors", "tp_runtime.cpu", "tp_runtime.env", "tp_runtime.memory"}
# Edges that break the rules today, each named with why; the test also fails when one is gone, so the list
# can only shrink. None left: AWQ calibrates on the converter's layer-by-layer reference forward.
KNOWN_CYCLE: set[tuple[str, str]] = set()
KNOWN: set[tuple[str, str]] = set()


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # every import, at module level or inside a function
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module mod; `from mod import name` the module mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "tp_runtime":
                    graph[name].add(t)
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    for a, b in KNOWN_CYCLE:
        assert b in graph[a], "an edge of KNOWN_CYCLE is gone: remove it from the list"
        graph[a].discard(b)
    assert cycles(graph) == []


def test_layers_import_only_downwards():
    graph = import_graph()
    wrong = set()
    for a, targets in graph.items():
        la = layer(a)
        for b in targets:
            lb = layer(b)
            if b in TOP_HELPERS or lb == la:
                continue
            if la is None:  # a top-level module: errors, cpu, env and memory import nothing of the package but each other
                if a in TOP_HELPERS:
                    wrong.add((a, b))
                continue
            if lb is None or lb not in LAYERS[la]:
                if b.startswith("tp_runtime.") and (lb is not None or b not in TOP_HELPERS):
                    wrong.add((a, b))
    assert wrong - KNOWN == set()
    assert KNOWN - wrong == set(), "an edge of KNOWN is gone: remove it from the list"


def test_the_checker_sees_a_cycle_and_a_lazy_import():
    """The test above can fail: a lazy import inside a function is an edge, and a two-module loop a cycle."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    graph = import_graph()
    # tp_runtime.errors looks the launch glue up in sys.modules instead of importing it (no edge), while
    # cli.serve imports the server inside a function (an edge all the same)
    assert "tp_runtime.distributed.launch" not in graph["tp_runtime.errors"]
    assert any(t.startswith("tp_runtime.serve") for t in graph["tp_runtime.cli.serve"])


def _env_reads(path: str) -> list[str]:
    """The TP_RUNTIME_* names a module reads from the environment (os.environ.get / [] / os.getenv)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in ("get", "getenv", "pop") and isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_get" and node.args:
            if isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if isinstance(node.ctx, ast.Load):
                key = node.slice.value
        if isinstance(key, str) and key.startswith("TP_RUNTIME_"):
            names.append(key)
    return names


def test_environment_overrides_are_read_in_one_place():
    """tp_runtime/env.py reads the documented overrides; only the launch glue reads the launchers' variables
    (TP_RUNTIME_LAUNCHER and TP_RUNTIME_RANK_CPUS, which the Ray launcher sets for its ranks)."""
    from tp_runtime import env

    reads = {name: _env_reads(path) for name, path in modules().items()}
    assert set(reads["tp_runtime.env"]) <= set(env.VARIABLES) and reads["tp_runtime.env"]
    assert set(reads["tp_runtime.distributed.launch"]) <= {"TP_RUNTIME_LAUNCHER", "TP_RUNTIME_RANK_CPUS"}
    elsewhere = {n: r for n, r in reads.items() if r and n not in ("tp_runtime.env", "tp_runtime.distributed.launch")}
    assert elsewhere == {}
