"""The Python API (memprof.api): the same path as `memprof run`, a user's own step through the same tracer and
allocator replay, the cpu backend equal to the prediction under CPU rules, the README example run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memprof
from memprof.simulation.allocator import round_size
from memprof.errors import UsageError
from memprof.harness import classification_step, prepare
from memprof.optims import build_optimizer
from memprof.simulation.simulate import predict as simulate_predict
from memprof.spec import RunSpec

ROOT = Path(__file__).parent.parent


def mlp_build(hidden=256):
    def build():
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 8))
        return model, torch.optim.AdamW(model.parameters())

    return build


def mlp_batch():
    return torch.randn(32, 64), torch.randint(0, 8, (32,))


def custom_loss_step(model, optimizer, inputs):
    """A user's step with its own loss: cross-entropy plus an L2 penalty on the logits."""
    x, y = inputs
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y) + 1e-3 * out.pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_predict_is_the_simulate_backend_of_memprof_run():
    """A registry name through the API gives the record `memprof run --backend simulate` writes."""
    r = memprof.predict("test-vit", "adamw")
    _, metrics = simulate_predict(RunSpec("test-vit", "adamw"))
    assert r.source == "predicted" and r.status == "ok"
    files = ("timeline_file", "snapshot_file")  # the run writes its timeline beside the results; predict() alone does not
    assert {k: v for k, v in r.record["metrics"].items() if k not in files} == metrics
    assert r.peak_allocated_bytes == metrics["peak_allocated_bytes"] and r.fits is True and r.may_not_fit is False
    text = str(r)
    assert "predicted" in text and "peak allocated" in text and "breakdown" in text and "at the peak" in text


def test_the_harness_is_one_user_of_predict_step():
    """The CLI's own step (harness.classification_step), handed to predict_step as a user's step, predicts
    exactly what the registry path predicts."""
    spec = RunSpec("test-vit", "adamw")

    def build():
        prepared = prepare(spec, load_weights=False)
        trainable = [p for p in prepared.model.parameters() if p.requires_grad]
        return prepared.model, build_optimizer(prepared.optim_info, trainable, 32, False)

    def batch():
        return torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))

    mine = memprof.predict_step(build, classification_step, batch)
    _, registry = simulate_predict(spec)
    for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "peak_op", "breakdown_at_peak_bytes"):
        assert mine.record["metrics"][field] == registry[field], field


def test_predict_step_of_a_user_mlp_with_a_custom_loss():
    r = memprof.predict_step(mlp_build(), custom_loss_step, mlp_batch)
    m = r.record["metrics"]
    params = [64 * 256 * 4, 256 * 4, 256 * 8 * 4, 8 * 4]
    assert r.source == "predicted" and r.status == "ok"
    assert m["params_total"] == 64 * 256 + 256 + 256 * 8 + 8
    assert m["optimizer_state_bytes"] == 2 * sum(params)  # AdamW: exp_avg and exp_avg_sq
    assert m["phase_peak_allocated_bytes"]["backward"] > 0 and m["phase_peak_allocated_bytes"]["optimizer"] > 0
    assert m["breakdown_at_peak_bytes"]["parameters"] == sum(round_size(b) for b in params)
    bigger = memprof.predict_step(mlp_build(1024), custom_loss_step, mlp_batch)
    assert bigger.peak_allocated_bytes > r.peak_allocated_bytes  # negative control: the prediction sees the model


def test_the_cpu_backend_equals_the_prediction_under_cpu_rules():
    predicted = memprof.predict_step(mlp_build(), custom_loss_step, mlp_batch, rules="cpu")
    measured = memprof.measure_step(mlp_build(), custom_loss_step, mlp_batch, backend="cpu")
    assert predicted.source == "predicted" and measured.source == "measured"
    for field in ("peak_live_bytes", "phase_peak_live_bytes", "breakdown_at_peak_bytes", "optimizer_state_bytes"):
        assert predicted.record["metrics"][field] == measured.record["metrics"][field], field
    # negative control: a different model measures differently
    other = memprof.measure_step(mlp_build(512), custom_loss_step, mlp_batch, backend="cpu")
    assert other.peak_live_bytes != predicted.peak_live_bytes


def test_predict_takes_a_factory():
    def small():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))

    r = memprof.predict(small, "sgd", input_shape="3x16x16")
    assert r.status == "ok" and r.params_total == 3 * 16 * 16 * 10 + 10
    with pytest.raises(UsageError, match="does not say what input it takes"):
        memprof.predict(small, "sgd")
    with pytest.raises(UsageError, match="fresh process"):
        memprof.measure(small, "sgd", input_shape="3x16x16", backend="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp16"}, "use --precision fp16-amp"),
    ({"precision": "fp64"}, "unknown precision"),
    ({"optim_implementation": "fused"}, "unknown keyword 'optim_implementation': did you mean optim_impl"),
    ({"grad_ckpt": 1}, "give True/False"),
    ({"grad_ckpt": "maybe"}, "use off, on"),
    ({"optimizer": "paper"}, "one optimizer"),
    ({"model": "vit-b-16,vit-l-14"}, "one model"),
    ({"budget": "gtx-9000"}, "budget"),
])
def test_bad_input_is_a_usage_error(kwargs, message):
    args = {"model": "test-vit", **kwargs}
    with pytest.raises(UsageError, match=message):
        memprof.predict(**args)


def test_predict_takes_every_run_option_with_the_run_key_and_figures(tmp_path):
    """The options `memprof run` takes are keywords of predict, checked the same way: bf16-amp with the fused
    optimizer is modelled (not refused), grad_ckpt="off" means off, and the record equals the run's."""
    from memprof.cli import main
    from memprof.results import read_records

    r = memprof.predict("test-vit", "adamw", precision="bf16-amp", optim_impl="fused", grad_ckpt="off")
    assert r.ok and r.record["spec"]["precision"] == "bf16-amp" and r.record["spec"]["grad_ckpt"] is False
    assert main(["run", "--models", "test-vit", "--optims", "adamw", "--precision", "bf16-amp", "--optim-impl",
                 "fused", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    ran = read_records(str(tmp_path / "run"))[0]
    assert ran["key"] == r.key and ran["metrics"]["peak_reserved_bytes"] == r.peak_reserved_bytes
    on = memprof.predict("test-vit", "adamw", grad_ckpt=True)
    assert on.record["spec"]["grad_ckpt"] is True and on.key != r.key  # negative control: on is on


def test_predict_step_bad_input():
    with pytest.raises(UsageError, match="at least 2"):
        memprof.predict_step(mlp_build(), custom_loss_step, mlp_batch, steps=1)
    with pytest.raises(UsageError, match=r"\(model, optimizer\)"):
        memprof.predict_step(lambda: torch.nn.Linear(2, 2), custom_loss_step, mlp_batch)


def test_import_memprof_does_not_import_torch():
    code = "import sys, memprof; assert 'torch' not in sys.modules; assert callable(memprof.predict_step)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_the_readme_python_api_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Python API", 1)[1].split("\n### ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert namespace["r"].status == "ok" and namespace["r"].source == "predicted"
