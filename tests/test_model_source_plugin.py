"""A model source added from outside the package, by memprof.model_sources.registry.register or the
`memprof.model_sources` entry-point group, with no edit of memprof: its names resolve, predict, run in a grid and
list (`memprof list models --source toy`) through the same front as the built-in sources. One module and one line:
the proof that the next source (`hf:`, issue 33) needs no more. Each check has its negative control (the source
not registered)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memprof
from memprof import cli
from memprof.errors import UsageError
from memprof.model_sources import registry
from memprof.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]

TOY = '''
from memprof.errors import unknown_name
from memprof.model_sources.base import ModelInfo, ModelSource, source_model

WIDTHS = {"tiny": 4, "small": 8}


class ToySource(ModelSource):
    """`toy:tiny`, `toy:small`: a convolution, a flatten and a linear head on 3x8x8 images."""

    name = "toy"

    def names(self):
        return list(WIDTHS)

    def resolve(self, name, simulated=True):
        arch = name.partition(":")[2]
        if arch not in WIDTHS:
            raise unknown_name("toy model", arch, self.names(), "memprof list models --source toy")
        return ModelInfo(name, f"toy {arch}", embedding_modules=("0",), vit=False, source=self.name,
                         input_shape=(3, 8, 8), ckpt_switch=False)

    def build(self, info, num_classes):
        import torch.nn as nn

        width = WIDTHS[info.name.partition(":")[2]]
        net = nn.Sequential(nn.Conv2d(3, width, 3), nn.Flatten(), nn.Linear(width * 6 * 6, num_classes))
        return source_model(net, info.input_shape)
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_memprof_source.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def toy(toy_module):
    registry.register("toy", "toy_memprof_source:ToySource")
    yield
    registry.unregister("toy")


def test_a_registered_source_predicts_through_the_front(toy):
    info = resolve_model("toy:tiny")
    assert (info.source, info.input_shape, info.grad_ckpt_reason) == (
        "toy", (3, 8, 8), "toy:tiny has no gradient-checkpointing switch (set_grad_checkpointing)")
    r = memprof.predict("toy:tiny", "sgd-fe")
    assert r.status == "ok" and r.key.startswith("toy:tiny/sgd-fe/") and r.peak_allocated_bytes > 0
    assert r.frozen_parameter_names == ["visual.0.bias", "visual.0.weight"]  # its declared embedding
    small = memprof.predict("toy:small", "sgd-fe")
    assert small.params_total > r.params_total  # its own networks, not a stand-in
    with pytest.raises(UsageError, match="did you mean tiny"):
        resolve_model("toy:tinny")


def test_a_registered_source_lists_its_names(toy, capsys):
    assert cli.main(["list", "models", "--source", "toy"]) == 0
    out = capsys.readouterr().out
    assert "2 toy models" in out and "toy:NAME" in out and "tiny" in out and "small" in out
    assert cli.main(["list", "models", "--source", "toy", "--filter", "sm*"]) == 0
    assert "tiny" not in capsys.readouterr().out


def test_a_registered_source_runs_a_grid_with_its_skip_reasons(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--models", "toy:tiny", "--optims", "sgd", "--grad-ckpt", "off,on", "--backend",
                     "simulate", "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    records = {r["spec"]["grad_ckpt"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records[False]["status"] == "ok" and records[True]["status"] == "skipped"
    assert "no gradient-checkpointing switch" in records[True]["skip_reason"]
    capsys.readouterr()


def test_negative_control_without_the_source_its_names_are_unknown(toy_module, capsys):
    assert "toy" not in registry.names()
    with pytest.raises(UsageError, match="unknown model 'toy:tiny'"):
        memprof.predict("toy:tiny", "sgd")
    assert cli.main(["list", "models", "--source", "toy"]) == 2
    assert "unknown model source 'toy'" in capsys.readouterr().err
    assert cli.main(["list", "models", "--source", "tim"]) == 2
    assert "did you mean timm" in capsys.readouterr().err


def test_a_registered_name_must_be_a_word():
    with pytest.raises(ValueError, match="letters, digits"):
        registry.register("to y", "x:y")


def test_an_entry_point_source_serves_the_command_line(toy_module, tmp_path):
    """Installed the way pip installs a package (a dist-info with the entry point): `memprof list models --source
    toy` and a run in another process find it; without the entry point they do not (negative control)."""
    info = toy_module / "toy_memprof_source-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-memprof-source\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[memprof.model_sources]\ntoy = toy_memprof_source:ToySource\n")

    def memprof_cli(*args, plugin=True):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in ((toy_module,) if plugin else ()) + (ROOT,))}
        return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, env=env,
                              timeout=600)

    listed = memprof_cli("list", "models", "--source", "toy")
    assert listed.returncode == 0 and "tiny" in listed.stdout, listed.stderr
    missing = memprof_cli("list", "models", "--source", "toy", plugin=False)
    assert missing.returncode == 2 and "unknown model source 'toy'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_built_in_sources_are_one_registry_line_each():
    """Every built-in source is a module of its own named by one registry line, loaded only when asked for."""
    assert set(registry.BUILTIN) == {"open_clip", "timm", "torchvision", "py", "hf"}
    for name, path in registry.BUILTIN.items():
        module, _, attr = path.partition(":")
        assert module == f"memprof.model_sources.{name}" and registry.get(name).name == name


def test_what_the_engine_and_the_api_ask_of_a_source(toy):
    """Answered by the source, not by its name: whether its forward may be traced once for every optimizer, whether a
    name is known in this process alone, whether --input-shape applies (negative controls: a user's factory)."""
    from memprof.model_sources.py import factory_name
    from memprof.models import local_only, rebuilds_alike, takes_input_shape

    assert rebuilds_alike("toy:tiny") and rebuilds_alike("vit-b-16") and not rebuilds_alike("py:mod:factory")
    local = factory_name(lambda: None)
    assert local_only(local) and not local_only("py:mod:factory") and not local_only("toy:tiny")
    assert takes_input_shape(resolve_model("toy:tiny")) and not takes_input_shape(resolve_model("test-vit"))
