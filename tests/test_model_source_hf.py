"""The hf: model source (memprof.model_sources.hf): a model from a Hugging Face config, a local directory holding
config.json or a name already in the local HF cache, built with random weights. Tiny configs written here (ViT
32 px, patch 8, width 32, 2 layers): a prediction equals the py: factory route for the same network, parameter
bytes equal the count from the config, CLIP/SigLIP configs give their image tower plus a head, freeze-embed
freezes the patch embedding, and every wrong name is one line."""

import math
import os
import subprocess
import sys

import pytest
import torch

import memprof
from memprof.errors import UsageError
from memprof.models import build_model, resolve_model

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
CLASSES = 10  # memprof's default --num-classes


def vit_parameter_shapes(hidden: int, layers: int = 2, inter: int = 64, patch: int = 8, image: int = 32,
                         channels: int = 3, classes: int = CLASSES) -> list[tuple[int, ...]]:
    """The parameters of ViTForImageClassification, counted by hand from its config: the patch projection,
    [CLS], position embeddings of the patches and [CLS], per layer two layer norms, q/k/v/o and the MLP (all with
    biases), the final layer norm and the classifier (no pooler)."""
    patches = (image // patch) ** 2
    shapes = [(hidden, channels, patch, patch), (hidden,), (1, 1, hidden), (1, patches + 1, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,)] + [(hidden, hidden), (hidden,)] * 4
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,), (hidden,), (hidden,)]
    return shapes + [(hidden,), (hidden,), (classes, hidden), (classes,)]


def parameter_bytes(shapes) -> int:
    """fp32 parameters as the CUDA caching allocator holds them: each tensor rounded up to 512 bytes."""
    return sum(-(-math.prod(s) * 4 // 512) * 512 for s in shapes)


def check_parameters(result, shapes) -> None:
    assert result.params_total == sum(math.prod(s) for s in shapes)
    assert result.breakdown_at_peak_bytes["parameters"] == parameter_bytes(shapes)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Tiny configs saved as a Hugging Face model directory holds them (config.json)."""
    root = tmp_path_factory.mktemp("hf")
    saved = {
        "vit": transformers.ViTConfig(**SMALL),
        "vit48": transformers.ViTConfig(**{**SMALL, "hidden_size": 48}),
        "clip": transformers.CLIPConfig(vision_config=SMALL, text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        "siglip_vision": transformers.SiglipVisionConfig(**SMALL),
        "convnext": transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32),
    }
    for name, config in saved.items():
        config.save_pretrained(root / name)
    return {name: str(root / name) for name in saved}


@pytest.fixture(scope="module")
def vit_sgd(configs):
    return memprof.predict(f"hf:{configs['vit']}", "sgd")


def test_a_vit_config_predicts_as_its_py_factory_does(configs, vit_sgd, tmp_path, monkeypatch):
    (tmp_path / "hf_factory_vit.py").write_text(f'''
import torch
from transformers import ViTConfig, ViTForImageClassification


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def vit():
    return Logits(ViTForImageClassification(ViTConfig.from_pretrained({configs["vit"]!r}, num_labels={CLASSES})))
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    by_factory = memprof.predict("py:hf_factory_vit:vit", "sgd", input_shape="3x32x32")
    assert vit_sgd.status == by_factory.status == "ok", (vit_sgd.error, by_factory.error)
    assert vit_sgd.peak_allocated_bytes == by_factory.peak_allocated_bytes > 0
    assert vit_sgd.peak_reserved_bytes == by_factory.peak_reserved_bytes
    assert vit_sgd.params_total == by_factory.params_total
    info = resolve_model(f"hf:{configs['vit']}")
    assert (info.source, info.input_shape, info.grad_ckpt_reason) == ("hf", (3, 32, 32), None)


def test_parameter_bytes_are_the_count_from_the_config(configs, vit_sgd):
    check_parameters(vit_sgd, vit_parameter_shapes(32))  # 24,234 parameters, 107,008 bytes
    assert vit_sgd.params_total == 24234 and vit_sgd.breakdown_at_peak_bytes["parameters"] == 107008
    wider = memprof.predict(f"hf:{configs['vit48']}", "sgd")
    check_parameters(wider, vit_parameter_shapes(48))
    assert wider.params_total != vit_sgd.params_total
    with pytest.raises(AssertionError):  # negative control: the helper fed the other config's count fails
        check_parameters(wider, vit_parameter_shapes(32))


def test_clip_and_siglip_configs_give_their_image_tower_and_a_head(configs):
    for key, tower_cls in (("clip", transformers.CLIPVisionModel), ("siglip_vision", transformers.SiglipVisionModel)):
        name = f"hf:{configs[key]}"
        info = resolve_model(name)
        assert tower_cls.__name__ in info.description and info.input_shape == (3, 32, 32)
        result = memprof.predict(name, "adamw")
        assert result.status == "ok", result.error
        with torch.device("meta"):
            config = transformers.AutoConfig.from_pretrained(configs[key])
            tower = tower_cls(getattr(config, "vision_config", config))
        assert result.params_total == sum(p.numel() for p in tower.parameters()) + 32 * CLASSES + CLASSES
    # the dual CLIP config builds no text tower: as the CLIP vision config alone
    with torch.device("meta"):
        model = build_model(resolve_model(f"hf:{configs['clip']}"), CLASSES)
    assert type(model.visual).__name__ == "CLIPVisionModel" and model.head.in_features == 32


def test_freeze_embed_freezes_exactly_the_patch_embedding(configs):
    result = memprof.predict(f"hf:{configs['vit']}", "sgd-fe")
    assert result.status == "ok", result.error
    assert result.frozen_parameter_names == ["visual.vit.embeddings.patch_embeddings.projection.bias",
                                             "visual.vit.embeddings.patch_embeddings.projection.weight"]
    assert result.params_total - result.params_trainable == 32 * 3 * 8 * 8 + 32
    # CLIP: the patch embedding and the layer norm after it, as open_clip's conv1 + ln_pre
    clip = resolve_model(f"hf:{configs['clip']}")
    assert [n.rsplit(".", 1)[-1] for n in clip.embedding_modules] == ["patch_embedding", "pre_layrnorm"]
    # ConvNeXt: its embeddings are its stem (conv + layer norm), as timm's `stem`
    assert resolve_model(f"hf:{configs['convnext']}").embedding_modules == ("convnext.embeddings",)


def test_gradient_checkpointing_is_transformers_own_switch_or_refused(configs):
    info = resolve_model(f"hf:{configs['vit']}")
    with torch.device("meta"):
        model = build_model(info, CLASSES)
    model.visual.set_grad_checkpointing(True)  # what the harness turns
    flags = [m.gradient_checkpointing for m in model.visual.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)
    convnext = resolve_model(f"hf:{configs['convnext']}")
    assert "does not support gradient checkpointing" in convnext.grad_ckpt_reason


def test_pretrained_weights_from_a_local_file_only(configs, tmp_path):
    from safetensors.torch import save_file

    net = transformers.ViTForImageClassification(transformers.ViTConfig.from_pretrained(configs["vit"],
                                                                                       num_labels=CLASSES))
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    assert memprof.predict(f"hf:{configs['vit']}", "sgd", pretrained=str(tmp_path / "vit.safetensors")).status == "ok"
    for missing in (str(tmp_path / "none.safetensors"), "imagenet"):
        with pytest.raises(UsageError, match="no such file") as err:
            memprof.predict(f"hf:{configs['vit']}", "sgd", pretrained=missing)
        assert "\n" not in str(err.value)


def test_wrong_names_are_one_line_naming_the_local_form(configs, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {"hf:no-such-org-memprof/no-such-model": "not in the local Hugging Face cache",
             f"hf:{tmp_path / 'empty'}": "has no config.json",
             f"hf:{tmp_path / 'absent'}": "no such directory"}
    for name, what in cases.items():
        with pytest.raises(UsageError, match=what) as err:
            resolve_model(name)
        assert "\n" not in str(err.value) and "hf:/path/to/dir-with-config.json" in str(err.value)
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    with pytest.raises(UsageError, match="no image-classification model for model_type 'bert'"):
        resolve_model(f"hf:{bert}")
    with pytest.raises(UsageError, match="no list"):
        memprof.models.source_names("hf")


def test_without_transformers_one_line_names_the_install(monkeypatch):
    from memprof.model_sources import hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    hf._config.cache_clear()
    hf._info.cache_clear()
    with pytest.raises(UsageError, match=r"pip install transformers"):
        resolve_model("hf:google/vit-base-patch16-224")


def test_the_command_line_says_a_missing_hub_name_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(memprof.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "memprof", "run", "--models", "hf:no/such-model", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "hf:/path/to/dir-with-config.json" in done.stderr and "no/such-model" in done.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists()
