"""An ordinary CUDA training script fine-tuning a timm ViT with LoRA through peft, as the peft docs show: the model
built by timm, LoRA adapters on every block's attention (qkv, proj) and MLP (fc1, fc2) linears, the base weights
frozen by peft, the new classification head trained whole, AdamW on what trains, cross-entropy on random images,
backward, step, zero_grad(set_to_none=True)."""
import argparse

import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="vit_tiny_patch16_224")
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--alpha", type=int, default=16)
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()

model = timm.create_model(args.model, pretrained=False, num_classes=10)
config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                    target_modules=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))")
model = inject_adapter_in_model(config, model)  # freezes every base weight
for p in model.head.parameters():
    p.requires_grad_(True)
model.train()
model.cuda()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
for step in range(args.steps):
    images = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 10, (args.batch_size,), device="cuda")
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
