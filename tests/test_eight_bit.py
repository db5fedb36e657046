"""8-bit optimizer states (bitsandbytes): predicted state bytes against real bitsandbytes runs."""

import os
import subprocess
import sys

import pytest

from memprof.backends import cpu as cpu_backend
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("optim", ["adamw", "sgd-fe", "lamb", "lars"])
def test_predicted_state_bytes_equal_a_real_cpu_step(optim):
    spec = RunSpec("test-vit", optim, state_bits=8)
    _, predicted = predict(spec)
    status, real = cpu_backend.measure(RunSpec("test-vit", optim, state_bits=8, budget="device"))
    assert status == "ok"
    for field in ("optimizer_state_bytes", "state_params_fp32_kept", "state_params_8bit"):
        assert predicted[field] == real[field], field
    assert real["state_params_8bit"] > 0  # the test model has tensors above min_8bit_size


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_vit_b_16_state_bytes_equal_a_real_cpu_step(optim):
    _, predicted = predict(RunSpec("vit-b-16", optim, state_bits=8))
    status, real = cpu_backend.measure(RunSpec("vit-b-16", optim, state_bits=8, budget="device"))
    assert status == "ok"
    assert predicted["optimizer_state_bytes"] == real["optimizer_state_bytes"]
    assert predicted["state_params_fp32_kept"] == real["state_params_fp32_kept"] == 102  # of 154 tensors
    assert predicted["state_params_8bit"] == 52
    per_param = predicted["state_bytes_per_trainable_param"]
    assert per_param == pytest.approx(2.04 if optim == "adamw" else 1.02, abs=0.01)


def test_prediction_follows_bitsandbytes_own_init_state(monkeypatch):
    """Negative control: change bitsandbytes' init_state (one extra 1000-float state) and the prediction moves."""
    import torch
    from bitsandbytes.optim.optimizer import Optimizer2State

    _, before = predict(RunSpec("test-vit", "adamw", state_bits=8))
    original = Optimizer2State.init_state

    def bigger(self, group, p, gindex, pindex):
        original(self, group, p, gindex, pindex)
        self.state[p]["extra"] = torch.zeros(1000, device=p.device)

    monkeypatch.setattr(Optimizer2State, "init_state", bigger)
    _, after = predict(RunSpec("test-vit", "adamw", state_bits=8))
    n_params = before["state_params_fp32_kept"] + before["state_params_8bit"]
    assert after["optimizer_state_bytes"] - before["optimizer_state_bytes"] == n_params * 4000
    assert after["peak_allocated_bytes"] > before["peak_allocated_bytes"]


@pytest.mark.slow
def test_8bit_adamw_below_fp32_sgd_for_every_paper_model():
    for model in ("vit-b-16", "vit-l-14", "vit-h-14"):
        _, adamw8 = predict(RunSpec(model, "adamw", state_bits=8))
        _, sgd = predict(RunSpec(model, "sgd"))
        assert adamw8["peak_allocated_bytes"] < sgd["peak_allocated_bytes"], model


def test_8bit_has_no_step_temporaries():
    """The 8-bit update is in place: the optimizer phase's peak is the state creation, not a foreach copy."""
    _, m8 = predict(RunSpec("test-vit", "adamw", state_bits=8))
    _, m32 = predict(RunSpec("test-vit", "adamw"))
    assert m8["breakdown_at_peak_bytes"]["temporaries"] < m32["breakdown_at_peak_bytes"]["temporaries"]


@pytest.mark.slow
def test_paged_states_leave_the_allocator():
    _, plain = predict(RunSpec("vit-b-16", "adamw", state_bits=8))
    _, paged = predict(RunSpec("vit-b-16", "adamw", state_bits=8, paged=True))
    assert plain["paged_state_bytes"] == 0 < paged["paged_state_bytes"]
    # every uint8 state of a tensor with 100k elements or more moves out of torch's view
    assert plain["peak_allocated_bytes"] - paged["peak_allocated_bytes"] >= 0.95 * paged["paged_state_bytes"]


def test_nomom_8bit_is_skipped_with_a_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memprof", "run", "--models", "test-vit", "--optims", "sgd-fe-nomom",
                        "--state-bits", "8", "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "keeps no optimizer state" in (tmp_path / "results.jsonl").read_text()


@pytest.mark.slow
def test_missing_bitsandbytes_says_how_to_install(tmp_path):
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    r = subprocess.run([sys.executable, "-m", "memprof", "run", "--models", "test-vit", "--optims", "adamw",
                        "--state-bits", "8", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "pip install bitsandbytes" in r.stderr and "Traceback" not in r.stderr
    ok = subprocess.run([sys.executable, "-m", "memprof", "run", "--models", "test-vit", "--optims", "adamw",
                         "--out", str(tmp_path / "p"), "--no-progress"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr  # 32-bit runs never need it


def test_validation_finds_bitsandbytes_without_importing_it(monkeypatch):
    """Validation only looks bitsandbytes up (importing it costs seconds; the worker that builds the optimizer
    imports it); a missing package is still a usage error."""
    import importlib.util

    import pytest as _pytest

    from memprof.errors import UsageError
    from memprof.optims import require_bitsandbytes

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    require_bitsandbytes(load=False)
    assert "bitsandbytes" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with _pytest.raises(UsageError, match="pip install bitsandbytes"):
        require_bitsandbytes(load=False)
