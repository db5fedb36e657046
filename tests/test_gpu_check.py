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
    # the first stage's time: its two scripts and the cuDNN workspace probe that follows them
    assert rows[0]["estimate_s"] == 2 * check.SCRIPT_ESTIMATE_S + check.CONV_PROBE_ESTIMATE_S
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


def _probe():
    spec = importlib.util.spec_from_file_location("conv_probe", ROOT / "scripts" / "conv_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_conv_probe_measures_the_validation_rows_patch_embeddings():
    """scripts/conv_probe.py measures the convolution the half-precision validation rows run: torchvision's conv_proj
    of vit_b_16 and vit_l_16 at the rows' batches (16, 32), in bf16, fp16 and fp32. By hand: ViT-B/16's bf16
    output at batch 16 is 16 x 768 x 14 x 14 x 2 B = 4,816,896 B (the block the simulation frees after the patch
    embedding); its weight 768 x 3 x 16 x 16."""
    import math

    import torch
    import torchvision

    probe = _probe()
    rows = probe.problems()
    assert [(r["model"], r["batch"], r["dtype"]) for r in rows] == [
        (m, b, d) for m, b in (("vit_b_16", 16), ("vit_l_16", 32)) for d in ("bfloat16", "float16", "float32")]
    with torch.device("meta"):
        for r in rows:
            conv = getattr(torchvision.models, r["model"])().conv_proj
            assert list(conv.weight.shape) == r["weight"] and conv.stride == (16, 16) and conv.padding == (0, 0)
            out = conv(torch.empty(r["input"], device="meta"))
            assert list(out.shape) == r["output"]
    b16 = next(r for r in rows if (r["model"], r["dtype"]) == ("vit_b_16", "bfloat16"))
    assert math.prod(b16["output"]) * 2 == 4_816_896 and b16["weight"] == [768, 3, 16, 16]
    # the validation table predicts the same batches the probe measures
    spec = importlib.util.spec_from_file_location("validation_bench", ROOT / "benchmarks" / "validation.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["validation_bench"] = bench  # (its dataclasses look their module up there)
    spec.loader.exec_module(bench)
    batches = {(row.args[1], int(row.args[5])) for row in bench.ROWS if row.script == "raschka_vit_precision.py"}
    assert batches == {(m, b) for m, b, _ in probe.MODELS}


class _FakeCuda:
    """torch.cuda's counters, for transient_bytes: `allocated` now, the peak since the last reset."""

    def __init__(self, allocated):
        self.allocated = self.peak = allocated

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def synchronize(self):
        pass

    def reset_peak_memory_stats(self):
        self.peak = self.allocated

    def max_memory_allocated(self):
        return self.peak

    def memory_allocated(self):
        return self.allocated


def test_the_probe_reads_what_an_op_held_beyond_its_outputs():
    """transient_bytes: with 100 MiB already allocated, an op that leaves a 4,816,896 B output and held a
    167,772,160 B workspace while it ran reads 167,772,160 B; one that allocates only its output reads 0 (the
    negative control: an output is not a transient)."""
    from types import SimpleNamespace

    probe = _probe()
    cuda = _FakeCuda(100 << 20)
    fake_torch = SimpleNamespace(cuda=cuda)

    def with_workspace():
        cuda.alloc(4_816_896)  # the output
        cuda.alloc(160 << 20)  # cuDNN's workspace (run_conv_plan), freed when the op returns
        cuda.alloc(-(160 << 20))
        return "out"

    assert probe.transient_bytes(fake_torch, with_workspace) == (167_772_160, "out")
    assert probe.transient_bytes(fake_torch, lambda: cuda.alloc(4_816_896)) == (0, None)


def test_the_probe_refuses_without_a_gpu(tmp_path):
    """Here (no GPU) the probe says so and exits 2 with nothing written: it measures a device, it predicts nothing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the probe measures")
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "conv_probe.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not out.exists()


def test_the_first_stage_runs_the_conv_probe_and_logs_its_bytes(tmp_path, monkeypatch):
    """run_conv_probe starts scripts/conv_probe.py with --out in the scratch folder (so its JSON travels in the
    tarball) and logs each problem's bytes; a probe that fails is the stage's problem (negative control), and one
    with no room before the deadline is not started."""
    check = _module()
    report = {"torch": "2.x", "cudnn": 91900, "device": "NVIDIA H200", "problems": [
        {"model": "vit_b_16", "batch": 16, "dtype": "bfloat16", "forward_transient_bytes_call1": 0,
         "forward_transient_bytes_call2": 0, "wgrad_transient_bytes_call1": 167772160,
         "wgrad_transient_bytes_call2": 167772160},
        {"model": "vit_l_16", "batch": 32, "dtype": "float32", "error": "RuntimeError: no engine"}]}
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        path = cmd[cmd.index("--out") + 1]
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(report), "")

    monkeypatch.setattr(check.subprocess, "run", fake_run)
    lines = []
    assert check.run_conv_probe(str(tmp_path), time.monotonic() + 60, lines.append) == ""
    assert calls[0][1].endswith(check.CONV_PROBE) and calls[0][-1] == str(tmp_path / check.CONV_PROBE_OUT)
    assert "weight gradient 167772160 / 167772160 B" in " ".join(lines) and "RuntimeError: no engine" in lines[-1]
    monkeypatch.setattr(check.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom"))
    assert check.run_conv_probe(str(tmp_path), time.monotonic() + 60, lines.append) == f"{check.CONV_PROBE}: rc=1"
    assert check.run_conv_probe(str(tmp_path), time.monotonic(), lines.append).startswith("deadline")
