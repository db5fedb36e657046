"""The torchvision source: `torchvision:NAME`, any name torchvision.models.list_models() gives, built by
torchvision.models.get_model with its own head for the run's classes (no weights). Its input is 3x224x224 unless
`--input-shape` says otherwise, or, for a model that cannot train at 224 (NATIVE_CROP: Inception v3), its
weights' crop (299); its embedding is its family's (memprof.model_sources.base); it has no
gradient-checkpointing switch. A model whose constructor computes on the host with tensors (RegNet) is built
with those computations on the CPU and its parameters on meta (memprof.model_sources.base.build_on_meta). A
model that returns auxiliary logits in training (AUX_OUTPUTS) is trained on its main and auxiliary losses
(memprof.model_sources.base.classification_loss), and its records say so."""

from __future__ import annotations

from functools import lru_cache

from memprof.errors import unknown_name
from memprof.model_sources.base import (DEFAULT_INPUT_SHAPE, ModelInfo, ModelSource, aux_loss_note, build_on_meta,
                                        family_embedding, source_model)

# models whose training forward needs their weights' crop, not 224: Inception v3's auxiliary classifier (a 5x5
# average pool, stride 3, then a 5x5 convolution) needs Mixed_6e's 17x17 maps, which 224 px inputs make 12x12
NATIVE_CROP = ("inception_v3",)
# models that return their auxiliary classifiers' logits in training (aux_logits=True, their default without
# weights): the namedtuple's type and how many auxiliary heads it carries
AUX_OUTPUTS = {"googlenet": ("GoogLeNetOutputs", 2), "inception_v3": ("InceptionOutputs", 1)}


def native_input_shape(arch: str) -> tuple[int, int, int] | None:
    """(3, crop, crop) from the default weights' transforms for a model in NATIVE_CROP, else None (the source's
    224)."""
    if arch not in NATIVE_CROP:
        return None
    import torchvision

    crop = torchvision.models.get_model_weights(arch).DEFAULT.transforms.keywords["crop_size"]
    return (3, crop, crop)


@lru_cache(maxsize=64)
def _info(name: str) -> ModelInfo:
    """What a torchvision model is, from torchvision's registry, without building it."""
    import torchvision

    arch = name.partition(":")[2]
    names = torchvision.models.list_models()
    if arch not in names:
        raise unknown_name("torchvision model", arch, names, "memprof list models --source torchvision")
    family = torchvision.models.get_model_builder(arch).__module__
    aux = AUX_OUTPUTS.get(arch)
    return ModelInfo(name, f"torchvision {arch} ({family.rsplit('.', 1)[-1]})",
                     embedding_modules=family_embedding(family), vit=False, source="torchvision",
                     input_shape=native_input_shape(arch), ckpt_switch=False,
                     notes=(aux_loss_note(*aux),) if aux else ())


class TorchvisionSource(ModelSource):
    name = "torchvision"
    default_input_shape = DEFAULT_INPUT_SHAPE

    def names(self) -> list[str]:
        import torchvision

        return torchvision.models.list_models()

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        return _info(name)

    def build(self, info: ModelInfo, num_classes: int):
        import torchvision

        net = build_on_meta(lambda: torchvision.models.get_model(info.name.partition(":")[2], weights=None,
                                                                 num_classes=num_classes))
        return source_model(net, info.input_shape)
