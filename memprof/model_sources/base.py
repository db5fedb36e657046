"""The ModelSource protocol: what memprof asks of a source of models, and ModelInfo, what a resolved model is.

A source answers, for the model names it owns (`NAME:ARCH`, or bare names for a `bare` source):

- `name`: the source's name (`memprof list models --source NAME`), also the prefix of its model names;
- `bare`: its names carry no prefix (open_clip's own); asked for any name no prefixed source owns;
- `takes_input_shape`: whether `--input-shape` sets the input (False: the architecture fixes it);
  `default_input_shape`: the input where neither the model nor `--input-shape` says (None: one must);
- `names()`: the architecture names it accepts (listed, matched against a misspelling);
- `resolve(name, simulated)`: the ModelInfo of a model name, checked without building the network where the
  source can say (a misspelled name is a UsageError with the close matches and the command that lists them);
  `simulated`: the simulation will trace it (a source refuses here what the simulation cannot predict);
- `check_simulatable(name)`: a UsageError for a name the simulation cannot predict (the simulate backend asks);
- `build(info, num_classes)`: the model, on the current default device: a module whose `.visual` is the
  network (freeze-embed's globs, `--pretrained` weights and gradient checkpointing act on it), with a
  classification head for `num_classes`, taking images of `info.input_shape` (SourceModel wraps a network that
  is the whole model);
- `grad_ckpt_reason(info)`: why gradient checkpointing cannot run on it (None: `.visual.set_grad_checkpointing`
  works);
- `pretrained_file(info, tag)`: the local file of a named set of published weights (`--pretrained TAG`; a path
  is read by memprof.models whatever the source);
- `text_config(info)` / `text_tower(info)`: the rest of a CLIP model, for `--resident clip`;
- `rebuilds_alike`: a name builds the same network every time, so the simulation may trace its forward once
  for every optimizer (False for a user's factory, which may build something else on the next call);
- `local_only(name)`: the name is known in this process alone (a factory handed to the Python API), so a run
  in a fresh process cannot build it.

`ModelSource` below gives the defaults; a source subclasses it (or provides the same attributes). The embedding
freeze-embed freezes is declared per family (FAMILY_EMBEDDING: the module that defines the network's class).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from memprof.errors import UsageError

CLIP_VIT_EMBEDDING = ("conv1", "ln_pre")
DEFAULT_INPUT_SHAPE = (3, 224, 224)  # torchvision's classification models (their weights' crop size)

# the embedding layer freeze-embed freezes, per family (the module that defines the model class): globs over
# the network's module (or parameter) names
FAMILY_EMBEDDING = {
    "timm.models.vision_transformer": ("patch_embed", "norm_pre"),
    "timm.models.convnext": ("stem",),
    "timm.models.resnet": ("conv1", "bn1"),
    "torchvision.models.vision_transformer": ("conv_proj",),
    "torchvision.models.convnext": ("features.0",),
    "torchvision.models.resnet": ("conv1", "bn1"),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    open_clip_config: str | None = None  # an open_clip architecture name (model_configs/<name>.json)
    vision_cfg: tuple = ()  # (key, value) pairs of a vision config, for models open_clip does not ship
    embed_dim: int = 0  # output width of the tower when vision_cfg is given
    embedding_modules: tuple[str, ...] = CLIP_VIT_EMBEDDING  # submodules of the tower that freeze-embed freezes
    paper: bool = False  # one of the seed paper's Table 4 models
    vit: bool = True  # open_clip's VisionTransformer (its set_grad_checkpointing works; ResNet/timm towers differ)
    source: str = "open_clip"  # the ModelSource it comes from (memprof.model_sources.registry)
    input_shape: tuple[int, int, int] | None = None  # (channels, height, width); None: the tower's image_size
    ckpt_switch: bool | None = None  # has set_grad_checkpointing (None: `vit` says, for open_clip towers)
    notes: tuple[str, ...] = ()  # what a prediction's record says about the model (its `notes`), e.g. its loss

    @property
    def grad_ckpt_reason(self) -> str | None:
        """Why gradient checkpointing cannot run on this model (None: it can, through the model's own switch)."""
        from memprof.model_sources.registry import get

        return get(self.source).grad_ckpt_reason(self)


class ModelSource:
    name = ""
    bare = False
    takes_input_shape = True
    default_input_shape: tuple[int, int, int] | None = None
    rebuilds_alike = True

    def local_only(self, name: str) -> bool:
        return False

    def names(self) -> list[str]:
        raise UsageError(f"--source {self.name}: this source has no list of names")

    def owns(self, name: str) -> bool:
        """Whether a model name is this source's (a prefixed source: `NAME:...`)."""
        return name.partition(":")[0] == self.name and ":" in name

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        raise NotImplementedError

    def check_simulatable(self, name: str) -> None:
        """A UsageError for a name the simulation cannot predict (by default it predicts every name it resolves)."""

    def build(self, info: ModelInfo, num_classes: int):
        raise NotImplementedError

    def grad_ckpt_reason(self, info: ModelInfo) -> str | None:
        return None if info.ckpt_switch else f"{info.name} has no gradient-checkpointing switch (set_grad_checkpointing)"

    def pretrained_file(self, info: ModelInfo, tag: str) -> str:
        raise UsageError(f"--pretrained {tag}: {info.name} has no published weights; pass a local file path")

    def text_config(self, info: ModelInfo) -> tuple[int, dict, bool]:
        raise UsageError(f"--resident clip: {info.name} is not an open_clip CLIP model with a text tower; use "
                         f"--resident tower")

    def text_tower(self, info: ModelInfo):
        self.text_config(info)
        raise NotImplementedError


def build_on_meta(make):
    """`make()`, building a model on the current default device. On the meta device, a constructor that computes
    with small tensors and reads them back to the host (torchvision's RegNet: its stage widths from torch.arange,
    torch.round ... `.tolist()`) cannot run: meta tensors have no data. Such a model is built again with the CPU
    as the default device and every parameter and buffer moved to meta as it is registered
    (`host_side_on_cpu`): its host-side computations get their numbers, no parameter keeps storage. A model that
    builds on meta is built there, exactly as before."""
    import torch

    if torch.get_default_device().type != "meta":
        return make()
    try:
        return make()
    except (NotImplementedError, RuntimeError) as exc:  # "Cannot copy out of meta tensor; no data!", .item()
        if "meta" not in str(exc):
            raise
    with host_side_on_cpu():
        return make()


@contextlib.contextmanager
def host_side_on_cpu():
    """The CPU as the default device, with each parameter and buffer a module registers in this thread moved to
    the meta device as it is registered (torch's global registration hooks): constructors compute on the CPU,
    the model ends on meta. A tensor made before its registration is allocated (uninitialised) on the CPU for
    that moment only; one a constructor fills before registering it is filled there."""
    import threading

    import torch
    from torch.nn.modules import module as torch_module

    owner = threading.get_ident()

    def to_meta(module, name, tensor):
        if tensor is None or tensor.device.type == "meta" or threading.get_ident() != owner:
            return None
        moved = tensor.to("meta")
        return torch.nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else moved

    hooks = (torch_module.register_module_parameter_registration_hook(to_meta),
             torch_module.register_module_buffer_registration_hook(to_meta))
    try:
        with torch.device("cpu"):
            yield
    finally:
        for hook in hooks:
            hook.remove()


# the weight of each auxiliary classifier's loss, by the type of output that carries them: GoogLeNet's 0.3 (Szegedy
# et al. 2015, "Going deeper with convolutions": "the losses of the auxiliary classifiers were weighted by 0.3"),
# Inception v3's 0.4 (TF-slim's inception_v3 training and PyTorch's fine-tuning tutorial); any other tuple of logits
# gets GoogLeNet's
AUX_LOSS_WEIGHT = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}


def classification_loss(output, labels):
    """The training step's loss: cross-entropy of the logits. A network that returns its auxiliary classifiers'
    logits too in training (torchvision's GoogLeNetOutputs and Inception3's InceptionOutputs, main logits first) is
    trained on the main loss plus its AUX_LOSS_WEIGHT times each auxiliary head's cross-entropy
    (an absent head, None, adds nothing). torchvision's reference script has no such loss (its GoogLeNet and
    Inception v3 weights are ported, not trained there)."""
    import torch.nn.functional as F

    weight = AUX_LOSS_WEIGHT.get(type(output).__name__)
    if weight is None:  # logits; any other output fails in cross_entropy as in the user's own loop
        return F.cross_entropy(output, labels)
    loss = F.cross_entropy(output[0], labels)
    for aux in output[1:]:
        if aux is not None:
            loss = loss + weight * F.cross_entropy(aux, labels)
    return loss


def aux_loss_note(output_type: str, heads: int) -> str:
    """What a record says of the loss `classification_loss` trains a network with auxiliary heads on."""
    weight = AUX_LOSS_WEIGHT[output_type]
    return (f"loss: the training forward returns {output_type} (logits and {heads} auxiliary classifier"
            f"{'s' if heads > 1 else ''}); trained on cross_entropy(logits) + {weight} x cross_entropy of each "
            f"auxiliary head's logits")


def family_embedding(family: str) -> tuple[str, ...]:
    """The embedding freeze-embed freezes for a network whose class a module defines (none declared: ())."""
    return FAMILY_EMBEDDING.get(family, ())


def source_model(net, input_shape):
    """A network that is the whole model (timm, torchvision, a user's factory) as memprof builds models: `.visual`
    is the network, `input_shape` what it takes."""
    import torch.nn as nn

    class SourceModel(nn.Module):
        """A timm, torchvision or user network as `.visual`, with the input shape it takes."""

        def __init__(self, net, input_shape):
            super().__init__()
            self.visual = net
            self.input_shape = input_shape

        def forward(self, images):
            return self.visual(images)

    return SourceModel(net, input_shape)
