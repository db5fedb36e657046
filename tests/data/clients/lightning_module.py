"""A LightningModule (torchvision vit_b_16, random weights) trained by Lightning's Trainer on the GPU, with a
validation loop and Lightning's own checkpoint at the end of the epoch.

    python lightning_module.py [--batch-size 2] [--precision bf16-mixed|16-mixed|32-true|bf16-true] [--out DIR]
"""
import argparse
import os
import tempfile

import lightning as L
import torch
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=2)
p.add_argument("--precision", default="bf16-mixed")
p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lightning_out"))
a = p.parse_args()


class Synthetic(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.randn(3, 224, 224), i % 5


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torchvision.models.vit_b_16(num_classes=5)

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def loader():
    return torch.utils.data.DataLoader(Synthetic(), batch_size=a.batch_size)


trainer = L.Trainer(accelerator="gpu", devices=1, precision=a.precision, max_epochs=1, logger=False,
                    default_root_dir=a.out, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Classifier(), loader(), loader())
