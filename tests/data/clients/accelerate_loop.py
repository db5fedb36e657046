"""A plain Hugging Face accelerate loop (timm vit_base_patch16_224, random weights): prepare, train one epoch,
evaluate, save the state.

    python accelerate_loop.py [--batch-size 2] [--mixed-precision bf16|fp16|no] [--out DIR]
"""
import argparse
import os
import tempfile

import timm
import torch
from accelerate import Accelerator

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=2)
p.add_argument("--mixed-precision", default="bf16")
p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "accelerate_out"))
a = p.parse_args()

accelerator = Accelerator(mixed_precision=a.mixed_precision)
model = timm.create_model("vit_base_patch16_224", num_classes=5)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
data = torch.utils.data.TensorDataset(torch.randn(8, 3, 224, 224), torch.arange(8) % 5)
train = torch.utils.data.DataLoader(data, batch_size=a.batch_size)
evaluate = torch.utils.data.DataLoader(data, batch_size=a.batch_size)
model, optimizer, train, evaluate = accelerator.prepare(model, optimizer, train, evaluate)
model.train()
for x, y in train:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
model.eval()
correct = 0
with torch.no_grad():
    for x, y in evaluate:
        correct += (model(x).argmax(-1) == y).sum().item()
accelerator.print("accuracy", correct / len(data))
accelerator.save_state(a.out)
