"""The torchvision source: `torchvision:NAME`, any name torchvision.models.list_models() gives, built by
torchvision.models.get_model with its own head for the run's classes (no weights). Its input is its weights' crop
(3x224x224) unless `--input-shape` says otherwise; its embedding is its family's (memprof.model_sources.base); it
has no gradient-checkpointing switch."""

from __future__ import annotations

from functools import lru_cache

from memprof.errors import unknown_name
from memprof.model_sources.base import DEFAULT_INPUT_SHAPE, ModelInfo, ModelSource, family_embedding, source_model


@lru_cache(maxsize=64)
def _info(name: str) -> ModelInfo:
    """What a torchvision model is, from torchvision's registry, without building it."""
    import torchvision

    arch = name.partition(":")[2]
    names = torchvision.models.list_models()
    if arch not in names:
        raise unknown_name("torchvision model", arch, names, "memprof list models --source torchvision")
    family = torchvision.models.get_model_builder(arch).__module__
    return ModelInfo(name, f"torchvision {arch} ({family.rsplit('.', 1)[-1]})",
                     embedding_modules=family_embedding(family), vit=False, source="torchvision", input_shape=None,
                     ckpt_switch=False)


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

        net = torchvision.models.get_model(info.name.partition(":")[2], weights=None, num_classes=num_classes)
        return source_model(net, info.input_shape)
