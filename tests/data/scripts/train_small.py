"""An ordinary CUDA training script (a small transformer on random data), with the switches the tests flip:
autocast, GradScaler, checkpointing, the optimizer's foreach/fused, optimizer-in-backward hooks."""
import argparse

import torch
import torch.nn as nn
import torch.utils.checkpoint

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--width", type=int, default=256)
p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
p.add_argument("--ckpt", action="store_true")
p.add_argument("--foreach", default="none", choices=["none", "on", "off"])
p.add_argument("--fused", action="store_true")
p.add_argument("--in-backward", action="store_true")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--forever", action="store_true")
p.add_argument("--print-peak", action="store_true")
a = p.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Net(nn.Module):
    def __init__(self, d, depth=2):
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if a.ckpt else b(x)
        return self.head(x.mean(1))


model = Net(a.width)
if a.in_backward:  # per-parameter optimizers stepped by hooks, registered before the model moves
    optimizers = {p: torch.optim.Adam([p], foreach=False) for p in model.parameters()}

    def hook(param):
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(hook)
    optimizer = None
model.to(device)
if not a.in_backward:
    kwargs = {"fused": True} if a.fused else {"foreach": {"none": None, "on": True, "off": False}[a.foreach]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
step = 0
while a.forever or step < a.steps:
    x = torch.randn(a.batch_size, 64, 48).to(device, non_blocking=True)
    y = torch.randint(0, 10, (a.batch_size,)).to(device)
    with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if optimizer is not None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if torch.isnan(loss):
        raise SystemExit("nan loss")
    print(f"step {step} loss {loss.item():.4f}")
    step += 1
if a.print_peak:
    print("PEAK", torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
