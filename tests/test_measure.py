"""Measuring backends without a GPU: the cpu backend, process isolation, crash/OOM recording, resume,
budget emulation arithmetic, fidelity; GPU-only checks carry the `gpu` marker."""

import json
import signal
import subprocess
import sys
import time

import pytest

from memprof.backends import cpu as cpu_backend
from memprof.budget import GiB
from memprof.backends.cuda import emulation_fraction, requested_bytes
from memprof.errors import UsageError
from memprof.model_sources.open_clip import REGISTRY as MODELS
from memprof.optims import REGISTRY as OPTIMS
from memprof.reports.fidelity import fidelity_rows, render_fidelity
from memprof.executors.runner import run_grid, run_isolated
from memprof.results import environment, make_record
from memprof.simulation.simulate import predict_cpu
from memprof.spec import RunSpec, expand_grid


@pytest.mark.parametrize("optim, ckpt, batch", [("adamw", False, 1), ("sgd-fe", True, 1), ("lamb", False, 4),
                                                ("sgd-fe-nomom", True, 4)])
def test_cpu_measurement_equals_prediction_under_cpu_rules(optim, ckpt, batch):
    spec = RunSpec("test-vit", optim, grad_ckpt=ckpt, batch_size=batch, budget="device")
    status, measured = cpu_backend.measure(spec)
    _, predicted = predict_cpu(spec)
    assert status == "ok"
    for field in ("peak_live_bytes", "phase_peak_live_bytes", "breakdown_at_peak_bytes", "optimizer_state_bytes"):
        assert measured[field] == predicted[field], field
    assert measured["step_ms_median"] > 0


@pytest.mark.parametrize("kw", [dict(precision="bf16-amp"), dict(precision="fp16-amp", optim_impl="fused"),
                                dict(precision="bf16", optim_impl="forloop"), dict(optim_in_backward=True),
                                dict(precision="bf16-amp", optim_impl="fused", optim_in_backward=True)])
def test_cpu_measurement_equals_prediction_on_the_new_axes(kw):
    """Precision (CPU autocast in bf16/fp16, its GradScaler; the bf16 model), fused/for-loop optimizers and
    optimizer-in-backward: the cpu backend's live bytes equal the fake-tensor trace under CPU rules."""
    spec = RunSpec("test-vit", "adamw", batch_size=2, budget="device", **kw)
    status, measured = cpu_backend.measure(spec)
    _, predicted = predict_cpu(spec)
    assert status == "ok"
    for field in ("peak_live_bytes", "phase_peak_live_bytes", "breakdown_at_peak_bytes", "optimizer_state_bytes",
                  "floor_bytes"):
        assert measured[field] == predicted[field], field


def test_cpu_budget_is_an_oom_result():
    status, m = cpu_backend.measure(RunSpec("test-vit", "adamw", budget="401MiB"))  # 1 MiB usable
    assert status == "oom"
    assert m["oom"]["phase"] == "optimizer" and m["oom"]["requested_bytes"] > 0
    assert m["oom"]["live_bytes"] > m["oom"]["usable_bytes"]


def test_isolated_worker_measures():
    out = run_isolated(RunSpec("test-vit", "sgd", budget="device"), "cpu")
    assert out["status"] == "ok" and out["device"].startswith("cpu")
    assert out["metrics"]["peak_live_bytes"] > 0


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_killed_worker_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPROF_TEST_CRASH", "/sgd/")
    entries = expand_grid([MODELS["test-vit"]], [OPTIMS["adamw"], OPTIMS["sgd"], OPTIMS["sgd-fe"]], [False], [32], [1],
                          budget="device")
    records = run_grid(entries, str(tmp_path), "cpu", progress=False)
    assert [r["status"] for r in records] == ["ok", "crashed", "ok"]
    assert "killed by SIGKILL" in records[1]["error"] and records[1]["metrics"]["exit_code"] == -9
    assert {r["source"] for r in records} == {"measured"}
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    assert records[1]["environment"]["device"].startswith("cpu")  # named by the parent, though the worker died
    from memprof.reports.table4 import render_markdown, write_reports

    write_reports(records, str(tmp_path), "live")  # a crashed configuration is a cell, not a traceback
    assert "crashed (see results.jsonl)" in render_markdown(records, "live")


def test_worker_runtime_error_is_an_error_record(tmp_path):
    out = run_isolated(RunSpec("test-vit", "sgd", budget="device", pretrained="/nonexistent.pt"), "cpu")
    assert out["status"] == "error" and "no such file" in out["error"]


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_resume_and_interrupt(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "memprof", "run", "--backend", "cpu", "--models", "test-vit", "--optims",
           "adamw,sgd,sgd-fe,sgd-fe-nomom", "--grad-ckpt", "off,on", "--steps", "40", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first configuration finished
    _, err = proc.communicate(timeout=120)
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    # a run that ignored SIGINT would finish all 8 configurations and exit 0; 8 rather than 4 so that the
    # configurations in flight when the signal lands cannot be all that is left. 40 steps make each take a third of a
    # second on 2 cores (at 2 steps the 7 after the first finish within one poll, and the signal lands after all 8)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert 1 <= len(kept) < 8 and all(r["status"] == "ok" for r in kept)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(kept)} configurations already" in r.stderr
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert len(keys) == 8 and len(set(keys)) == 8  # nothing lost, nothing run twice


def test_emulation_fraction():
    # a 12 GiB card with a 500 MiB context, emulated on an 80 GiB device
    f = emulation_fraction(12 * GiB, 500 << 20, 80 * GiB)
    assert f * 80 * GiB == pytest.approx(12 * GiB - (500 << 20))
    with pytest.raises(UsageError, match="larger than this GPU"):
        emulation_fraction(141 * GiB, 500 << 20, 80 * GiB)


def test_requested_bytes_from_oom_message():
    msg = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 11.91 GiB"
    assert requested_bytes(msg) == int(2.5 * GiB)
    assert requested_bytes("Tried to allocate 512.00 KiB") == 512 * 1024
    assert requested_bytes("something else") is None


def _record(key, source, alloc, reserved, status="ok", device="NVIDIA H200"):
    """A record of the configuration `key` names (model/optim/.../steps/budget), as `memprof run` writes it."""
    model, optim, _, _, _, _, steps, budget = key.split("/")
    spec = RunSpec(model, optim, steps=int(steps.removeprefix("steps")), budget=budget)
    return make_record(spec, status, source, environment("cuda" if source == "measured" else "simulate", device),
                       {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved})


def test_fidelity_rows_match_configs_across_budgets():
    measured = [_record("vit-b-16/sgd/ckpt-off/32bit/bs1/fp32/steps2/device", "measured", 100, 200),
                _record("vit-b-16/adamw/ckpt-off/32bit/bs1/fp32/steps2/device", "measured", 100, 200, "oom")]
    predicted = [_record("vit-b-16/sgd/ckpt-off/32bit/bs1/fp32/steps2/143771MiB@9.0", "predicted", 110, 200),
                 _record("vit-b-16/adamw/ckpt-off/32bit/bs1/fp32/steps2/143771MiB@9.0", "predicted", 100, 200)]
    rows = fidelity_rows(measured, predicted)
    assert len(rows) == 1  # the OOM measurement has no peak to grade
    assert rows[0]["allocated_error_pct"] == 10.0 and rows[0]["reserved_error_pct"] == 0.0
    assert rows[0]["config"] == "vit-b-16/sgd/ckpt-off/32bit/bs1/fp32"
    assert "10.00%" in render_fidelity(measured, predicted)


def test_fidelity_pairs_by_the_spec_not_by_the_key_s_positions():
    """A key with segments after the budget (--freeze, --input-shape, a parallelism) pairs with its own prediction
    only: the configuration is read from the spec. Negative control: another --freeze is another configuration."""
    def rec(source, budget, freeze, alloc):
        spec = RunSpec("test-vit", "sgd-fe", budget=budget, freeze=freeze, input_shape="3x32x32")
        return make_record(spec, "ok", source, environment("cuda" if source == "measured" else "simulate", "H200"),
                           {"peak_allocated_bytes": alloc, "peak_reserved_bytes": alloc})

    (row,) = fidelity_rows([rec("measured", "device", "conv1", 100)], [rec("predicted", "h200", "conv1", 110),
                                                                       rec("predicted", "h200", "ln_pre", 150)])
    assert row["allocated_error_pct"] == 10.0 and row["config"].endswith("/freeze-conv1/input-3x32x32")
    assert fidelity_rows([rec("measured", "device", "conv1", 100)], [rec("predicted", "h200", "ln_pre", 150)]) == []


def test_measured_adamw_oom_gives_no_percentage():
    """A measured OOM's peak is cut short by the budget: no "AdamW +X%" may be computed from it."""
    from memprof.reports.table4 import render_markdown, table_rows

    def rec(optim, status, alloc):
        return {"key": f"vit-h-14/{optim}/ckpt-off/32bit/bs1/fp32/steps2/titan-x", "source": "measured",
                "status": status, "spec": RunSpec("vit-h-14", optim).to_dict(), "skip_reason": None, "error": None,
                "environment": {"device": "NVIDIA H200"},
                "metrics": {"peak_allocated_bytes": alloc, "peak_reserved_bytes": alloc, "over_budget_bytes": None}}

    records = [rec("adamw", "oom", 11 * GiB), rec("sgd-fe", "ok", 8 * GiB)]
    rows = {r["optim"]: r for r in table_rows(records, "reserved")}
    assert rows["sgd-fe"]["adamw_extra_pct"] is None
    md = render_markdown(records)
    assert "AdamW OOM" in md and "OOM (measured)" in md and "agrees (AdamW OOM" in md


@pytest.mark.gpu
def test_cuda_measures_test_model():
    from memprof.backends import cuda as cuda_backend

    status, m = cuda_backend.measure(RunSpec("test-vit", "adamw", budget="device"))
    assert status == "ok"
    assert m["peak_allocated_bytes"] <= m["peak_reserved_bytes"]
    assert m["peak_allocated_bytes"] == max(m["phase_peak_allocated_bytes"].values())
    assert m["step_ms_median"] > 0


@pytest.mark.gpu
def test_cuda_emulated_titan_x_oom_pattern():
    out = {o: run_isolated(RunSpec("vit-h-14", o, budget="titan-x"), "cuda", timeout_s=120)
           for o in ("adamw", "sgd-fe-nomom")}
    assert out["adamw"]["status"] == "oom" and out["adamw"]["metrics"]["oom"]["phase"]
    assert out["sgd-fe-nomom"]["status"] == "ok"


def test_fidelity_grades_the_out_of_memory_verdicts_of_an_emulated_card():
    """The emulated 12 GB card's OOM pattern: each configuration's measured and predicted status side by side;
    a prediction that fits where the measurement ran out is a disagreement (negative control)."""
    from memprof.reports.fidelity import verdict_rows

    key = "vit-h-14/{}/ckpt-off/32bit/bs1/fp32/steps2/12GiB@9.0"
    measured = [_record(key.format("adamw"), "measured", 11, 12, "oom"),
                _record(key.format("sgd-fe"), "measured", 9, 10)]
    predicted = [_record(key.format("adamw"), "predicted", 13, 14, "oom"),
                 _record(key.format("sgd-fe"), "predicted", 9, 10)]
    assert [v["agrees"] for v in verdict_rows(measured, predicted)] == [True, True]
    assert "2 of 2 agree" in render_fidelity(measured, predicted)
    predicted[0]["status"] = "ok"
    assert "DISAGREES" in render_fidelity(measured, predicted) and "1 of 2 agree" in render_fidelity(measured, predicted)
