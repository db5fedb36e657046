"""Metric names are declared once (memprof.metrics): every name a record carries, from every front door this
machine can run, is declared, and so is every name any module's source writes (the backends, the engine's rules'
metrics() in rules.py and distributed.py, its entrance, fit, the script runner, the API)."""

import ast
from pathlib import Path

import pytest

from memprof import cli
from memprof.metrics import METRICS, undeclared
from memprof.results import read_records

ROOT = Path(__file__).resolve().parents[1]


def test_every_metric_a_record_carries_is_declared(tmp_path, capsys):
    """Records of the kinds this machine makes: predictions (fp32, bf16 with checkpointing, a snapshot, DDP and
    FSDP, timm's LAMB, CPU rules), a fit search with headroom, a cpu measurement and a user's script."""
    import memprof

    records = [memprof.predict("test-vit", "adamw", precision=p, grad_ckpt=True, budget="a100-80g",
                               snapshot=str(tmp_path / "snap")).record for p in ("fp32", "bf16-amp")]
    records += [memprof.predict("test-vit", "adamw", parallel=kind, world_size=2).record for kind in ("ddp", "fsdp")]
    records.append(memprof.measure("test-vit", "sgd", backend="cpu").record)
    records.append(memprof.predict("test-vit", "lamb").record)  # timm's LAMB: its foreach chunks
    from memprof.simulation.simulate import predict_cpu
    from memprof.spec import RunSpec

    records.append({"metrics": predict_cpu(RunSpec("test-vit", "sgd"))[1]})  # CPU rules: the host scalars' note
    out = tmp_path / "fit"
    assert cli.main(["fit", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--budget", "500MiB",
                     "--headroom", "5%", "--no-progress", "--jobs", "1", "--out", str(out)]) == 0
    records += read_records(str(out))
    from memprof.script.runner import run_script

    records.append(run_script(str(ROOT / "tests" / "data" / "scripts" / "train_small.py"), [], budget="rtx4090",
                              steps=2).record)
    capsys.readouterr()
    names = {k for r in records for k in r["metrics"]}
    assert {"peak_reserved_bytes", "max_batch_size", "ddp_bucket_bytes", "rank_parameter_bytes", "peak_live_bytes",
            "snapshot_file", "attention_kernels", "script_batch_size", "foreach_chunk_elements",
            "host_scalars_note"} <= names  # every kind of record was made
    assert [undeclared(r["metrics"]) for r in records if undeclared(r["metrics"])] == []


def test_negative_control_an_undeclared_name_is_reported():
    assert undeclared({"peak_allocated_bytes": 1, "peak_alocated_bytes": 2}) == ["peak_alocated_bytes"]


def _dict_keys(node) -> set[str]:
    """String keys of a dict literal, with those of dict literals spread into it (`**{...}`, `**({...} if c else
    {})`), of either branch of a conditional and of every item of a tuple (`return trace, {...}`)."""
    out = set()
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                out.add(k.value)
            elif k is None:
                out |= _dict_keys(v)
    elif isinstance(node, ast.IfExp):
        out |= _dict_keys(node.body) | _dict_keys(node.orelse)
    elif isinstance(node, ast.Tuple):
        for item in node.elts:
            out |= _dict_keys(item)
    return out


def _written_to(tree, name: str) -> set[str]:
    """Keys written to the dict called `name`: a dict literal assigned to it, name["key"] = ..., and
    name.update(...) (dict or keywords)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name) and t.id == name:
                    names |= _dict_keys(node.value)
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == name \
                        and isinstance(t.slice, ast.Constant):
                    names.add(t.slice.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == name:
            names |= {k.arg for k in node.keywords if k.arg}
            for arg in node.args:
                names |= _dict_keys(arg)
    return names


def _written_names(path: Path) -> set[str]:
    """Metric names a module writes: keys written to a dict called `metrics` anywhere, and what a function named
    `metrics` (a rule's Rule.metrics) or `*_metrics` (common_metrics, fit_metrics, ...) returns: the keys of a
    returned dict literal (alone or in a tuple) or written to a local dict it returns."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = _written_to(tree, "metrics")
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and (fn.name == "metrics" or fn.name.endswith("_metrics")):
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and node.value is not None:
                    names |= _dict_keys(node.value)
                    for item in ast.walk(node.value):
                        if isinstance(item, ast.Name):
                            names |= _written_to(fn, item.id)
    return names


MODULES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "memprof").rglob("*.py"))
WRITERS = ("memprof/backends/cuda.py", "memprof/script/measure.py", "memprof/script/record.py",
           "memprof/simulation/rules.py", "memprof/simulation/distributed.py", "memprof/simulation/simulate.py",
           "memprof/simulation/tracing.py", "memprof/planning/fit.py", "memprof/script/steps.py")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_writes_only_declared_names(module):
    """Every module of the package, read: the backends, the engine's rules (each Rule.metrics, rules.py and
    distributed.py), its entrance and tracing, fit, the script runner, the API."""
    assert sorted(_written_names(ROOT / module) - set(METRICS)) == []


@pytest.mark.parametrize("module", WRITERS)
def test_the_reader_finds_what_each_writer_writes(module):
    """The reader is not blind: each module known to write metrics is found writing some."""
    assert _written_names(ROOT / module), f"{module}: no metric found (the reader would pass anything)"


def test_the_rules_figures_are_read():
    names = _written_names(ROOT / "memprof" / "simulation" / "rules.py")
    assert {"foreach_chunk_elements", "attention_kernels", "autocast_casts", "cuda_branches", "notes"} <= names
    assert {"ddp_bucket_bytes", "ddp_bucket_count"} <= _written_names(ROOT / "memprof" / "simulation" / "distributed.py")
    assert "host_scalars_note" in _written_names(ROOT / "memprof" / "simulation" / "simulate.py")


def test_negative_control_the_source_reader_finds_an_undeclared_name(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f():\n    metrics = {"peak_allocated_bytes": 1}\n    metrics.update(made_up_bytes=2)\n'
                      '    metrics["other_made_up"] = 3\n')
    assert _written_names(source) - set(METRICS) == {"made_up_bytes", "other_made_up"}


def test_negative_control_a_rule_s_undeclared_figure_is_found(tmp_path):
    """A rule whose metrics() returns a name nobody declared, in each way the engine writes one."""
    source = tmp_path / "rules.py"
    source.write_text(
        "class ChunkRule(Rule):\n"
        "    def metrics(self) -> dict:\n"
        "        if not self.seen:\n            return {}\n"
        "        out = {\"chunk_elements_made_up\": 1}\n"
        "        out[\"notes\"] = []\n"
        "        return {**out, **({\"spread_made_up\": 2} if self.seen else {})} if self.x else out\n\n\n"
        "def cpu_rules_metrics(t):\n"
        "    return t, {\"peak_live_bytes\": 1, \"note_made_up\": \"x\"}\n")
    assert _written_names(source) - set(METRICS) == {"chunk_elements_made_up", "spread_made_up", "note_made_up"}


def test_the_baseline_fields_are_declared():
    from memprof.baseline import FIELDS

    assert sorted(set(FIELDS.values()) - set(METRICS)) == []
