"""--peft lora|dora: peft's own adapters (LoraConfig + inject_adapter_in_model) on the built model, the base weights
frozen, the adapters and the head trained; checked by hand-counted parameters and bytes on test-vit.

test-vit (open_clip, width 64, MLP 256, 2 blocks, a 32 -> 10 head after the 64 -> 32 projection). A LoRA adapter on a
layer of in -> out features adds r * (in + out) parameters (lora_A: r x in, lora_B: out x r). Per block, at r=8:
  attn (peft's nn.MultiheadAttention layer: in_proj 64 -> 192 and out_proj 64 -> 64) 8*(64+192) + 8*(64+64) = 3072
  mlp.c_fc 64 -> 256: 8*(64+256) = 2560; mlp.c_proj 256 -> 64: 2560                                   -> 8192
Two blocks: 16384 adapter parameters; the head: 32*10 + 10 = 330.
"""

import pytest

import memprof
from memprof.errors import UsageError
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec
from tests.test_grad_accum import HEAD, PARAMS

pytest.importorskip("peft")

ADAMW = 4 + 8  # fp32 bytes per trained parameter: its gradient, AdamW's exp_avg and exp_avg_sq
ADAPTERS = 2 * (8 * (64 + 192) + 8 * (64 + 64) + 8 * (64 + 256) + 8 * (256 + 64))


def _run(**kw):
    status, m = predict(RunSpec("test-vit", kw.pop("optim", "adamw"), **kw))
    assert status == "ok"
    return m


def _grad_and_state_bytes(m) -> int:
    """floor_bytes is every weight + one gradient per trained parameter + the optimizer's state."""
    return m["floor_bytes"] - 4 * m["params_total"]


@pytest.fixture(scope="module")
def lora():
    return _run(peft="lora")


def test_lora_adapters_count_as_parameters_by_hand(lora):
    assert ADAPTERS == 16384 and HEAD == 330
    assert lora["adapter_params"] == ADAPTERS and lora["adapter_parameter_bytes"] == ADAPTERS * 4
    assert lora["params_total"] == PARAMS + ADAPTERS == 132426
    assert lora["params_trainable"] == ADAPTERS + HEAD == 16714
    assert lora["parameter_bytes_trainable"] == (ADAPTERS + HEAD) * 4
    assert lora["parameter_bytes_frozen"] == (PARAMS - HEAD) * 4  # the base weights, all resident, fp32


def test_gradients_and_adamw_state_are_the_adapters_and_head_only(lora):
    assert _grad_and_state_bytes(lora) == (ADAPTERS + HEAD) * ADAMW
    assert lora["optimizer_state_bytes"] == (ADAPTERS + HEAD) * 8
    # at the peak (step 2, the state present): two states per trained tensor, each in 512-B blocks. Every adapter
    # tensor is a multiple of 512 B (8x64, 192x8, 64x8, 256x8, 8x256 floats); the head's weight 1280 B -> 1536, its
    # bias 40 B -> 512
    assert lora["breakdown_at_peak_bytes"]["optimizer_state"] == 2 * (ADAPTERS * 4 + 1536 + 512) == 135168
    frozen = lora["frozen_parameter_names"]
    assert not any("lora_" in n or n.startswith("head.") for n in frozen)  # the base weights get no gradient
    assert "visual.transformer.resblocks.0.attn.base_layer.in_proj_weight" in frozen
    # every base parameter: class and positional embeddings, conv1, ln_pre (2); per block ln_1, in_proj, out_proj,
    # ln_2, c_fc, c_proj, a weight and a bias each (12); ln_post (2) and proj
    assert "visual.conv1.weight" in frozen and len(frozen) == 5 + 2 * 12 + 3


def test_negative_controls_full_fine_tuning_and_another_rank_count_otherwise(lora):
    full = _run()
    assert _grad_and_state_bytes(full) == PARAMS * ADAMW > _grad_and_state_bytes(lora)
    assert "adapter_params" not in full and full["params_trainable"] == PARAMS
    r4 = _run(peft="lora", lora_rank=4)
    assert r4["adapter_params"] == ADAPTERS // 2 != lora["adapter_params"]  # r*(in+out): linear in the rank


def test_dora_adds_a_magnitude_per_output_and_leaves_multihead_attention_alone():
    """peft's DoRA does not adapt nn.MultiheadAttention: its defaults keep the MLP linears, each with LoRA's A and B
    plus a magnitude vector of its out features."""
    m = _run(peft="dora")
    per_block = 8 * (64 + 256) + 256 + 8 * (256 + 64) + 64
    assert m["adapter_params"] == 2 * per_block == 10880 and m["params_trainable"] == 10880 + HEAD
    assert _grad_and_state_bytes(m) == (10880 + HEAD) * ADAMW


def test_keys_name_peft_only_when_on():
    base = RunSpec("test-vit", "adamw")
    assert base.key == "test-vit/adamw/ckpt-off/32bit/bs1/fp32/steps2/titan-x"  # byte-identical default
    assert RunSpec("test-vit", "adamw", peft="lora").key == base.key + "/lora8"
    assert RunSpec("test-vit", "adamw", peft="lora", lora_rank=16, lora_alpha=32).config.endswith("/lora16-a32")
    assert RunSpec("test-vit", "adamw", peft="dora", lora_dropout=0.1).config.endswith("/dora8-d0.1")
    assert RunSpec("test-vit", "adamw", peft="off", lora_rank=8).key == base.key


def test_a_grid_of_peft_skips_freeze_embed_with_the_reason(tmp_path):
    from memprof.plan import plan_run, run_options

    plan = plan_run(run_options(models="test-vit", optims="adamw,sgd-fe", peft="off,lora", backend="simulate",
                                out=str(tmp_path / "run")))
    got = {e.spec.config: e.skip_reason for e in plan.entries}
    assert got["test-vit/adamw/ckpt-off/32bit/bs1/fp32/lora8"] is None
    assert "nothing left to freeze" in got["test-vit/sgd-fe/ckpt-off/32bit/bs1/fp32/lora8"]
    assert got["test-vit/sgd-fe/ckpt-off/32bit/bs1/fp32"] is None  # control: without LoRA it runs


@pytest.mark.parametrize("kw,words", [
    (dict(peft="lora", lora_rank=0), "--lora-rank 0: a LoRA rank must be at least 1"),
    (dict(peft="lora", lora_rank=-2), "--lora-rank -2: a LoRA rank must be at least 1"),
    (dict(peft="lora", lora_targets="resblocks.*.mlp.fc"),
     "--lora-targets 'resblocks.*.mlp.fc' matches no module of test-vit (did you mean"),
    (dict(peft="lora", lora_targets="transformer.resblocks.0.attn.out_proj"),
     "is inside nn.MultiheadAttention visual.transformer.resblocks.0.attn, whose forward does not call it"),
    (dict(peft="dora", lora_targets="transformer.resblocks.*.attn"), "peft's DoRA does not adapt"),
    (dict(lora_rank=4), "--lora-rank applies to --peft lora or dora"),
    (dict(peft="lora", train="head"), "--train head with --peft lora: peft freezes every base weight"),
])
def test_bad_values_are_one_line_errors(kw, words):
    with pytest.raises(UsageError) as exc:
        memprof.predict("test-vit", "adamw", **kw)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_without_peft_installed_it_says_how_to_install(monkeypatch, capsys):
    from memprof import adapters, cli

    monkeypatch.setattr(adapters, "peft_available", lambda: False)
    with pytest.raises(UsageError) as exc:
        memprof.predict("test-vit", "adamw", peft="lora")
    assert "--peft lora needs the peft library, which is not installed: pip install peft" in str(exc.value)
    assert cli.main(["run", "--models", "test-vit", "--optims", "adamw", "--peft", "lora"]) == 2  # the CLI: exit 2
    assert "pip install peft" in capsys.readouterr().err


def test_the_cpu_backend_measures_what_the_simulation_predicts():
    """Real tensors (peft's MultiheadAttention merging its adapters around each forward, for real) against the fake
    trace under CPU rules: the same live bytes."""
    from memprof.backends import cpu as cpu_backend
    from memprof.simulation.simulate import predict_cpu

    spec = RunSpec("test-vit", "adamw", peft="lora", batch_size=2, lora_dropout=0.1, budget="device")
    status, measured = cpu_backend.measure(spec)
    _, predicted = predict_cpu(spec)
    assert status == "ok" and measured["params_trainable"] == ADAPTERS + HEAD
    for field in ("peak_live_bytes", "breakdown_at_peak_bytes", "optimizer_state_bytes", "adapter_params"):
        assert measured[field] == predicted[field], field


def _script_and_run(model: str, budget: str = "titan-x"):
    import contextlib
    import io
    import os
    import tempfile
    from pathlib import Path

    from memprof.plan import execute, plan_run, run_options
    from memprof.script.runner import run_script

    pytest.importorskip("timm")
    script = Path(__file__).parent / "data" / "scripts" / "train_lora.py"
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_script(str(script), ["--model", model], budget=budget, steps=None, backend="simulate")
    with tempfile.TemporaryDirectory() as tmp:
        registry = execute(plan_run(run_options(models=f"timm:{model}", optims="adamw", peft="lora", budget=budget,
                                                out=os.path.join(tmp, "run"), progress=False)))[-1]
    return result.record, registry


def _agree(script, registry):
    s, r = script["metrics"], registry["metrics"]
    assert abs(s["peak_allocated_bytes"] - r["peak_allocated_bytes"]) <= 0.005 * r["peak_allocated_bytes"]
    assert s["params_trainable"] == r["params_trainable"] and s["adapter_params"] == r["adapter_params"]
    assert script["key"].split("@")[0].endswith("/lora8") and registry["key"].split("@")[0].endswith("/lora8")


def test_a_script_wrapping_its_model_with_peft_is_labelled_and_agrees_with_memprof_run():
    """tests/data/scripts/train_lora.py (timm ViT-Ti/16, peft LoRA r=8 on qkv/proj/fc1/fc2, the head trained, AdamW,
    2 steps) against `memprof run --models timm:vit_tiny_patch16_224 --optims adamw --peft lora`: within 0.5% (here to
    the byte), and the record says what peft did."""
    script, registry = _script_and_run("vit_tiny_patch16_224")
    _agree(script, registry)
    adapters = 12 * 8 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))  # qkv, proj, fc1, fc2 of 12 blocks
    assert script["metrics"]["adapter_params"] == adapters == 294912
    words = f"peft: lora r=8 alpha=16, {adapters:,} adapter parameters in 48 layers, {adapters + 1930:,} trainable"
    assert script["metrics"]["script_peft"].startswith(words) and words in " ".join(script["metrics"]["notes"])
    assert script["spec"]["peft"] == "lora" and script["spec"]["lora_rank"] == 8


@pytest.mark.slow
def test_vit_b_16_script_and_run_agree():
    """The issue's done-when at ViT-B/16 size (timm's vit_base_patch16_224: 12 blocks of width 768)."""
    _agree(*_script_and_run("vit_base_patch16_224"))


def test_advise_weighs_lora_saying_what_trains():
    from memprof.planning.advise import candidates

    cands, _, not_applicable = candidates(RunSpec("test-vit", "adamw"))
    lora = {c.label: c for c in cands if c.spec.peft == "lora" and len(c.changes) == 1}
    assert set(lora) == {"LoRA r=8", "LoRA r=16"}
    assert f"{ADAPTERS + HEAD:,} trainable parameters (rank-8 adapters and the head) instead of {PARAMS:,}" in \
        lora["LoRA r=8"].cost
    assert f"{2 * ADAPTERS + HEAD:,} trainable parameters" in lora["LoRA r=16"].cost  # r*(in+out): twice at r=16
    assert any("LoRA" in label and "nothing left to freeze" in why for label, why in not_applicable)


def test_table4_puts_lora_rows_beside_the_methods():
    from memprof.reports.table4 import _method_label, table_rows
    from memprof.results import make_record

    records = [make_record(RunSpec("vit-b-16", optim, peft=peft), "ok", "predicted", {"backend": "simulate", "device": "x"},
                           {"peak_reserved_bytes": size})
               for optim, peft, size in (("adamw", "off", 300), ("sgd", "off", 200), ("adamw", "lora", 100))]
    rows = {(r["optim"], r["peft"]): r for r in table_rows(records)}
    assert rows[("adamw", "lora8")]["method"] == "AdamW + LoRA r=8" and rows[("adamw", "lora8")]["adamw_extra_pct"] == 200
    assert rows[("sgd", "off")]["adamw_extra_pct"] == 50 and rows[("adamw", "off")]["adamw_extra_pct"] == 0
    assert _method_label(("sgd", 32, False, "dora16-a32")) == "SGD + DoRA r=16 alpha=32"


def test_a_script_model_with_peft_multihead_attention_is_flagged_not_faithful():
    """memprof script does not yet count the base weights peft's MultiheadAttention layer re-registers in each forward
    (issue #33): such a model's record says so. Negative control: Linear targets only (timm's) get no flag."""
    import torch.nn as nn
    from peft import LoraConfig, inject_adapter_in_model

    from memprof.adapters import detect, detected_words

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(16, 2), nn.Linear(16, 16)

    mha = detect(inject_adapter_in_model(LoraConfig(r=2, target_modules=["attn", "fc"]), Net()))
    assert mha["mha_layers"] == 1 and "NOT FAITHFUL: 1 of them" in detected_words(mha, 10)
    linear = detect(inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc"]), Net()))
    assert linear["mha_layers"] == 0 and "NOT FAITHFUL" not in detected_words(linear, 10)
