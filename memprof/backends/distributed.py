"""Measured DDP and FSDP2 on one GPU: a real world-size-1 process group (NCCL on cuda, gloo on the CPU) around
the cuda backend's steps, so `memprof run --backend cuda --parallel ddp,fsdp --world-size 1` measures what
`--backend simulate` predicts on its fake process group (memprof.simulation.distributed), key for key.

Each configuration runs in a fresh process (the cuda backend's isolation), so no wrapper, bucket or cached
block of one configuration is alive when the next one's peaks are reset.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

from memprof.errors import UsageError


@contextlib.contextmanager
def world1(spec, device: str = "cuda"):
    """A world-size-1 process group for a parallel spec (NCCL on cuda, gloo on cpu), destroyed afterwards; a
    null context for a single-process spec."""
    if spec.parallel == "none":
        yield
        return
    if spec.world_size != 1:
        raise UsageError(f"--world-size {spec.world_size}: one GPU measures world size 1 only; predict larger "
                         f"worlds with --backend simulate")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, spec, device: str = "cuda") -> torch.nn.Module:
    """The model as the spec's parallelism trains it: FSDP2 `fully_shard` on each block (the longest
    nn.ModuleList) and the root, as the simulation shards it, or DistributedDataParallel with the spec's
    bucket_cap_mb and gradient_as_bucket_view. Call inside `world1`, after the model has its storage."""
    if spec.parallel == "none":
        return model
    from memprof.simulation.distributed import blocks

    if spec.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device, (1,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=spec.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=spec.reshard_after_forward)
        return model
    visual = model.visual
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=spec.bucket_cap_mb,
                                                    gradient_as_bucket_view=spec.grad_as_bucket_view)
    object.__setattr__(ddp, "visual", visual)  # the harness reads the input size from it
    return ddp
