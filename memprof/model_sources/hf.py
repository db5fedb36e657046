"""The hf source: `hf:DIR` (a local directory holding a Hugging Face config.json) or `hf:ORG/NAME` (a model
name whose config is already in the local Hugging Face cache: no model hub is reachable, so it is read as with
HF_HUB_OFFLINE=1), built from its config by transformers with random weights.

- An image-classification config (ViT, DeiT, Swin, ConvNeXt, DINOv2, ...) is built by
  AutoModelForImageClassification.from_config with `num_labels` set to the run's classes; its forward returns the
  logits of the ModelOutput.
- A CLIP or SigLIP config (the dual model or its `*_vision_model`) is built as its image tower (CLIPVisionModel,
  SiglipVisionModel) with a new linear head on the pooled output, as open_clip's towers are
  (memprof.model_sources.open_clip).

The HF network is `.visual` under its own module names (--freeze globs and the breakdown use them). Its input is
the config's (num_channels, image_size); `--input-shape` rebuilds it from the config with that size and channel
count. Its embedding (freeze-embed) is the patch embedding and the norm right after it where the family has one
(HF_EMBEDDING), found on the network built on the meta device. It checkpoints through transformers' own switch
(gradient_checkpointing_enable, with the installed version's defaults) where the model class supports it.
Weights (`--pretrained FILE`) come from a local file only, as for every source (memprof.models.read_pretrained).
"""

from __future__ import annotations

import copy
import os
import re
import types
from functools import lru_cache

from memprof.errors import UsageError
from memprof.model_sources.base import DEFAULT_INPUT_SHAPE, ModelInfo, ModelSource

INSTALL_HINT = "hf: models need transformers: pip install transformers (or pip install -e '.[hf]')"
LOCAL_FORM = "hf:/path/to/dir-with-config.json"

# dual image-text models whose image tower is built (AutoModel of their vision config) with a linear head
TOWER_TYPES = ("clip", "siglip")

# the embedding freeze-embed freezes, per model_type: suffixes of module names in the network (the first module
# ending in each is taken). Not listed: the patch embedding alone (`embeddings.patch_embeddings` or
# `embeddings.patch_embedding`). As memprof declares it for open_clip and timm: the patch embedding and the norm
# right after it (CLIP's pre_layrnorm as open_clip's ln_pre; Swin's embedding norm as timm's patch_embed.norm;
# ConvNeXt's embeddings are its stem, conv + layernorm, as timm's `stem`).
HF_EMBEDDING = {
    "clip": ("embeddings.patch_embedding", "pre_layrnorm"),
    "swin": ("embeddings.patch_embeddings", "embeddings.norm"),
    "convnext": ("embeddings",),
    "convnextv2": ("embeddings",),
}
PATCH_EMBEDDING = ("embeddings.patch_embeddings", "embeddings.patch_embedding")

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return transformers


def _where(name: str) -> str:
    return name.partition(":")[2]


@lru_cache(maxsize=64)
def _config(name: str):
    """The config a name gives: a local directory's config.json, else a model name from the local Hugging Face
    cache (local_files_only). Each failure is one UsageError saying what to give instead."""
    where = _where(name)
    if not where:
        raise UsageError(f"model '{name}': give {LOCAL_FORM} or a cached Hugging Face name (hf:ORG/NAME)")
    transformers = _transformers()
    path = os.path.expanduser(where)
    local = os.path.isdir(path)
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"model '{name}': {path} has no config.json; give {LOCAL_FORM}")
    if not local and not _HUB_NAME.fullmatch(where):
        raise UsageError(f"model '{name}': no such directory {path}; give {LOCAL_FORM}")
    try:
        config = transformers.AutoConfig.from_pretrained(path if local else where, local_files_only=True)
    except OSError:
        if local:
            raise UsageError(f"model '{name}': {path}/config.json cannot be read; give {LOCAL_FORM}") from None
        raise UsageError(f"model '{name}': '{where}' is not in the local Hugging Face cache and no model hub is "
                         f"reachable; give a local directory holding its config.json: {LOCAL_FORM}") from None
    except (ValueError, KeyError, TypeError) as exc:  # a config.json transformers cannot read (no/unknown model_type)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"model '{name}': transformers cannot read its config ({first})") from None
    return config


def _kind(config) -> str:
    """`tower` (a CLIP/SigLIP config: its image tower plus a head) or `classifier`."""
    model_type = getattr(config, "model_type", "")
    return "tower" if model_type.removesuffix("_vision_model") in TOWER_TYPES else "classifier"


def _family(config) -> str:
    return config.model_type.removesuffix("_vision_model")


def _image_config(config):
    """The config that says the images: a tower's vision config, else the config itself."""
    return getattr(config, "vision_config", config) if _kind(config) == "tower" else config


def _model_class(name: str):
    """The transformers class the name builds (checked without building): AutoModelForImageClassification's
    for the config, or the image tower's (AutoModel of the vision config)."""
    transformers = _transformers()
    config = _config(name)
    if _kind(config) == "tower":
        return transformers.AutoModel._model_mapping[type(_image_config(config))]
    mapping = transformers.AutoModelForImageClassification._model_mapping
    if type(config) not in mapping:
        raise UsageError(f"model '{name}': transformers has no image-classification model for model_type "
                         f"'{config.model_type}' (AutoModelForImageClassification); give a vision config (ViT, "
                         f"Swin, ConvNeXt, ..., or CLIP/SigLIP for their image tower)")
    found = mapping[type(config)]
    return found[0] if isinstance(found, (list, tuple)) else found


def _shape(config) -> tuple[int, int, int]:
    """(channels, height, width) the config says its images are."""
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None) or 3
    if isinstance(size, int):
        return (channels, size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (channels, *size)
    return (channels, *DEFAULT_INPUT_SHAPE[1:])


def _float32(transformers) -> dict:
    """from_config's keyword for float32 weights whatever the config names (`dtype` from transformers 5 on)."""
    import torch

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def _network(name: str, num_classes: int, input_shape=None):
    """The HF network for a name (on the current default device), with float32 weights whatever dtype the
    config names (memprof's --precision sets the dtype): the classifier, or the image tower and its pooled
    output's width."""
    transformers = _transformers()
    config = copy.deepcopy(_config(name))
    tower = _kind(config) == "tower"
    target = _image_config(config)  # (config is a copy: changed here only)
    if input_shape is not None:
        channels, height, width = input_shape
        target.image_size = height if height == width else (height, width)
        target.num_channels = channels
    dtype = _float32(transformers)
    if tower:
        return transformers.AutoModel.from_config(target, **dtype), target.hidden_size
    config.num_labels = num_classes
    if getattr(config, "architectures", None) is None:  # from_config reads it where a type maps to several classes
        config.architectures = []
    return transformers.AutoModelForImageClassification.from_config(config, **dtype), None


def _embedding(net, config) -> tuple[str, ...]:
    """The module names of the declared embedding in a built network (HF_EMBEDDING; else the patch embedding);
    () where none is found."""
    names = [n for n, _ in net.named_modules() if n]
    suffixes = HF_EMBEDDING.get(_family(config))
    if suffixes is None:
        hits = [n for n in names if any(n == s or n.endswith("." + s) for s in PATCH_EMBEDDING)]
        return tuple(hits[:1])
    out = []
    for suffix in suffixes:
        hit = next((n for n in names if n == suffix or n.endswith("." + suffix)), None)
        if hit is None:
            return ()
        out.append(hit)
    return tuple(out)


@lru_cache(maxsize=64)
def _info(name: str) -> ModelInfo:
    """What a name builds: its config read, its class looked up, and the network built once on the meta device
    (no memory) for the embedding's module names."""
    import torch

    config = _config(name)
    cls = _model_class(name)
    try:
        with torch.device("meta"):
            net, _ = _network(name, 2)
    except UsageError:
        raise
    except Exception as exc:  # a config transformers' classes cannot be built from: say what they said
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"model '{name}': transformers cannot build {cls.__name__} from its config "
                         f"({type(exc).__name__}: {first})") from None
    kind = " image tower + linear head" if _kind(config) == "tower" else ""
    where = "local config" if os.path.isdir(os.path.expanduser(_where(name))) else "cached config"
    return ModelInfo(name, f"Hugging Face {cls.__name__}{kind} ({config.model_type}, {where}, random weights)",
                     embedding_modules=_embedding(net, config), vit=False, source="hf",
                     input_shape=_shape(_image_config(config)),
                     ckpt_switch=bool(getattr(cls, "supports_gradient_checkpointing", False)))


def _set_grad_checkpointing(net, enable: bool = True) -> None:
    """The switch memprof turns (`.visual.set_grad_checkpointing`), as transformers' own: its
    activation_checkpointing_enable (gradient_checkpointing_enable before 5.x), with the installed version's
    defaults (what a user calling it, or the Trainer's gradient_checkpointing=True, gets)."""
    if enable:
        switch = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
    else:
        switch = getattr(net, "activation_checkpointing_disable", None) or net.gradient_checkpointing_disable
    switch()


def dual_model(name: str):
    """The whole CLIP / SigLIP model of a dual config (both towers, their projections, the logit scale; SigLIP's
    logit bias), float32, random weights (`--objective contrastive`: memprof.contrastive), with its text inputs'
    (context length, vocabulary size); a UsageError in one line for a config without a text tower."""
    transformers = _transformers()
    config = copy.deepcopy(_config(name))
    if _kind(config) != "tower" or getattr(config, "text_config", None) is None:
        raise UsageError(f"contrastive needs a CLIP/SigLIP model: {name} ({config.model_type}) has no text tower "
                         f"(give the dual model's config, model_type clip or siglip), or use --objective classify")
    dtype = _float32(transformers)
    net = transformers.AutoModel.from_config(config, **dtype)
    net.set_grad_checkpointing = types.MethodType(_set_grad_checkpointing, net)
    text = config.text_config
    return net, (text.max_position_embeddings, text.vocab_size)


def hf_model(net, input_shape, head_width: int | None = None, num_classes: int = 0):
    """An HF network as memprof builds models: `.visual` is the network, the forward returns logits (a
    classifier's `.logits`; a tower's pooled output through a new `.head`)."""
    import torch.nn as nn

    net.set_grad_checkpointing = types.MethodType(_set_grad_checkpointing, net)
    if head_width is None:

        class HFClassifier(nn.Module):
            """A transformers image classifier as `.visual`, its logits out of the ModelOutput."""

            def __init__(self):
                super().__init__()
                self.visual = net
                self.input_shape = input_shape

            def forward(self, images):
                return self.visual(pixel_values=images).logits

        return HFClassifier()

    class HFTower(nn.Module):
        """A transformers image tower as `.visual`, its pooled output through a new linear head."""

        def __init__(self):
            super().__init__()
            self.visual = net
            self.head = nn.Linear(head_width, num_classes)
            self.input_shape = input_shape

        def forward(self, images):
            return self.head(self.visual(pixel_values=images).pooler_output)

    return HFTower()


class HFSource(ModelSource):
    name = "hf"

    def names(self) -> list[str]:
        raise UsageError(f"--source hf: an hf: model is a config (a local directory, {LOCAL_FORM}, or a Hugging "
                         f"Face name already in the local cache, hf:ORG/NAME), so there is no list")

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        return _info(name)

    def build(self, info: ModelInfo, num_classes: int):
        shape = tuple(info.input_shape) if info.input_shape is not None else None
        native = _info(info.name).input_shape
        net, width = _network(info.name, num_classes, shape if shape != native else None)
        if width is None:
            return hf_model(net, shape)
        return hf_model(net, shape, width, num_classes)

    def grad_ckpt_reason(self, info: ModelInfo) -> str | None:
        if info.ckpt_switch:
            return None
        return (f"{info.name}: transformers' {_model_class(info.name).__name__} does not support gradient "
                f"checkpointing (supports_gradient_checkpointing is False)")

    def pretrained_file(self, info: ModelInfo, tag: str) -> str:
        raise UsageError(f"--pretrained {tag}: no such file; hf: models take weights from a local file only (a "
                         f".safetensors or torch.save state dict of the network), no model hub is reachable")

