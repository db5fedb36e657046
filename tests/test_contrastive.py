"""--objective contrastive: both CLIP towers trained on image-text pairs with open_clip's own loss (ClipLoss, or
SigLipLoss for SigLIP), --lock-image / --lock-text through open_clip's lock methods (memprof.contrastive). Checked by
hand-computed bytes on test-vit, which trains as a tiny CLIP here (its image tower + memprof.contrastive's
TEST_TEXT_CFG text tower), with negative controls."""

import pytest
import torch

from memprof import cli, contrastive
from memprof.errors import UsageError
from memprof.harness import prepare
from memprof.simulation.simulate import predict
from memprof.simulation.tracing import trace
from memprof.spec import RunSpec
from tests.test_grad_accum import HEAD, PARAMS

IMAGE = PARAMS - HEAD  # test-vit's tower without the classifier's head: 115,712
T = contrastive.TEST_TEXT_CFG  # width 32, 2 layers, 8 tokens, 100 ids; embed_dim 32 (test-vit's)
W = T["width"]
TEXT_BLOCK = 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (W * 4 * W + 4 * W) + (4 * W * W + W)
TEXT = T["vocab_size"] * W + T["context_length"] * W + T["layers"] * TEXT_BLOCK + 2 * W + W * 32  # + ln_final, proj
SCALE = 1  # logit_scale
ADAMW = 8  # fp32 bytes of AdamW state per trained parameter (exp_avg, exp_avg_sq)


def _run(batch_size=4, **kw):
    status, m = predict(RunSpec("test-vit", "adamw", batch_size=batch_size, objective="contrastive", **kw))
    assert status == "ok"
    return m


def _grad_and_state_bytes(m) -> int:
    return m["floor_bytes"] - 4 * m["params_total"]  # every weight + a gradient and AdamW state per trained one


def test_the_hand_count_is_open_clips_clip_model():
    m = _run()
    assert TEXT == 29_952 and m["params_total"] == m["params_trainable"] == IMAGE + TEXT + SCALE == 145_665
    assert m["optimizer_state_bytes"] == ADAMW * (IMAGE + TEXT + SCALE)
    with torch.device("meta"):
        model = prepare(RunSpec("test-vit", "adamw", objective="contrastive")).model
    assert type(model).__name__ == "CLIP" and "token_embedding.weight" in dict(model.named_parameters())


def test_lock_image_leaves_the_image_tower_without_gradients_or_state():
    m = _run(lock_image=True)
    assert m["params_trainable"] == TEXT + SCALE
    assert m["optimizer_state_bytes"] == ADAMW * (TEXT + SCALE)  # exactly: the text tower and the logit scale
    assert _grad_and_state_bytes(m) == (4 + ADAMW) * (TEXT + SCALE)
    with torch.device("meta"):
        prepared = prepare(RunSpec("test-vit", "adamw", objective="contrastive", lock_image=True))
    assert all(not p.requires_grad for p in prepared.model.visual.parameters())  # open_clip's lock_image_tower
    assert set(prepared.frozen) == {f"visual.{n}" for n, _ in prepared.model.visual.named_parameters()}


def test_lock_text_leaves_the_text_tower_without_state():
    m = _run(lock_text=True)
    assert m["params_trainable"] == IMAGE + SCALE and m["optimizer_state_bytes"] == ADAMW * (IMAGE + SCALE)


def test_negative_control_unlocked_costs_more():
    both, locked = _run(), _run(lock_image=True)
    assert both["optimizer_state_bytes"] - locked["optimizer_state_bytes"] == ADAMW * IMAGE
    assert both["peak_allocated_bytes"] > locked["peak_allocated_bytes"]


def test_negative_control_the_classify_objective_has_no_text_tower():
    status, m = predict(RunSpec("test-vit", "adamw", batch_size=4))
    assert status == "ok" and m["params_total"] == PARAMS  # image tower + head only: no text tower to train
    with torch.device("meta"):
        names = dict(prepare(RunSpec("test-vit", "adamw")).model.named_parameters())
    assert not any(n.startswith(("token_embedding", "transformer.", "text")) for n in names)


def _logits(t, batch):
    """Allocations of one batch x batch fp32 matrix made by a matmul in the forward (world size 1)."""
    return [e for e in t.events if e.kind == 0 and e.nbytes == batch * batch * 4 and e.op == "aten.mm.default"
            and e.phase == "forward"]


def test_the_losss_logits_matrices_are_allocated():
    batch = 24
    t = trace(RunSpec("test-vit", "adamw", batch_size=batch, steps=2, objective="contrastive"))
    assert len(_logits(t, batch)) == 2 * 2  # ClipLoss: logits_per_image and logits_per_text, each step
    # negative control: the classifier has no batch x batch matrix
    assert _logits(trace(RunSpec("test-vit", "adamw", batch_size=batch, steps=2)), batch) == []


def _clip():
    with torch.device("meta"):
        return prepare(RunSpec("test-vit", "adamw", objective="contrastive")).model


def test_a_siglip_model_trains_its_logit_bias_with_siglip_loss(monkeypatch):
    from memprof.simulation import shared

    assert type(contrastive.make_loss(_clip())).__name__ == "ClipLoss"  # control: CLIP's loss without a bias
    original = contrastive.clip_config
    shared.clear()  # the memo would hand back the CLIP model's forward
    try:
        with monkeypatch.context() as patch:
            patch.setattr(contrastive, "clip_config", lambda info: {**original(info), "init_logit_bias": -10})
            m = _run(batch_size=6)
            model = _clip()
            t = trace(RunSpec("test-vit", "adamw", batch_size=6, objective="contrastive"))
    finally:
        shared.clear()
    assert type(contrastive.make_loss(model)).__name__ == "SigLipLoss" and model.logit_bias.requires_grad
    assert m["params_trainable"] == IMAGE + TEXT + SCALE + 1  # + logit_bias
    assert len(_logits(t, 6)) == 2  # SigLIP: one image x text logits matrix per step


def test_keys_name_the_objective_and_locks_only_when_not_default():
    spec = RunSpec("test-vit", "adamw", objective="contrastive", lock_image=True)
    assert spec.key == "test-vit/adamw/ckpt-off/32bit/bs1/fp32+contrastive+lock-image/steps2/titan-x"
    assert RunSpec("test-vit", "adamw").key == "test-vit/adamw/ckpt-off/32bit/bs1/fp32/steps2/titan-x"


@pytest.mark.parametrize("argv,words", [
    (["--models", "timm:resnet18", "--objective", "contrastive"],
     "contrastive needs a CLIP/SigLIP model: timm:resnet18 has no text tower"),
    (["--models", "test-vit", "--lock-text"], "--lock-text applies to --objective contrastive"),
    (["--models", "test-vit", "--lock-image"], "--lock-image applies to --objective contrastive"),
    (["--models", "test-vit", "--objective", "contrastive", "--grad-accum", "2"], "--accum-freq"),
    (["--models", "test-vit", "--objective", "contrastive", "--peft", "lora"], "use --peft off"),
    (["--models", "test-vit", "--objective", "constrastive"], "unknown objective 'constrastive'"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, argv, words):
    assert cli.main(["run", *argv, "--backend", "simulate", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err


def test_the_api_refuses_alike():
    import memprof

    with pytest.raises(UsageError) as exc:
        memprof.predict("timm:resnet18", "adamw", objective="contrastive")
    assert "contrastive needs a CLIP/SigLIP model" in str(exc.value)
