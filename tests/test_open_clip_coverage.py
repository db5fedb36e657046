"""open_clip coverage of the simulation: the unsupported-names table, and towers that used to fail predicting.

The full sweep over every open_clip name is the benchmark `benchmarks/open_clip_coverage.py`, not a test.
"""

import open_clip
import pytest

from memprof import models
from memprof.model_sources import open_clip as sources
from memprof.errors import UsageError
from memprof.model_sources.open_clip import listed_models, unsupported_table_problems
from memprof.models import resolve_model
from memprof.simulation.simulate import predict, predict_cpu
from memprof.spec import RunSpec


def test_unsupported_table_matches_open_clip():
    assert unsupported_table_problems() == []
    runnable, unsupported = listed_models()
    assert set(runnable).isdisjoint(unsupported)
    assert sorted(runnable + list(unsupported)) == sorted(open_clip.list_models())
    assert all(reason for reason in unsupported.values())
    # the benchmark's bar: at least 95% of open_clip's names predict
    assert len(runnable) >= 0.95 * len(open_clip.list_models())


def test_unsupported_table_check_fails_on_broken_entries():  # negative control
    broken = {"ViT-Z-99": ("made up", True), "test-vit": ("x", True), "ViT-B-32": ("", False),
              "RN50": "no cpu flag"}
    problems = unsupported_table_problems(broken)
    assert [p.split(":")[0] for p in problems] == ["ViT-Z-99", "test-vit", "ViT-B-32", "RN50"]


def test_unsupported_name_rejected_with_reason(monkeypatch):  # negative control
    monkeypatch.setitem(sources.UNSUPPORTED, "RN50", ("some op has no fake kernel", True))
    with pytest.raises(UsageError, match="some op has no fake kernel.*--backend cpu"):
        resolve_model("RN50")
    with pytest.raises(UsageError, match="some op has no fake kernel"):
        predict(RunSpec(model="RN50", optim="adamw"))
    assert resolve_model("RN50", simulated=False).name == "RN50"  # measuring backends still run it
    runnable, unsupported = listed_models()
    assert "RN50" not in runnable and unsupported["RN50"] == "some op has no fake kernel"
    monkeypatch.setitem(sources.UNSUPPORTED, "RN50", ("needs a GPU kernel", False))
    with pytest.raises(UsageError, match="only --backend cuda"):
        models.parse_models("vit-b-16,RN50")


# one tower from each family that failed before the meta-device build (timm drop-path schedules computed
# with .item() in constructors; CoCa's (pooled, tokens) output), the smallest of each; PE-Core is
# test_meta_build_matches_real_cpu_run's tower
PREVIOUSLY_FAILING = ["ViT-B-32-SigLIP2-256", "MobileCLIP2-S0", "convnext_tiny", "EVA02-B-16", "coca_ViT-B-32"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PREVIOUSLY_FAILING)
def test_previously_failing_towers_predict(name):
    status, m = predict(RunSpec(model=name, optim="adamw"))
    assert status == "ok"
    param_bytes = 4 * m["params_total"]
    # AdamW keeps fp32 parameters, gradients and two states alive at the optimizer step
    assert m["peak_allocated_bytes"] >= 4 * param_bytes
    assert m["optimizer_state_bytes"] == 2 * param_bytes
    assert m["breakdown_at_peak_bytes"]["parameters"] >= param_bytes


@pytest.mark.slow
def test_meta_build_matches_real_cpu_run():
    """The meta-device build changes nothing: the fake run of a timm tower (drop path, 384 px) predicts
    exactly the live tensor bytes the same steps measure on real CPU tensors."""
    from memprof.backends.cpu import measure

    spec = RunSpec(model="PE-Core-T-16-384", optim="adamw", budget="device")
    _, predicted = predict_cpu(spec)
    status, measured = measure(spec)
    assert status == "ok"
    assert predicted["peak_live_bytes"] == measured["peak_live_bytes"]
    assert predicted["alloc_requests"] == measured["alloc_requests"]
