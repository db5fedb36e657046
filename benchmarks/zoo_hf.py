"""Hugging Face vision models built from a config (no hub download), as `py:zoo_hf:<name>` factories for
benchmarks/zoo_sweep.py. Each takes 3x224x224 and ends in a 10-class head (the towers without one: their pooled
output through a new linear layer)."""

import torch.nn as nn


def _classifier(config_cls, model_cls, **kw):
    config = config_cls(num_labels=10, **kw)
    net = model_cls(config)
    net.image_size = 224
    return net


class _Pooled(nn.Module):
    """A vision tower that has no classification head: its pooled output through a new linear layer."""

    image_size = 224

    def __init__(self, tower, width):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(width, 10)

    def forward(self, pixel_values):
        return self.head(self.tower(pixel_values=pixel_values).pooler_output)


class _Logits(nn.Module):
    image_size = 224

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net(pixel_values=pixel_values).logits


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    return _Logits(_classifier(ViTConfig, ViTForImageClassification))


def deit():
    from transformers import DeiTConfig, DeiTForImageClassification
    return _Logits(_classifier(DeiTConfig, DeiTForImageClassification))


def swin():
    from transformers import SwinConfig, SwinForImageClassification
    return _Logits(_classifier(SwinConfig, SwinForImageClassification))


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return _Logits(_classifier(ConvNextConfig, ConvNextForImageClassification))


def dinov2():
    from transformers import Dinov2Config, Dinov2ForImageClassification
    return _Logits(_classifier(Dinov2Config, Dinov2ForImageClassification, image_size=224))


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(image_size=224, patch_size=16)
    return _Pooled(CLIPVisionModel(config), config.hidden_size)


def siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    config = SiglipVisionConfig(image_size=224, patch_size=16)
    return _Pooled(SiglipVisionModel(config), config.hidden_size)
