"""Fine-tuning torchvision's ViT as Sebastian Raschka's precision benchmarks do, in plain PyTorch.

Re-created in our own words from rasbt/ViT-finetuning-scripts, precision-benchmarks/torchvision-vit16-{large,small}
(01_pytorch-fp32.py, 03_fp16-mixed.py, 04_bf16-mixed.py, 06_bf16-full.py; PyTorch 2.1.0+cu121, Lightning 2.1.0): a
torchvision vit_l_16 (batch 32) or vit_b_16 (batch 16), its head replaced by a 10-class Linear, Adam(lr=5e-5), each
step: forward, cross-entropy, zero_grad (after the forward, as in the scripts the READMEs' figures were published with,
commit 2372d1b; a later "cosmetic fixes" commit moved it after the step without re-measuring), backward, step, then
the batch's argmax under no_grad. Lightning Fabric's precisions written out: 16-mixed is autocast(float16) with a
GradScaler, bf16-mixed autocast(bfloat16), bf16-true the model in bfloat16 with Fabric's handling of the batch (2.1:
_FabricDataLoader moves the float32 batch to the device, _FabricModule.forward casts it with HalfPrecision.convert_input
and the output back to float32 with convert_output, so the float32 batch stays alive, held by the loop variable, while
its bfloat16 copy feeds the model; under autocast Fabric's cast of the input equals the one autocast makes at the patch
embedding, so the mixed precisions are written as plain autocast). CIFAR-10 resized to 224 is replaced by random
224x224 images (the memory does not depend on the pixels). Prints torch.cuda.max_memory_reserved() / 1e9, the figure
the READMEs publish ("Memory used ... GB").

    python raschka_vit_precision.py --model vit_l_16 --precision bf16-true --batch-size 32 --steps 3
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--model", default="vit_b_16", choices=["vit_b_16", "vit_l_16"])
p.add_argument("--precision", default="fp32", choices=["fp32", "16-mixed", "bf16-mixed", "bf16-true"])
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--eval-batches", type=int, default=0, help="then this many validation batches under no_grad in "
               "eval mode, as each epoch of the original ends (its val_loader: 10% of CIFAR-10's training set)")
a = p.parse_args()

torch.set_float32_matmul_precision("medium")
model = getattr(torchvision.models, a.model)(weights=None)
model.heads.head = torch.nn.Linear(model.heads.head.in_features, 10)
optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
if a.precision == "bf16-true":
    model = model.to(torch.bfloat16)
model = model.cuda()
scaler = torch.amp.GradScaler("cuda") if a.precision == "16-mixed" else None
autocast_dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(a.precision)

for step in range(a.steps):
    model.train()
    features = torch.rand(a.batch_size, 3, 224, 224).cuda()
    targets = torch.randint(0, 10, (a.batch_size,)).cuda()
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if a.precision == "bf16-true":  # Fabric: the float32 batch stays; its bfloat16 copy in, float32 logits out
            logits = model(features.to(torch.bfloat16)).float()
        else:
            logits = model(features)
        loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.argmax(logits, 1)

model.eval()
with torch.no_grad():
    for _ in range(a.eval_batches):
        features = torch.rand(a.batch_size, 3, 224, 224).cuda()
        outputs = model(features.to(torch.bfloat16)).float() if a.precision == "bf16-true" else model(features)
        predicted = torch.argmax(outputs, 1)

print(f"Memory used: {torch.cuda.max_memory_reserved() / 1e9:.02f} GB")
