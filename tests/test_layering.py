"""The house's layering, stated as a table: a module may import its own layer and the layers below it, never
one above, and no imports may close a cycle. Imports are read from the source (ast), lazy ones inside
functions included, so a deferred import cannot hide an upward dependency."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "memprof"

# lowest first; a module belongs to the first layer with a prefix that names it or a package above it
LAYERS = (
    ("core", ("memprof.errors", "memprof.budget", "memprof.recipe", "memprof.options", "memprof.metrics",
              "memprof.suite", "memprof.vocabulary", "memprof.plugin_registry")),
    ("sources", ("memprof.models", "memprof.adapters", "memprof.model_sources", "memprof.optims", "memprof.spec",
                 "memprof.records", "memprof.results", "memprof.baseline", "memprof.contrastive", "memprof.harness")),
    # the engine in three: its core (the tracker, rules, allocator model) never imports the exact shortcuts above
    # it, which never import the entrance (simulate) that composes them
    ("engine core", tuple(f"memprof.simulation.{m}" for m in (
        "events", "allocator", "replay", "rule", "rules", "branches", "tracker", "tracing", "attribution",
        "fake_compat", "distributed"))),
    ("engine shortcuts", tuple(f"memprof.simulation.{m}" for m in (
        "memo", "fast_dispatch", "math_attention", "batch_scaling", "repeated_blocks", "shared"))),
    ("engine", ("memprof.simulation",)),
    ("reports", ("memprof.reports",)),
    # the devices user code runs on (memprof.backends.base.Backend.device): the simulated card and the measured GPU,
    # below the backends that hand them out; a script's runner and command line stay with the other doors
    ("devices", tuple(f"memprof.script.{m}" for m in (
        "state", "patches", "detection", "failures", "standins", "deferred", "files", "moves", "cuda_api", "parallel",
        "torch_patches", "trace", "record", "device", "cuda_peaks", "measure", "steps"))),
    ("backends", ("memprof.backends",)),
    ("planning", ("memprof.planning",)),
    ("run", ("memprof.executors", "memprof.plan", "memprof.accuracy", "memprof.script")),
    ("front", ("memprof.api", "memprof.cli", "memprof.pytest_plugin", "memprof.__main__", "memprof")),
)


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "memprof") or module == "memprof" \
                and "memprof" in prefixes:
            return i
    return None


def module_names(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph(sources: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    """module -> the memprof modules it imports anywhere in its text (`from pkg import mod` counts as pkg.mod;
    the packages above a module, which Python imports on the way, are not edges)."""
    graph = {}
    for name, text in sources.items():
        deps = set()
        package = name if sources.get(name + ".__init__") or any(k.startswith(name + ".") for k in known) else \
            name.rpartition(".")[0]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in known else base)
        graph[name] = {d for d in deps if d in known and d != name and not name.startswith(d + ".")}
    return graph


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph():
    names = module_names()
    return import_graph({n: p.read_text(encoding="utf-8") for n, p in names.items()}, set(names))


def test_every_module_has_a_layer():
    assert [m for m in module_names() if layer_of(m) is None] == []


def test_no_import_runs_up_a_layer_or_closes_a_cycle():
    graph = _graph()
    assert upward(graph) == []
    assert cycles(graph) == []


def test_the_engine_imports_nothing_above_it():
    """The issue's own words: the simulation writes no file and imports no backend, executor, planner, report or
    front door (the table says it; this names it)."""
    graph = _graph()
    engine = [m for m in graph if m.startswith("memprof.simulation")]
    assert engine and all(layer_of(d) <= layer_of("memprof.simulation") for m in engine for d in graph[m])


@pytest.mark.parametrize("extra, finds", [
    ({"memprof.simulation.tracker": "from memprof.reports.timeline import write_timeline"}, "upward"),
    ({"memprof.simulation.tracker": "def f():\n    from memprof.backends import registry\n"}, "upward"),
    ({"memprof.simulation.rules": "def f():\n    from memprof.simulation import math_attention\n"}, "upward"),
    ({"memprof.reports.timeline": "import memprof.reports.html", "memprof.reports.html":
      "from memprof.reports import timeline"}, "cycle"),
])
def test_the_checks_catch_an_upward_import_a_lazy_one_and_a_cycle(extra, finds):
    """Negative controls: a module given an import that runs up (also inside a function), or two that import
    each other, is reported."""
    names = module_names()
    sources = {n: p.read_text(encoding="utf-8") for n, p in names.items()}
    for name, text in extra.items():
        sources[name] += "\n" + text + "\n"
    graph = import_graph(sources, set(names))
    if finds == "upward":
        assert any(line.startswith(next(iter(extra))) for line in upward(graph))
    else:
        assert any(set(extra) <= set(c) for c in cycles(graph))
