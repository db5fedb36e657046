"""The timm source: `timm:NAME`, any name timm.list_models() gives, built by timm.create_model with its own head
for the run's classes (no weights downloaded). Its input is its pretrained config's (`--input-shape` changes it:
timm's ViT-style families take `img_size=`); its embedding is its family's (memprof.model_sources.base); it
checkpoints through timm's own `set_grad_checkpointing`."""

from __future__ import annotations

from functools import lru_cache

from memprof.errors import unknown_name
from memprof.model_sources.base import DEFAULT_INPUT_SHAPE, ModelInfo, ModelSource, family_embedding, source_model


@lru_cache(maxsize=64)
def _info(name: str) -> ModelInfo:
    """What a timm model is, from timm's registry and pretrained config, without building it."""
    import timm

    arch = name.partition(":")[2]
    if not timm.is_model(arch):
        raise unknown_name("timm model", arch, timm.list_models(), "memprof list models --source timm")
    family = timm.models.model_entrypoint(arch).__module__
    cfg = timm.models.get_pretrained_cfg(arch)
    shape = tuple(cfg.input_size) if cfg is not None and cfg.input_size else DEFAULT_INPUT_SHAPE
    return ModelInfo(name, f"timm {arch} ({family.rsplit('.', 1)[-1]})", embedding_modules=family_embedding(family),
                     vit=False, source="timm", input_shape=shape, ckpt_switch=True)


def _timm_model(info: ModelInfo, arch: str, num_classes: int):
    """timm's model at the input shape asked: a shape other than its pretrained config's is passed as `img_size=`
    (and `in_chans=`), which timm's ViT-style families take (positional embeddings and patch grid built for that
    size); a family whose constructor takes no img_size (CNNs) is built as it is and takes any size. One that fixes
    its size otherwise fails its first forward with timm's own message."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    native = tuple(cfg.input_size) if cfg is not None and cfg.input_size else None
    kwargs = {}
    if info.input_shape is not None and native is not None and tuple(info.input_shape) != native:
        if tuple(info.input_shape[1:]) != native[1:]:
            kwargs["img_size"] = tuple(info.input_shape[1:])
        if info.input_shape[0] != native[0]:
            kwargs["in_chans"] = info.input_shape[0]
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        kwargs.pop("img_size")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


class TimmSource(ModelSource):
    name = "timm"

    def names(self) -> list[str]:
        import timm

        return timm.list_models()

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        return _info(name)

    def build(self, info: ModelInfo, num_classes: int):
        return source_model(_timm_model(info, info.name.partition(":")[2], num_classes), info.input_shape)
