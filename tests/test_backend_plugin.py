"""A backend added from outside the package, by the `memprof.backends` entry-point group or
memprof.backends.registry.register, with no edit of memprof: a grid (in pooled worker processes, which find it
by its dotted path) and memprof.predict run through it, and its figures are its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memprof
from memprof.backends import registry
from memprof.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

TOY = '''
from memprof.backends.base import PREDICTED, Backend, Outcome


class FormulaBackend(Backend):
    """Predicts (batch + 1) MiB allocated for every configuration: not memprof's figure, so a record shows whose
    figure it carries."""

    name = "formula"
    source = PREDICTED
    isolation = "pooled"
    default_budget = "titan-x"

    def device_name(self):
        return "a formula"

    def run(self, spec, out_dir=None, **options):
        nbytes = (spec.batch_size + 1) << 20
        return Outcome("ok", {"peak_allocated_bytes": nbytes, "peak_reserved_bytes": 2 * nbytes})

    def device(self, budget=None, *, steps=None, user_file=None, label=None, world_size=None):
        return FormulaDevice(label or "code")


class FormulaDevice:
    """User code runs as it is (on the CPU); the figure is the formula's: 7 MiB per forward of a module."""

    def __init__(self, label):
        self.label, self.forwards = label, 0

    def __enter__(self):
        import torch

        self.hook = torch.nn.modules.module.register_module_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.forwards += 1

    def __exit__(self, *exc):
        self.hook.remove()
        return False

    def build_user(self, build):
        return build()

    @staticmethod
    def move_input(value):
        return value

    def result_with(self, out_dir=None, snapshot_dir=None):
        from memprof.results import Result, environment, make_record
        from memprof.spec import RunSpec

        nbytes = 7 * self.forwards << 20
        return Result(make_record(RunSpec(model=self.label, optim="custom"), "ok", PREDICTED,
                                  environment("formula", "a formula"),
                                  {"peak_allocated_bytes": nbytes, "peak_reserved_bytes": nbytes}))

    result = property(result_with)
'''

SCRIPT = """
import torch
model = torch.nn.Linear(4, 2)
for _ in range(3):
    model(torch.randn(2, 4))
print("DONE")
"""

PLUGIN_TEST = """
import torch

def test_step(cuda_memory):
    def build():
        model = torch.nn.Linear(4, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def step(model, optimizer, x):
        model(x).sum().backward()
        optimizer.step()

    r = cuda_memory.step(build, step, lambda: torch.randn(2, 4))
    assert r.peak_allocated_bytes == 2 * 7 << 20 and r.environment["backend"] == "formula"
"""


@pytest.fixture
def plugin_dir(tmp_path):
    """A package installed the way pip installs one: its module and a dist-info with the entry point."""
    (tmp_path / "toy_memprof_backend.py").write_text(TOY)
    info = tmp_path / "toy_memprof_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-memprof-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memprof.backends]\nformula = toy_memprof_backend:FormulaBackend\n")
    return tmp_path


def _memprof(args, plugin=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (plugin, ROOT) if p)}
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_an_entry_point_backend_runs_a_grid_in_workers(plugin_dir, tmp_path):
    out = tmp_path / "run"
    proc = _memprof(["run", "--models", "test-vit", "--optims", "sgd,adamw", "--batch-size", "1,3", "--backend",
                     "formula", "--jobs", "2", "--no-progress", "--out", str(out)], plugin_dir)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["environment"]["backend"] for r in records} == {"formula"}
    assert {r["source"] for r in records} == {"predicted"} and {r["environment"]["device"] for r in records} == {
        "a formula"}
    assert sorted(r["metrics"]["peak_allocated_bytes"] >> 20 for r in records) == [2, 2, 4, 4]
    assert all(r["key"].endswith("@formula") for r in records)
    assert "backend formula" in proc.stderr and "formula" in _memprof(["list", "backends"], plugin_dir).stdout


def test_without_the_entry_point_the_backend_is_unknown(plugin_dir, tmp_path):
    """Negative control: the same command without the plugin on the path is bad input, naming the fix."""
    proc = _memprof(["run", "--models", "test-vit", "--backend", "formula", "--out", str(tmp_path / "r")])
    assert proc.returncode == 2 and "unknown backend 'formula'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_registered_backend_serves_memprof_predict(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    registry.register("formula2", "toy_memprof_backend:FormulaBackend")
    try:
        r = memprof.predict("test-vit", "sgd", batch_size=5, backend="formula2")
        assert r.ok and r.source == "predicted" and r.peak_allocated_bytes == 6 << 20
        assert r.key.endswith("@formula2") and r.environment["backend"] == "formula2"
        with pytest.raises(UsageError, match="gives predicted figures: use memprof.predict"):
            memprof.measure("test-vit", "sgd", backend="formula2")
    finally:
        registry.unregister("formula2")
    with pytest.raises(UsageError, match="unknown backend 'formula2'"):  # negative control: gone again
        memprof.predict("test-vit", "sgd", backend="formula2")


def test_an_entry_point_backend_serves_memprof_script_and_the_pytest_plugin(plugin_dir, tmp_path):
    """The same one module and one entry-point line give `memprof script` and the plugin their device: no edit of
    memprof, no name compared anywhere (Backend.device)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = _memprof(["script", "--backend", "formula", "--out", str(tmp_path / "s"), str(script)], plugin_dir)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert record["metrics"]["peak_allocated_bytes"] == 3 * 7 << 20 and record["key"].endswith("@formula")
    (tmp_path / "test_step.py").write_text(PLUGIN_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (plugin_dir, ROOT))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--memprof-backend",
                          "formula", str(tmp_path / "test_step.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_backend_without_a_device_refuses_user_code_in_one_line(tmp_path):
    """Negative control: a backend that runs no user code (the base refusal) says so, exit 2, no traceback."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = _memprof(["script", "--backend", "cpu", str(script)])
    assert proc.returncode == 2 and "not a script" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
