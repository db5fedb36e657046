"""Predictions: exact state accounting, freeze-embed, the paper's ordering and OOM pattern, determinism."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.simulation import shared, tracing
from memprof.model_sources.open_clip import REGISTRY as MODELS
from memprof.models import build_model, freeze_embedding
from memprof.optims import REGISTRY as OPTIMS
from memprof.simulation.simulate import predict
from memprof.simulation.tracing import to_device_order
from memprof.spec import RunSpec

PAPER_MODELS = ["vit-b-16", "vit-l-14", "vit-h-14"]


@pytest.fixture(scope="module")
def paper_grid():
    return {(m, o): predict(RunSpec(m, o)) for m in PAPER_MODELS
            for o in ("adamw", "sgd", "sgd-fe", "sgd-fe-nomom")}


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_state_bytes_are_exact(optim):
    """AdamW and LAMB: 2 x trainable bytes; SGD with momentum and LARS: 1 x; no momentum: none."""
    status, m = predict(RunSpec("test-vit", optim))
    assert status == "ok"
    assert m["optimizer_state_bytes"] == OPTIMS[optim].state_tensors_per_param * 4 * m["params_trainable"]


def test_state_bytes_on_vit_b_16():
    _, adamw = predict(RunSpec("vit-b-16", "adamw"))
    _, sgd_fe = predict(RunSpec("vit-b-16", "sgd-fe"))
    assert adamw["optimizer_state_bytes"] == 2 * 4 * adamw["params_trainable"]
    assert sgd_fe["optimizer_state_bytes"] == 4 * sgd_fe["params_trainable"]
    assert adamw["params_trainable"] == adamw["params_total"]


def test_freeze_embed_freezes_exactly_conv1_and_ln_pre():
    with FakeTensorMode():
        model = build_model(MODELS["vit-b-16"], 10)
        names = freeze_embedding(model, MODELS["vit-b-16"])
    assert names == ["visual.conv1.weight", "visual.ln_pre.bias", "visual.ln_pre.weight"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(names)
    share = sum(p.numel() for n, p in model.named_parameters() if n in frozen) / sum(
        p.numel() for p in model.parameters())
    assert 0.006 < share < 0.008  # the paper: about 0.7% of ViT-B/16


def test_frozen_parameters_get_no_gradient_and_no_state():
    _, full = predict(RunSpec("test-vit", "sgd"))
    _, fe = predict(RunSpec("test-vit", "sgd-fe"))
    frozen = fe["params_total"] - fe["params_trainable"]
    assert frozen == 64 * 3 * 8 * 8 + 2 * 64  # conv1 (no bias) + ln_pre
    assert full["optimizer_state_bytes"] - fe["optimizer_state_bytes"] == 4 * frozen
    assert fe["frozen_parameter_names"] == ["visual.conv1.weight", "visual.ln_pre.bias", "visual.ln_pre.weight"]


@pytest.mark.slow
def test_paper_ordering_for_every_model(paper_grid):
    for model in PAPER_MODELS:
        peak = {o: paper_grid[(model, o)][1]["peak_allocated_bytes"] for o in ("adamw", "sgd", "sgd-fe", "sgd-fe-nomom")}
        assert peak["adamw"] > peak["sgd"] >= peak["sgd-fe"] > peak["sgd-fe-nomom"], (model, peak)


@pytest.mark.slow
def test_paper_oom_pattern_at_12gb(paper_grid):
    assert paper_grid[("vit-h-14", "adamw")][0] == "oom"
    oom = paper_grid[("vit-h-14", "adamw")][1]
    assert oom["over_budget_bytes"] > 0 and oom["oom"]["phase"] == "optimizer"
    assert paper_grid[("vit-h-14", "sgd-fe")][0] == "ok"
    assert paper_grid[("vit-h-14", "sgd-fe-nomom")][0] == "ok"
    assert all(paper_grid[(m, o)][0] == "ok" for m in ("vit-b-16", "vit-l-14")
               for o in ("adamw", "sgd", "sgd-fe", "sgd-fe-nomom"))


@pytest.mark.slow
def test_adamw_fits_a_bigger_card():
    """Negative control for the OOM verdict: the same ViT-H/14 AdamW prediction fits 80 GB."""
    status, m = predict(RunSpec("vit-h-14", "adamw", budget="h100-80g"))
    assert status == "ok" and m["over_budget_bytes"] == 0


def test_budget_too_small_is_oom_with_phase_and_request():
    status, m = predict(RunSpec("test-vit", "adamw", budget="410MiB"))
    assert status == "oom"
    assert m["oom"]["requested_bytes"] > 0 and m["oom"]["phase"] == "forward"  # 10 MiB usable: the 20 MiB segment for the workspace does not fit


def test_breakdown_sums_to_peak():
    _, m = predict(RunSpec("vit-b-16", "adamw"))
    assert sum(m["breakdown_at_peak_bytes"].values()) == m["peak_allocated_bytes"]
    assert m["peak_phase"] == "optimizer" and m["peak_op"] == "aten._foreach_sqrt.default"
    # the foreach sqrt temporary is one full copy of the trainable parameters (each block rounded to 512 B)
    assert m["breakdown_at_peak_bytes"]["temporaries"] >= 4 * m["params_trainable"]


def test_grad_checkpointing_cuts_activations_at_batch_32():
    _, off = predict(RunSpec("test-vit", "sgd-fe-nomom", batch_size=32))
    _, on = predict(RunSpec("test-vit", "sgd-fe-nomom", batch_size=32, grad_ckpt=True))
    assert on["phase_peak_allocated_bytes"]["forward"] < off["phase_peak_allocated_bytes"]["forward"]


def test_prediction_is_deterministic():
    a = json.dumps(predict(RunSpec("vit-b-16", "sgd-fe")), sort_keys=True)
    b = json.dumps(predict(RunSpec("vit-b-16", "sgd-fe")), sort_keys=True)
    assert a == b


def test_a_retained_tensor_raises_the_peak(monkeypatch):
    """Negative control for the tracker: keep one extra activation alive and the peak grows by its block."""
    kept = []
    original = tracing.train_steps

    def leaky(model, optimizer, spec, device, on_phase):
        hook = model.head.register_forward_hook(lambda mod, inp, out: kept.append(out * 1.0) if not kept else None)
        big = []

        def phase(name, step):
            if name == "forward" and step == 0:
                big.append(torch.empty(1 << 20))  # 4 MiB held from the first forward to the end
            on_phase(name, step)
        original(model, optimizer, spec, device, phase)
        hook.remove()
        big.clear()

    _, base = predict(RunSpec("test-vit", "adamw"))
    monkeypatch.setattr(tracing, "train_steps", leaky)
    shared.clear()  # the forward and backward are traced again, with the leak
    _, leaked = predict(RunSpec("test-vit", "adamw"))
    assert leaked["peak_allocated_bytes"] - base["peak_allocated_bytes"] >= 4 << 20


def test_to_device_order_matches_module_apply():
    """The simulated parameter upload follows the same order as Module.to (Module._apply)."""
    model = build_model(MODELS["test-vit"], 10)
    seen = []
    model._apply(lambda t: seen.append(id(t)) or t)
    assert [id(t) for t in to_device_order(model)] == seen
    assert [id(p) for p in model.parameters()] != seen  # parameters() is a different order: the test can fail


def test_unmodelled_conv_workspace_is_bounded_by_hand():
    """test-vit at batch 1: the patch embedding (3 -> 64 channels, 8x8 kernel, 32 px -> 4x4) is the only
    convolution. Its backward's bound is im2col 1*3*64*16*4 = 12,288 B plus grad_output 64*16*4 = 4,096 B,
    input 3*32*32*4 = 12,288 B and weight 64*3*64*4 = 49,152 B: 77,824 B (the forward's is 73,728 B)."""
    status, m = predict(RunSpec("test-vit", "sgd"))
    assert status == "ok"
    [item] = m["unmodelled"]
    assert item["bound_bytes"] == 77_824 and "cuDNN" in item["what"] and "Conv_v8.cpp" in item["source"]
    assert m["peak_allocated_bytes_upper"] == m["peak_allocated_bytes"] + 77_824  # already a multiple of 512 B
    assert m["peak_reserved_bytes_upper"] == m["peak_reserved_bytes"] + (2 << 20)  # a small-pool segment
    assert m["fits"] == "yes"


def test_near_budget_reads_may_not_fit():
    """A card with 1 MiB to spare over the predicted reserved bytes (plus context) fits the prediction but
    not its band (one more 2 MiB segment); 2 MiB more fits both; 2 MiB less does not fit at all."""
    _, m = predict(RunSpec("test-vit", "sgd"))
    tight = (m["peak_reserved_bytes"] + m["context_bytes_estimate"]) // (1 << 20) + 1
    status, near = predict(RunSpec("test-vit", "sgd", budget=f"{tight}MiB"))
    assert (status, near["fits"]) == ("ok", "may not fit")
    status, roomy = predict(RunSpec("test-vit", "sgd", budget=f"{tight + 2}MiB"))
    assert (status, roomy["fits"]) == ("ok", "yes")
    status, short = predict(RunSpec("test-vit", "sgd", budget=f"{tight - 3}MiB"))
    assert (status, short["fits"]) == ("oom", "no")


def test_cpu_prediction_says_step_counters_differ():
    from memprof.simulation.simulate import predict_cpu

    _, m = predict_cpu(RunSpec("test-vit", "adamw", budget="device"))
    assert "step counters" in m["host_scalars_note"] and "host memory on CUDA" in m["host_scalars_note"]
