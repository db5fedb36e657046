"""--objective contrastive on a Hugging Face dual config (`hf:DIR`, CLIP or SigLIP): transformers' own CLIPModel /
SiglipModel and its own loss (memprof.contrastive.hf_contrastive). Parameter and state bytes against the model
transformers builds from the same config on the CPU, with negative controls."""

import pytest
import torch

import memprof
from memprof.errors import UsageError
from memprof.harness import prepare
from memprof.spec import RunSpec

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, vocab_size=100)
ADAMW = 8  # fp32 AdamW state per trained parameter (exp_avg, exp_avg_sq)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_dual")
    saved = {"clip": transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16),
             "siglip": transformers.SiglipConfig(vision_config=VISION, text_config=TEXT),
             "clip_vision": transformers.CLIPVisionConfig(**VISION)}
    for name, config in saved.items():
        config.save_pretrained(root / name)
    return {name: str(root / name) for name in saved}


def _reference(path):
    """The model transformers builds from the config, on the CPU: its parameter counts per tower."""
    net = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    counts = {"all": 0, "image": 0}
    for name, p in net.named_parameters():
        counts["all"] += p.numel()
        if name.startswith(("vision_model.", "visual_projection.")):
            counts["image"] += p.numel()
    return counts


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_both_towers_train_with_the_models_own_loss(dirs, kind):
    ref = _reference(dirs[kind])
    result = memprof.predict(f"hf:{dirs[kind]}", "adamw", objective="contrastive", batch_size=4)
    assert result.status == "ok"
    assert result.params_total == result.params_trainable == ref["all"]  # both towers, logit scale (and bias)
    assert result.optimizer_state_bytes == ADAMW * ref["all"]


def test_lock_image_leaves_the_vision_tower_without_state_and_unlocked_costs_more(dirs):
    ref = _reference(dirs["clip"])
    locked = memprof.predict(f"hf:{dirs['clip']}", "adamw", objective="contrastive", lock_image=True, batch_size=4)
    assert locked.params_trainable == ref["all"] - ref["image"]
    assert locked.optimizer_state_bytes == ADAMW * (ref["all"] - ref["image"])
    # negative control: unlocked, the vision tower and its projection get state too
    both = memprof.predict(f"hf:{dirs['clip']}", "adamw", objective="contrastive", batch_size=4)
    assert both.optimizer_state_bytes - locked.optimizer_state_bytes == ADAMW * ref["image"]


def test_the_step_is_transformers_own_model_and_loss(dirs):
    model = prepare(RunSpec(f"hf:{dirs['clip']}", "adamw", objective="contrastive")).model  # tiny, on the CPU
    assert type(model.net).__name__ == "CLIPModel" and model.contrastive_text == (16, 100)
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16))
    loss = model(images, texts)["loss"]
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad


def test_a_vision_only_config_is_refused_in_one_line(dirs):
    with pytest.raises(UsageError) as exc:
        memprof.predict(f"hf:{dirs['clip_vision']}", "adamw", objective="contrastive")
    assert "contrastive needs a CLIP/SigLIP model" in str(exc.value) and "\n" not in str(exc.value)
