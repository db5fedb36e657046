"""The engine, a one-way library in three layers (tests/test_layering.py). Its core: training steps traced on fake
tensors (tracker, tracing, fake_compat, attribution) into a stream of typed events (events), the rules where CUDA allocates differently from the CPU (`rule`: their base; rules,
distributed), and the caching-allocator model the stream is replayed through (allocator). `simulate` is its
one entrance, above the rest: `prediction_of(make_trace, budget, spec)` returns a Prediction and writes nothing (the simulate
backend, memprof.backends.simulate, makes the files). Exact shortcuts sit between them, above the core, which never
imports them: shared (one forward per optimizer group), repeated_blocks, batch_scaling, math_attention (which
`replaying` installs on a tracker, for the half-precision attention rule to call) and fast_dispatch (the front
cache a tracker is given). Everything they
reuse between predictions is in one object, `memo.Memo` (the process's `memo.MEMO` unless a prediction is
given another); no module keeps a cache or switch of its own (tests/test_memo.py). A rule declares on
`rule.Rule` what the shortcuts need of its state. It imports nothing from backends, executors, planning,
reports or the front doors (tests/test_layering.py)."""

from memprof.vocabulary import Category

# what each storage is (memprof.simulation.tracing), declared once (memprof.vocabulary.Category): torch-free, so
# reports can name them without torch
CATEGORIES = tuple(c.value for c in Category)


def rule_descriptions() -> dict[str, tuple[str, str]]:
    """{rule name: (summary, source)} of every rule class in rules.py and distributed.py, read from their source
    text (class attributes that are literals), so a report names the rules without importing torch."""
    import ast
    from pathlib import Path

    out = {}
    for module in ("rules.py", "distributed.py"):
        tree = ast.parse(Path(__file__).with_name(module).read_text(encoding="utf-8"))
        for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
            attrs = {}
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                    try:
                        attrs[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                    except ValueError:  # not a literal
                        pass
            if isinstance(attrs.get("name"), str) and attrs["name"]:  # no summary: the docstring's first line
                summary = attrs.get("summary") or (ast.get_docstring(cls) or "").split("\n")[0].removeprefix("Rule: ")
                out[attrs["name"]] = (summary, attrs.get("source") or f"memprof/simulation/{module}")
    return out
