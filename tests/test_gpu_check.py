"""The GPU check rehearsed here (scripts/gpu_check.py without a GPU: test-vit on the cpu backend): what it would
bring back through the device tool (at most 8 plainly named files, none deeper than 2 folders, at most 16 MiB
each), after every stage and after a kill; its planned device time; its deadline and its canary."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PLAIN = re.compile(r"^[A-Za-z0-9._-]+$")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def returnable(out: Path) -> list[str]:
    """What the device tool would not bring back from `out` (empty: everything comes back)."""
    problems, files = [], [p for p in out.rglob("*") if p.is_file()]
    if len(files) > 8:
        problems.append(f"{len(files)} files (at most 8)")
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if p.is_file() and len(rel.parts) > 3:
            problems.append(f"{rel}: deeper than 2 folders")
        if not all(PLAIN.match(part) for part in rel.parts):
            problems.append(f"{rel}: not a plain name")
        if p.is_file() and p.stat().st_size > 16 << 20:
            problems.append(f"{rel}: over 16 MiB")
    return problems


def _run(out: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=full, capture_output=True, text=True,
                          timeout=timeout)


QUICK = "--skip=gpu-tests,setups,vit-b-16,emulated-12g,cudnn-attention"


def test_returnable_catches_what_the_device_tool_drops(tmp_path):
    """Negative control of the check below: too many files, a name with '@', a file three folders down."""
    for i in range(9):
        (tmp_path / f"f{i}").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep").write_text("x")
    (tmp_path / "k@cuda.json").write_text("x")
    problems = " ".join(returnable(tmp_path))
    assert "11 files" in problems and "deeper than 2 folders" in problems and "not a plain name" in problems


def test_the_planned_device_time_fits_the_deadline():
    """Planned from the stage list itself (configurations x estimated seconds each): well under the 8-minute
    deadline, which is well inside one 10-minute device command; a stage list that cannot fit says so."""
    check = _module()
    rows = check.plan()
    assert [r["stage"] for r in rows][:3] == ["half-precision", "canary", "paper"]  # the half-precision scripts first
    assert rows[0]["configs"] == len(check.HALF_SCRIPTS) == 2 and rows[2]["configs"] == 11 and check.planned_s(rows)  # the canary is measured once <= check.DEADLINE_S <= 8 * 60
    assert check.PER_CONFIG_TIMEOUT_S <= 60
    big = check.Stage("too-much", (check.Grid({"models": "vit-h-14", "optims": "all", "batch_size": "1,2,4,8,16"},
                                              "cuda"),))
    assert check.planned_s(check.plan(stages=(*check.STAGES, big))) > check.DEADLINE_S  # negative control


def test_a_deadline_with_no_room_left_starts_nothing(tmp_path):
    check = _module()
    grid = check.Grid({"models": "test-vit", "optims": "sgd"}, "cuda")
    done, why = check.measure_grid(grid, str(tmp_path), "cpu", True, time.monotonic(), lambda _: None)
    assert done == 0 and why.startswith("deadline") and not (tmp_path / "cuda" / "results.jsonl").exists()
    done, why = check.measure_grid(grid, str(tmp_path), "cpu", True, time.monotonic() + 60, lambda _: None)
    assert (done, why) == (1, "")  # negative control: with room, it measures


def test_carried_predictions_serve_only_under_the_same_versions_and_card(tmp_path, monkeypatch):
    check = _module()
    here = check.versions()
    record = {"key": "k@simulate", "spec": {"model": "test-vit", "optim": "sgd", "budget": "143771MiB@9.0"},
              "status": "ok", "source": "predicted",
              "metrics": {}, "environment": {"torch": here["torch"], "open_clip_torch": here["open_clip_torch"],
                                             "timm": here["timm"]}}
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / check.ENGINE_DIGEST_FILE).write_text(check.engine_digest() + "\n")
    monkeypatch.setattr(check, "PREDICTED_DIR", str(tmp_path))
    records, why = check.carried_predictions("143771MiB@9.0", dry=False)
    assert records and "carried predictions made under" in why
    assert check.carried_predictions("81559MiB@9.0", dry=False)[0] is None  # another card
    records, _ = check.carried_predictions("143770MiB@9.0", dry=False)  # the same card, a MiB apart
    assert records[0]["spec"]["budget"] == "143770MiB@9.0"
    assert check.carried_predictions("143771MiB@8.0", dry=False)[0] is None  # another compute capability
    record["environment"]["torch"] = "1.13.1+cu117"
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    records, why = check.carried_predictions("143771MiB@9.0", dry=False)
    assert records is None and "1.13.1" in why
    record["environment"]["torch"] = here["torch"]  # the versions match again, but another engine made them
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / check.ENGINE_DIGEST_FILE).write_text("0" * 64 + "\n")
    records, why = check.carried_predictions("143771MiB@9.0", dry=False)
    assert records is None and "another version of the engine" in why


def test_the_committed_predictions_were_made_by_this_engine():
    """reports/gpu/predicted/ is regenerated (`scripts/gpu_check.py --predict`, under the device's torch) whenever
    the engine changes; a stale set would be refused on the device and predicted again there."""
    check = _module()
    with open(os.path.join(check.PREDICTED_DIR, check.ENGINE_DIGEST_FILE), encoding="ascii") as fh:
        assert fh.read().strip() == check.engine_digest()


def test_the_committed_predictions_are_for_the_lent_h200_and_every_measured_configuration():
    """reports/gpu/predicted/ holds a prediction for every configuration the check grades, made for the H200's
    budget (and the emulated 12 GB card), under one torch version."""
    from memprof.results import read_records

    check = _module()
    records = check.read_predictions(check.PREDICTED_DIR)
    keys = {(r.get("fidelity_group"), r["key"]) for r in records}
    assert len({r["environment"]["torch"] for r in records}) == 1 and {r["source"] for r in records} == {"predicted"}
    for stage in check.STAGES:
        for grid in stage.grids:
            if grid.fidelity == "none":
                continue
            group = check.CUDNN if grid.fidelity == check.CUDNN else None
            for entry in check.entries_of(grid, "143771MiB@9.0", dry=False):
                assert (group, f"{entry.spec.key}@simulate") in keys, (group, entry.spec.key)
    # the grids' two attention settings: flash where cuDNN attention is off, cuDNN where it is on (the H200 prefers
    # it); a script runs torch's default kernels, as it is measured
    kernels = {(r.get("fidelity_group"), k) for r in records if not r["spec"]["model"].startswith("script:")
               for k in r["metrics"].get("attention_kernels", {})}
    assert kernels == {(None, "flash"), (check.CUDNN, "cudnn")}, kernels
    assert {k for r in records if r["spec"]["model"].startswith("script:")
            for k in r["metrics"].get("attention_kernels", {})} == {"cudnn"}
    scripts = [r for r in records if r["spec"]["model"].startswith("script:")]
    assert len(scripts) == len(check.SCRIPTS) + len(check.HALF_SCRIPTS) and all(r["status"] == "ok" for r in scripts)


def test_a_kill_after_the_first_stage_leaves_its_results_in_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(out, QUICK, env={"MEMPROF_GPU_CHECK_KILL_AFTER": "canary"})
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert returnable(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(_module().OUT_FILES)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        results = tar.extractfile("cuda/results.jsonl").read().decode()
        assert "gpu_check.log" in tar.getnames()
    assert [json.loads(line)["status"] for line in results.splitlines()] == ["ok"]
    assert "stage paper" not in (out / "gpu_check.log").read_text()


def test_a_failed_canary_stops_the_check_with_its_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(out, QUICK, env={"MEMPROF_TEST_CRASH": "test-vit/adamw/ckpt-off"})
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 1 and "the canary failed" in log and "crashed" in log
    assert "stage paper" not in log and returnable(out) == []


@pytest.mark.slow
def test_the_whole_rehearsal_brings_back_every_stage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(out, "--skip=gpu-tests", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert returnable(out) == []
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"cuda/results.jsonl", "cuda-12g/results.jsonl", "cuda-cudnn/results.jsonl",
            "predicted/results.jsonl"} <= names
    fidelity_12g = (out / "fidelity-12g.md").read_text()
    assert "not measured yet" not in fidelity_12g
