"""Timing of the simulation (run: python -m pytest benchmarks --benchmark-enable).

Prediction time per paper model under AdamW (the optimizer with the most ops), in one process, from scratch
(`test_predict`) and for a second optimizer whose forward trace is reused (`test_predict_next_optimizer`,
memprof.simulation.shared); peak allocated bytes go to extra_info so a benchmark JSON also carries what was
predicted.
"""

import pytest

from memprof.simulation import shared
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec


@pytest.mark.parametrize("model", ["test-vit", "vit-b-16", "vit-l-14", "vit-h-14"])
def test_predict(benchmark, model):
    status, metrics = benchmark.pedantic(predict, args=(RunSpec(model, "adamw"),), setup=shared.clear, rounds=3,
                                         iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_allocated_bytes"] = metrics["peak_allocated_bytes"]
    benchmark.extra_info["alloc_requests"] = metrics["alloc_requests"]
    assert status in ("ok", "oom")


@pytest.mark.parametrize("model", ["vit-b-16", "vit-h-14"])
def test_predict_next_optimizer(benchmark, model):
    predict(RunSpec(model, "adamw"))  # its forward and backward are traced here, once
    status, _ = benchmark.pedantic(predict, args=(RunSpec(model, "sgd"),), rounds=3, iterations=1)
    assert status in ("ok", "oom")


def test_cpu_training_step(benchmark):
    """One real CPU run of the test model (2 steps, AdamW), through the tracker, as the cpu backend does."""
    from memprof.backends import cpu as cpu_backend

    status, metrics = benchmark.pedantic(cpu_backend.measure, args=(RunSpec("test-vit", "adamw", budget="device"),),
                                         rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_live_bytes"] = metrics["peak_live_bytes"]
    benchmark.extra_info["step_ms_median"] = metrics["step_ms_median"]
    assert status == "ok"
