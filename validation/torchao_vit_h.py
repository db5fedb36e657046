"""torchao's low-bit optimizer benchmark (pytorch/ao, torchao/prototype/low_bit_optim/README.md, the table
"fine-tuning ViT-H (630M params) with BF16 AMP ..., batch size 8, on 4070Ti SUPER"; benchmarks/benchmark_low_bit_adam.py)
re-created in our own words: timm's vit_huge_patch14_224 with a 45-class head (resisc45), bf16 autocast, batch 8,
AdamW (fused, as "PyTorch (fused)") or bitsandbytes' AdamW8bit ("bnb 8-bit"). Random 224x224 images. Prints
torch.cuda.max_memory_allocated() / 1e9.
"""
import argparse

import timm
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--optim", default="fused", choices=["fused", "bnb8bit"])
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--steps", type=int, default=3)
a = p.parse_args()

model = timm.create_model("vit_huge_patch14_224", num_classes=45).cuda()
if a.optim == "fused":
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
else:
    import bitsandbytes as bnb
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)

for _ in range(a.steps):
    x = torch.rand(a.batch_size, 3, 224, 224, device="cuda")
    y = torch.randint(0, 45, (a.batch_size,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

print(f"max memory: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
