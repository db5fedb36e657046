"""An ordinary CUDA training script doing what `memprof run --models MODEL --optims adam|adamw [--precision
bf16-amp] [--optim-impl fused]` does: the model on
the device, Adam(model.parameters()) with torch's defaults (foreach resolved on CUDA), micro-batch training
steps of random images, cross-entropy, backward, step, zero_grad(set_to_none=True)."""
import argparse
import contextlib

import torch
import torch.nn.functional as F

from memprof.models import build_model, input_shape, resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="test-vit")
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--optim", default="adam", choices=["adam", "adamw"])
parser.add_argument("--fused", action="store_true")
parser.add_argument("--amp", default="none", choices=["none", "bf16"])
parser.add_argument("--in-backward", action="store_true", help="per-parameter optimizers stepped from hooks")
parser.add_argument("--print-peak", action="store_true")
parser.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                    help="torchrun-style: init_process_group('nccl'), then DistributedDataParallel or fully_shard")
parser.add_argument("--sdpa", default="default", choices=["default", "math", "flags"],
                    help="math: the loop under sdpa_kernel(SDPBackend.MATH); flags: enable_flash_sdp(False) and "
                         "enable_mem_efficient_sdp(False) before it")
parser.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP's bucket_cap_mb")
parser.add_argument("--grad-as-bucket-view", action="store_true", help="DDP's gradient_as_bucket_view")
args = parser.parse_args()

if args.parallel != "none":  # as torchrun starts it: the rank from the environment, one GPU per rank
    import os

    import torch.distributed as dist

    dist.init_process_group("nccl")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
model = build_model(resolve_model(args.model, None), 10)
model.train()
model.cuda()
c, h, w = input_shape(model)
if args.parallel == "ddp":
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank], bucket_cap_mb=args.bucket_cap_mb,
                                                      gradient_as_bucket_view=args.grad_as_bucket_view)
elif args.parallel == "fsdp":
    from torch.distributed.fsdp import fully_shard

    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optim]
kwargs = {"fused": True} if args.fused else {}
if args.in_backward:  # the PyTorch tutorial's optimizer-in-backward, hooks registered before the loop
    optimizers = {p: cls([p], **kwargs) for p in model.parameters()}

    def hook(param):
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
else:
    optimizer = cls(model.parameters(), **kwargs)
kernels = contextlib.ExitStack()
if args.sdpa == "math":
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels.enter_context(sdpa_kernel([SDPBackend.MATH]))
elif args.sdpa == "flags":
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
for _ in range(args.steps):
    images = torch.randn(args.batch_size, c, h, w, device="cuda")
    labels = torch.randint(0, 10, (args.batch_size,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    if not args.in_backward:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del images, labels, loss  # the harness drops each step's inputs before making the next
kernels.close()
if args.parallel != "none":
    dist.destroy_process_group()
if args.print_peak:
    print("PEAK", torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
