"""The command line end to end, in a subprocess: a real run, and every bad input as a one-line exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="assumes no CUDA GPU is present")


def _openai_cached() -> bool:
    from memprof.errors import UsageError
    from memprof.model_sources.open_clip import REGISTRY, cached_pretrained_file

    try:
        cached_pretrained_file(REGISTRY["vit-b-16"], "openai")
        return True
    except UsageError:
        return False


def memprof(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@NO_GPU  # the auto backend is simulate only without a GPU
@pytest.mark.bitsandbytes
def test_run_writes_records_and_reports(tmp_path):
    out = tmp_path / "run"
    r = memprof("run", "--models", "test-vit", "--optims", "adamw,sgd-fe,sgd-fe-nomom", "--grad-ckpt", "off,on",
                "--state-bits", "32,8", "--jobs", "1", "--out", str(out))  # in one process (workers: below)
    assert r.returncode == 0, r.stderr
    assert "backend simulate" in r.stderr and "predicted" in r.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 2
    assert {r["source"] for r in records} == {"predicted"}
    assert all(r["environment"]["device"] == "cpu-simulated" for r in records)
    skipped = [r for r in records if r["status"] == "skipped"]
    assert len(skipped) == 2 and all("keeps no optimizer state" in r["skip_reason"] for r in skipped)  # nomom 8-bit
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 10 and all(r["metrics"]["peak_allocated_bytes"] > 0 for r in ok)
    for ext in ("md", "csv", "json", "png"):
        assert (out / f"table4.{ext}").stat().st_size > 0
    assert "AdamW  " in r.stdout and "predicted" in r.stdout


def test_table_rerenders_from_results(tmp_path):
    out = tmp_path / "run"
    assert memprof("run", "--models", "test-vit", "--optims", "adamw,sgd", "--jobs", "1", "--out", str(out),
                   "--no-progress").returncode == 0
    r = memprof("table", str(out / "results.jsonl"), "--metric", "allocated", "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert "max_memory_allocated" in (tmp_path / "t" / "table4.md").read_text()


def test_list_commands():
    r = memprof("list", "optims")
    assert r.returncode == 0 and "sgd-fe-nomom" in r.stdout and "timm.optim.Lamb" in r.stdout
    r = memprof("list", "models")
    assert r.returncode == 0 and "vit-h-14" in r.stdout and "ViT-g-14" in r.stdout


@pytest.fixture(scope="module")
def tower_file(tmp_path_factory):
    import torch

    from memprof.model_sources.open_clip import REGISTRY
    from memprof.models import build_model

    path = tmp_path_factory.mktemp("w") / "test-vit.pt"
    torch.save(build_model(REGISTRY["test-vit"], 10).visual.state_dict(), path)
    return path


def test_pretrained_local_file_is_accepted(tmp_path, tower_file):
    r = memprof("run", "--models", "test-vit", "--optims", "sgd", "--pretrained", str(tower_file),
                "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, expect", [
    (["run", "--models", "vit-b-61"], "did you mean vit-b-16"),
    (["run", "--models", "vit-b-16", "--optims", "adamww"], "did you mean adamw"),
    (["run", "--models", "vit-b-16", "--optims", "sgd-fe-nomon"], "memprof list optims"),
    (["run", "--models", ","], "--models is empty"),
    (["run", "--optims", ""], "--optims is empty"),
    (["run", "--budget", "12 gigs"], "malformed --budget"),
    (["run", "--budget", "titanx"], "did you mean titan-x"),
    (["run", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["run", "--batch-size", "two"], "whole numbers"),
    (["run", "--grad-ckpt", "maybe"], "use off, on or off,on"),
    (["run", "--state-bits", "4"], "use 32, 8 or 32,8"),
    (["run", "--steps", "1"], "at least 2"),
    (["run", "--out", "/proc/memprof-cannot-write"], "is not writable"),
    (["run", "--models", "test-vit", "--pretrained", "/nonexistent/weights.pt"], "no such file"),
    pytest.param(["run", "--models", "vit-b-16", "--pretrained", "openai"], "not in the local cache",
                 marks=pytest.mark.skipif(_openai_cached(), reason="the openai weights are cached here")),
    (["run", "--models", "vit-b-16", "--pretrained", "no-such-tag"], "not a known tag"),
    (["run", "--backend", "quantum"], "unknown backend 'quantum'"),
    (["run", "--backend", "simulat"], "did you mean simulate"),
    pytest.param(["run", "--backend", "cuda"], "needs a CUDA GPU", marks=NO_GPU),
    (["run", "--backend", "simulate", "--budget", "device"], "predicts for a named card"),
    (["run", "--resume"], "--resume needs --out"),
    (["fidelity", "/nonexistent/a", "/nonexistent/b"], "no results at"),
    (["run", "--backend", "cpu", "--timeout-s", "-1"], "give a positive number"),
    (["table", "."], ". has no results.jsonl: give a run directory written by `memprof run --out DIR`"),
    (["baseline", "save", "."], ". has no results.jsonl"),
    (["table", "/nonexistent/results.jsonl"], "no results at"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(args, expect, tmp_path):
    r = memprof(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("memprof: error:") and expect in lines[0], lines[0]


def test_pretrained_not_loadable_and_mismatched(tmp_path, tower_file):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = memprof("run", "--models", "test-vit", "--pretrained", str(junk), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "not loadable" in r.stderr and "Traceback" not in r.stderr
    r = memprof("run", "--models", "vit-b-16", "--pretrained", str(tower_file), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "does not match this architecture" in r.stderr


def test_failing_config_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    from memprof.simulation import simulate
    from memprof.model_sources.open_clip import REGISTRY as MODELS
    from memprof.optims import REGISTRY as OPTIMS
    from memprof.executors.runner import run_grid
    from memprof.spec import expand_grid

    original = simulate.prediction

    def broken(spec, **kwargs):
        if spec.optim == "sgd":
            raise RuntimeError("injected failure")
        return original(spec, **kwargs)

    monkeypatch.setattr(simulate, "prediction", broken)
    entries = expand_grid([MODELS["test-vit"]], [OPTIMS["adamw"], OPTIMS["sgd"], OPTIMS["sgd-fe"]], [False], [32], [1])
    records = run_grid(entries, str(tmp_path), progress=False, jobs=1)
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "injected failure" in records[1]["error"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_parallel_and_serial_runs_agree(tmp_path):
    from memprof.model_sources.open_clip import REGISTRY as MODELS
    from memprof.optims import REGISTRY as OPTIMS
    from memprof.executors.runner import run_grid
    from memprof.spec import expand_grid

    entries = expand_grid([MODELS["test-vit"]], [OPTIMS["adamw"], OPTIMS["sgd"], OPTIMS["lamb"]], [False, True], [32], [1])
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    serial = run_grid(entries, str(tmp_path / "a"), progress=False, jobs=1)
    parallel = run_grid(entries, str(tmp_path / "b"), progress=False, jobs=2)
    assert [r["status"] for r in parallel] == ["ok"] * 6, [r["error"] for r in parallel]
    assert [r["metrics"] for r in serial] == [r["metrics"] for r in parallel]
