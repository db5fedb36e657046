"""`memprof run --models py:hf_models:vit`: the HF Trainer client's model (tests/data/clients/hf_trainer.py), its
logits taken from the ImageClassifierOutput as the Trainer's loss takes them."""
import torch


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return Logits(ViTForImageClassification(ViTConfig(num_labels=5)))
