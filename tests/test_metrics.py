"""Metric names are declared once (memprof.metrics): every name a record carries, from every front door this
machine can run, is declared, and so is every name the measuring backends' source writes."""

import ast
from pathlib import Path

import pytest

from memprof import cli
from memprof.metrics import METRICS, undeclared
from memprof.results import read_records

ROOT = Path(__file__).resolve().parents[1]


def test_every_metric_a_record_carries_is_declared(tmp_path, capsys):
    """Records of the kinds this machine makes: predictions (fp32, bf16 with checkpointing, a snapshot, DDP and
    FSDP), a fit search with headroom, a cpu measurement and a user's script."""
    import memprof

    records = [memprof.predict("test-vit", "adamw", precision=p, grad_ckpt=True, budget="a100-80g",
                               snapshot=str(tmp_path / "snap")).record for p in ("fp32", "bf16-amp")]
    records += [memprof.predict("test-vit", "adamw", parallel=kind, world_size=2).record for kind in ("ddp", "fsdp")]
    records.append(memprof.measure("test-vit", "sgd", backend="cpu").record)
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
            "snapshot_file", "attention_kernels", "script_batch_size"} <= names  # every kind of record was made
    assert [undeclared(r["metrics"]) for r in records if undeclared(r["metrics"])] == []


def test_negative_control_an_undeclared_name_is_reported():
    assert undeclared({"peak_allocated_bytes": 1, "peak_alocated_bytes": 2}) == ["peak_alocated_bytes"]


def _written_names(path: Path) -> set[str]:
    """Metric names a module writes: keys of a dict assigned to `metrics`, of metrics.update(...) (dict or
    keywords) and of metrics["name"] = ..."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id == "metrics" and isinstance(node.value, ast.Dict):
                    names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "metrics" \
                        and isinstance(t.slice, ast.Constant):
                    names.add(t.slice.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "metrics":
            names |= {k.arg for k in node.keywords if k.arg}
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    names |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
    return names


@pytest.mark.parametrize("module", ["memprof/backends/cuda.py", "memprof/script/measure.py"])
def test_the_measuring_sources_write_only_declared_names(module):
    written = _written_names(ROOT / module)
    assert written, f"{module}: no metric found (the reader would pass anything)"
    assert sorted(written - set(METRICS)) == []


def test_negative_control_the_source_reader_finds_an_undeclared_name(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f():\n    metrics = {"peak_allocated_bytes": 1}\n    metrics.update(made_up_bytes=2)\n'
                      '    metrics["other_made_up"] = 3\n')
    assert _written_names(source) - set(METRICS) == {"made_up_bytes", "other_made_up"}


def test_the_baseline_fields_are_declared():
    from memprof.baseline import FIELDS

    assert sorted(set(FIELDS.values()) - set(METRICS)) == []
