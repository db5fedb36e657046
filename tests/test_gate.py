"""The CI memory-regression gate: the CI suite against the committed baseline, and its negative controls.

The suite runs into a temporary directory (nothing is written into the checkout).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "reports" / "baselines" / "ci.json"


pytestmark = pytest.mark.bitsandbytes  # suites/ci.toml has 8-bit configurations


def memprof(*args):
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci-gate")
    r = memprof("suite", "suites/ci.toml", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out / "results.jsonl"


def test_ci_suite_matches_committed_baseline(ci_results):
    """The gate itself: any configuration needing more memory than the committed baseline fails here."""
    r = memprof("compare", str(BASELINE), str(ci_results), "--fail", "peak_allocated:0%", "--fail",
                "peak_reserved:0%", "--fail", "peak_live:0%")
    assert r.returncode == 0, r.stdout
    assert "no regression" in r.stdout


def _edited(ci_results, tmp_path, key_part, edit):
    records = [json.loads(line) for line in ci_results.read_text().splitlines()]
    hit = [r for r in records if key_part in r["key"]]
    assert hit
    edit(hit[0])
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, hit[0]["key"]


def test_an_extra_retained_tensor_is_caught(ci_results, tmp_path, monkeypatch):
    """Measure test-vit SGD on the CPU with one extra 64 KiB tensor kept alive: compare must fail on it."""
    import torch

    from memprof.backends import cpu as cpu_backend

    from memprof.simulation import tracing
    from memprof.spec import RunSpec

    original = tracing.train_steps
    kept = []

    def leaky(model, optimizer, spec, device, on_phase):
        def phase(name, step):
            if name == "forward" and not kept:
                kept.append(torch.empty(16384))
            on_phase(name, step)
        original(model, optimizer, spec, device, phase)

    monkeypatch.setattr(tracing, "train_steps", leaky)
    spec = RunSpec("test-vit", "sgd", steps=3, budget="device")
    status, leaked = cpu_backend.measure(spec)
    path, key = _edited(ci_results, tmp_path, spec.key, lambda r: r.update(metrics=leaked))
    r = memprof("compare", str(BASELINE), str(path), "--fail", "peak_live:0%")
    assert r.returncode == 1, r.stdout
    assert key in r.stdout and "REGRESSION" in r.stdout and "1 regression" in r.stdout


def test_a_newly_oom_config_fails(ci_results, tmp_path):
    path, key = _edited(ci_results, tmp_path, "vit-b-16/adamw/ckpt-off", lambda r: r.update(status="oom"))
    r = memprof("compare", str(BASELINE), str(path))
    assert r.returncode == 1 and f"{key}: newly oom" in r.stdout


def test_thresholds_allow_what_they_say(ci_results, tmp_path):
    def grow(r):
        r["metrics"]["peak_allocated_bytes"] = int(r["metrics"]["peak_allocated_bytes"] * 1.005)

    path, _ = _edited(ci_results, tmp_path, "vit-b-16/sgd-fe/ckpt-off", grow)
    assert memprof("compare", str(BASELINE), str(path), "--fail", "peak_allocated:1%").returncode == 0
    assert memprof("compare", str(BASELINE), str(path), "--fail", "peak_allocated:0.1%").returncode == 1
    assert memprof("compare", str(BASELINE), str(path), "--fail", "peak_allocated:100000000").returncode == 0


def test_dropped_configs_fail_unless_allowed_and_versions_come_from_the_records(ci_results, tmp_path):
    """A configuration missing from the current run fails the gate (exit 1) unless --allow-missing; the
    torch version the warning compares is the one the records ran with, not this Python's."""
    records = [json.loads(line) for line in ci_results.read_text().splitlines()]
    records[0]["environment"]["torch"] = "0.0.1"
    dropped = records.pop()
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = memprof("compare", str(BASELINE), str(path))
    assert r.returncode == 1 and f"{dropped['key']}: missing in current" in r.stdout
    assert "warning: torch differs" in r.stdout and "0.0.1" in r.stdout
    r = memprof("compare", str(BASELINE), str(path), "--allow-missing")
    assert r.returncode == 0 and f"missing in current (allowed): {dropped['key']}" in r.stdout


def test_versions_unchanged_give_no_warning(ci_results):
    """Negative control of the version warning: the same records against themselves warn about nothing."""
    r = memprof("compare", str(ci_results), str(ci_results))
    assert r.returncode == 0 and "differs" not in r.stdout


def test_a_shrinking_prediction_fails_and_a_shrinking_measurement_passes(ci_results, tmp_path):
    """The simulation is deterministic: a predicted figure that moves down fails too (a rule may have stopped
    applying) until the baseline is updated; a measured figure may shrink."""
    def shrink(r):
        r["metrics"]["peak_allocated_bytes"] -= 512

    path, key = _edited(ci_results, tmp_path, "vit-b-16/sgd-fe/ckpt-off/32bit", shrink)
    r = memprof("compare", str(BASELINE), str(path), "--fail", "peak_allocated:0%")
    assert r.returncode == 1 and f"{key}: peak_allocated shrank" in r.stdout
    cpu_key = next(json.loads(line)["key"] for line in ci_results.read_text().splitlines() if "@cpu" in line)

    def shrink_live(r):
        r["metrics"]["peak_live_bytes"] -= 512

    path, key = _edited(ci_results, tmp_path, cpu_key, shrink_live)
    assert memprof("compare", str(BASELINE), str(path), "--fail", "peak_live:0%").returncode == 0


def test_nothing_in_common_is_a_usage_error(ci_results, tmp_path):
    records = [json.loads(line) for line in ci_results.read_text().splitlines()]
    for rec in records:
        rec["key"] = "renamed/" + rec["key"]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = memprof("compare", str(BASELINE), str(path))
    assert r.returncode == 2 and "no configuration in common" in r.stderr and "Traceback" not in r.stderr


def test_the_readme_gate_example_passes_on_a_fresh_run(ci_results, tmp_path):
    """README's `memprof compare` line, run as written (with the fresh suite's results), must pass."""
    readme = (ROOT / "README.md").read_text()
    line = next(x.strip() for x in readme.splitlines() if x.strip().startswith("memprof compare "))
    args = line.split()[1:]
    args = [str(ci_results) if a.startswith("reports/runs/") else a for a in args]
    r = memprof(*args)
    assert r.returncode == 0, (line, r.stdout)
    assert re.search(r"no regression \(\d+ comparisons", r.stdout)


def test_a_vanished_field_or_a_newly_skipped_config_fails(ci_results, tmp_path):
    path, key = _edited(ci_results, tmp_path, "vit-l-14/sgd/ckpt-off/32bit", lambda r: r["metrics"].pop("peak_reserved_bytes"))
    r = memprof("compare", str(BASELINE), str(path))
    assert r.returncode == 1 and f"{key}: peak_reserved is missing now" in r.stdout
    path, key = _edited(ci_results, tmp_path, "vit-l-14/sgd/ckpt-off/32bit", lambda r: r.update(status="skipped"))
    r = memprof("compare", str(BASELINE), str(path))
    assert r.returncode == 1 and f"{key}: newly skipped" in r.stdout


@pytest.mark.parametrize("args, expect", [
    (["compare", "reports/baselines/ci.json", "reports/baselines/ci.json", "--fail", "peak:abc"], "use FIELD:N%"),
    (["compare", "reports/baselines/ci.json", "reports/baselines/ci.json", "--fail", "peak_alocated:0%"],
     "no configuration has that field"),
    (["compare", "reports/baselines/missing.json", "reports/baselines/ci.json"], "no baseline or results at"),
    (["suite", "suites/nonexistent.toml"], "suites/nonexistent.toml"),
])
def test_bad_gate_input_is_exit_2(args, expect):
    r = memprof(*args)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr


def test_suite_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nbackend = "simulate"\nmodels = "test-vit"\noptimz = "sgd"\n')
    r = memprof("suite", str(bad))
    assert r.returncode == 2 and f"{bad}:4: unknown key 'optimz'" in r.stderr
    bad.write_text('[[run]]\nmodels = "test-vit"\n\n[[run]]\nmodels = "test-vit"\nbudget = "huge"\n')
    r = memprof("suite", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}:6: unknown budget 'huge'" in r.stderr
    bad.write_text('[[run]]\nmodels = "vit-b-61"\n')
    r = memprof("suite", str(bad))
    assert r.returncode == 2 and f"{bad}:2: unknown model 'vit-b-61'" in r.stderr


def test_compare_reads_pytest_benchmark_json(tmp_path):
    def bench(mean):
        return {"machine_info": {"node": "x"}, "commit_info": {}, "datetime": "2026-01-01", "version": "5.3.1",
                "benchmarks": [{"name": "test_predict[vit-b-16]", "fullname": "b.py::test_predict[vit-b-16]",
                                "params": {"model": "vit-b-16"}, "stats": {"min": mean, "mean": mean},
                                "extra_info": {"peak_allocated_bytes": 100}}]}

    (tmp_path / "a.json").write_text(json.dumps(bench(1.0)))
    (tmp_path / "b.json").write_text(json.dumps(bench(1.3)))
    ok = memprof("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--fail", "mean:50%")
    bad = memprof("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--fail", "mean:20%")
    assert ok.returncode == 0 and bad.returncode == 1 and "b.py::test_predict[vit-b-16]" in bad.stdout


def test_committed_suites_parse():
    from memprof.suite import load_suite

    for name in ("table4", "ci", "full"):
        assert load_suite(str(ROOT / "suites" / f"{name}.toml"))
    assert os.path.exists(BASELINE)
