"""An ordinary image-classification script: torchvision ResNet-18 in channels_last, SGD with momentum and a
cosine schedule, gradient accumulation over two micro-batches, an eval pass under no_grad with an accuracy read
back. Random data (as a stand-in dataset)."""
import argparse

import torch
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--accum", type=int, default=2)
p.add_argument("--iters", type=int, default=4)
a = p.parse_args()

device = torch.device("cuda:0")
torch.backends.cudnn.benchmark = True
model = torchvision.models.resnet18(num_classes=10).to(device, memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=a.iters)
model.train()
for i in range(a.iters):
    images = torch.randn(a.batch_size, 3, 64, 64).to(device, non_blocking=True, memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (a.batch_size,)).to(device, non_blocking=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels) / a.accum
    loss.backward()
    if (i + 1) % a.accum == 0:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
model.eval()
correct = 0
with torch.no_grad():
    images = torch.randn(a.batch_size, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    correct += (model(images).argmax(1) == 0).sum().item()
print("accuracy", correct / a.batch_size, "lr", scheduler.get_last_lr()[0])
