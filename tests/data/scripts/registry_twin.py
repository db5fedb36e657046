"""An ordinary CUDA training script doing what `memprof run --models MODEL --optims adam` does: the model on
the device, Adam(model.parameters()) with torch's defaults (foreach resolved on CUDA), micro-batch training
steps of random images, cross-entropy, backward, step, zero_grad(set_to_none=True)."""
import argparse

import torch
import torch.nn.functional as F

from memprof.models import build_model, input_shape, resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="test-vit")
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--print-peak", action="store_true")
args = parser.parse_args()

model = build_model(resolve_model(args.model, None), 10)
model.train()
model.cuda()
optimizer = torch.optim.Adam(model.parameters())
c, h, w = input_shape(model)
for _ in range(args.steps):
    images = torch.randn(args.batch_size, c, h, w, device="cuda")
    labels = torch.randint(0, 10, (args.batch_size,), device="cuda")
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
if args.print_peak:
    print("PEAK", torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
