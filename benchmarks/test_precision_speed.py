"""Prediction time under bf16-amp + fused AdamW against fp32 foreach AdamW, per paper model (run: python -m
pytest benchmarks/test_precision_speed.py --benchmark-enable). The issue's bar: at most 1.2x fp32's time.
Timed in one process, median of several rounds each; predicted peak bytes go to extra_info."""

import pytest

from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

SETTINGS = {"fp32-foreach": {}, "bf16-amp-fused": {"precision": "bf16-amp", "optim_impl": "fused"}}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model", ["vit-b-16", "vit-l-14", "vit-h-14"])
def test_predict_precision(benchmark, model, setting):
    status, metrics = benchmark.pedantic(predict, args=(RunSpec(model, "adamw", **SETTINGS[setting]),), rounds=3,
                                         iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_allocated_bytes"] = metrics["peak_allocated_bytes"]
    assert status in ("ok", "oom")
