"""torchrun-style scripts on the simulated device: `memprof script --world-size N FILE` predicts rank 0 of N.

What a script started by torchrun does, and what it gets here (memprof.script.device.SimulatedCuda installs these
for its block, and restores them on exit):
- the environment torchrun sets (RANK=0, WORLD_SIZE=N, LOCAL_RANK=0, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT);
- `torch.distributed.init_process_group("nccl" | any)` starts torch's fake process group as rank 0 of N (the
  engine's, memprof.simulation.distributed: collectives return at once, nothing leaves the process); a script
  calling it without --world-size gets one line naming its file:line and the fix;
- `DistributedDataParallel(model, ...)` keeps the model as its `.module` and adds the engine's DDP rule
  (memprof.simulation.distributed.DDPBuckets) with the script's bucket_cap_mb and gradient_as_bucket_view: the
  gradient buckets are placed and filled as `memprof run --parallel ddp` places and fills them (DDP itself cannot
  run on fake tensors);
- FSDP2's `fully_shard(module, ...)` is torch's own, on a CPU mesh of N fake ranks as the engine shards
  (`mesh=` given by the script is replaced, its reshard_after_forward kept), with the engine's FSDP rules
  (DTensorLocal, FSDPStorageEvents); FSDP1's `FullyShardedDataParallel` is refused with a sentence naming
  fully_shard (its flat parameters are not modelled).
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env(world_size: int) -> dict:
    """The variables torchrun sets for rank 0 of `world_size` on one node."""
    return {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@contextlib.contextmanager
def environment(world_size: int):
    """os.environ with torchrun's variables for rank 0, restored afterwards."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(torchrun_env(world_size))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def install(sim, patches) -> None:
    """Patch torch.distributed for the simulated block `sim` (its world_size None: no process group may start)."""
    import torch.distributed as dist

    if not dist.is_available():  # a torch built without it: a script importing it fails as it would anyway
        return
    from torch.distributed import distributed_c10d as c10d

    if sim.world_size is not None:
        patches.enter_context(environment(sim.world_size))
    original_init = c10d.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if sim.world_size is None:
            sim.refuse(f"torch.distributed.init_process_group({backend!r}) starts a process group of several ranks "
                       f"(a torchrun script): give memprof script --world-size N (the ranks it would run on; rank 0 "
                       f"is predicted)")
        if c10d.is_initialized():
            sim.refuse("init_process_group called twice (as on CUDA, the default process group is started once)")
        original_init("fake", rank=0, world_size=sim.world_size)
        sim.detected["world_size"] = sim.world_size

    for mod in (dist, c10d):
        patches.set(mod, "init_process_group", init_process_group)
    patches.callback(lambda: dist.destroy_process_group() if dist.is_available() and c10d.is_initialized() else None)
    _install_ddp(sim, patches)
    if sim.world_size is not None:  # (without one, FSDP's own init_process_group call is refused above)
        _install_fsdp(sim, patches)


def _add_parallel(sim, kind: str, rules) -> None:
    """The engine's rules of a parallelism the script started (DDP or FSDP), joining the run from here."""
    if sim.detected["parallel"] not in ("none", kind):
        sim.refuse("the script uses both DistributedDataParallel and fully_shard: one parallelism per run is "
                   "simulated")
    sim.detected["parallel"] = kind
    for rule in rules:
        sim.parallel_rules.append(rule)
        sim.tracker.add_rule(rule)
        if hasattr(rule, "mode"):
            sim.patches.enter_context(rule.mode())


def add_ddp(sim, module, bucket_cap_mb, as_view: bool) -> None:
    """DistributedDataParallel(module): its gradient buckets placed now, as DDP's constructor places them, by the
    engine's DDPBuckets (the trainable parameters in the module's order, as DDP and the harness take them)."""
    import types

    from memprof.simulation.distributed import DDPBuckets

    rule = DDPBuckets(bucket_cap_mb, bool(as_view))
    _add_parallel(sim, "ddp", [rule])
    sim.detected["bucket_cap_mb"], sim.detected["grad_as_bucket_view"] = bucket_cap_mb, bool(as_view)
    holder = types.SimpleNamespace(param_groups=[{"params": [p for p in module.parameters() if p.requires_grad]}])
    with sim.internal(), sim.fake_mode:
        rule.attach(sim.tracker, holder)


def add_fsdp(sim, reshard_after_forward: bool) -> None:
    from memprof.simulation.distributed import DTensorLocal, FSDPStorageEvents

    if sim.detected["parallel"] != "fsdp":
        _add_parallel(sim, "fsdp", [DTensorLocal(), FSDPStorageEvents()])
        sim.sharded = True
    sim.detected["reshard_after_forward"] = bool(reshard_after_forward)


def _require_group(sim, what: str) -> None:
    from torch.distributed import distributed_c10d as c10d

    if sim.world_size is None or not c10d.is_initialized():
        fix = "give memprof script --world-size N" if sim.world_size is None else \
            "call torch.distributed.init_process_group first"
        sim.refuse(f"{what} needs a process group: {fix} (rank 0 is predicted)")


def _install_ddp(sim, patches) -> None:
    from torch.nn import parallel
    from torch.nn.parallel import distributed as ddp_mod

    Original = ddp_mod.DistributedDataParallel

    class DistributedDataParallel(Original):
        """DDP on the simulated device: the model as `.module`, its gradient buckets by the engine's DDP rule."""

        def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=None, *args,
                     bucket_cap_mb=None, gradient_as_bucket_view=False, **kwargs):
            _require_group(sim, "DistributedDataParallel")
            torch.nn.Module.__init__(self)
            self.module = module
            self.device_ids, self.output_device, self.dim = device_ids, output_device, dim
            self.require_backward_grad_sync = True
            self._delay_all_reduce_all_params = False
            # what DDP exposes of its configuration (memprof.script.measure reads it from a real DDP alike)
            self.bucket_bytes_cap = int((25 if bucket_cap_mb is None else bucket_cap_mb) * (1 << 20))
            self.bucket_bytes_cap_default = bucket_cap_mb is None
            self.gradient_as_bucket_view = bool(gradient_as_bucket_view)
            add_ddp(sim, module, bucket_cap_mb, gradient_as_bucket_view)

        def forward(self, *inputs, **kwargs):
            return self.module(*inputs, **kwargs)

        def train(self, mode: bool = True):
            return torch.nn.Module.train(self, mode)

        @contextlib.contextmanager
        def no_sync(self):
            yield  # the buckets are filled all the same (the memory is DDP's with or without the all-reduce)

        def register_comm_hook(self, state, hook):
            return None

    DistributedDataParallel.__qualname__ = DistributedDataParallel.__name__ = "DistributedDataParallel"
    for mod in (parallel, ddp_mod):
        patches.set(mod, "DistributedDataParallel", DistributedDataParallel)


def _install_fsdp(sim, patches) -> None:
    import importlib

    fsdp = importlib.import_module("torch.distributed.fsdp")
    impl = importlib.import_module("torch.distributed.fsdp._fully_shard._fully_shard")
    original = impl.fully_shard

    def fully_shard(module, *args, mesh=None, reshard_after_forward=None, **kwargs):
        _require_group(sim, "fully_shard")
        from memprof.simulation.distributed import fsdp_mesh

        if reshard_after_forward is None:
            reshard_after_forward = True
        if sim.fsdp_mesh is None:  # (made before FSDP's factories count as the device's)
            sim.fsdp_mesh = fsdp_mesh(sim.world_size)
        add_fsdp(sim, reshard_after_forward)
        with sim.internal():
            return original(module, *args, mesh=sim.fsdp_mesh, reshard_after_forward=reshard_after_forward, **kwargs)

    patches.set(fsdp, "fully_shard", fully_shard)  # (not in its own module: it reads itself from there)
    # FSDP's parameters are DTensors over the CPU mesh (as the engine shards): their wrappers report the CPU where
    # CUDA's report cuda, so once sharded the CPU counts among the foreach / fused kernels' devices, and optimizers
    # resolve foreach=None / fused=None as on CUDA
    optim_mod = importlib.import_module("torch.optim.optimizer")
    for name in ("_get_foreach_kernels_supported_devices", "_get_fused_kernels_supported_devices"):
        patches.set(optim_mod, name, _with_cpu_when_sharded(sim, getattr(optim_mod, name)))
    composable = importlib.import_module("torch.distributed._composable.fsdp")
    if "fully_shard" in vars(composable):
        patches.set(composable, "fully_shard", fully_shard)
    fsdp1 = importlib.import_module("torch.distributed.fsdp.fully_sharded_data_parallel")

    def refuse(*args, **kwargs):
        sim.refuse("FullyShardedDataParallel (FSDP1) is not simulated (its flat parameters are not modelled): "
                   "shard with torch.distributed.fsdp.fully_shard (FSDP2), which memprof simulates")

    class FullyShardedDataParallel(torch.nn.Module):
        def __new__(cls, *args, **kwargs):
            refuse()

    for mod in (fsdp, fsdp1):
        patches.set(mod, "FullyShardedDataParallel", FullyShardedDataParallel)



def _with_cpu_when_sharded(sim, original):
    def devices():
        found = original()
        return [*found, "cpu"] if sim.sharded else found

    return devices


def parallel_of(module) -> dict:
    """The parallelism a root module runs (its record fields, as memprof.script.record.parallel_fields takes them):
    DistributedDataParallel's bucket_cap_mb (None: DDP's default) and gradient_as_bucket_view, or FSDP2's
    reshard_after_forward; {} for neither. Read from the module, so a real DDP and the simulated one say the same."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    if "torch.nn.parallel.distributed.DistributedDataParallel" in names:
        default = getattr(module, "bucket_bytes_cap_default", True)
        cap = getattr(module, "bucket_bytes_cap", None)
        return {"parallel": "ddp", "bucket_cap_mb": None if default or cap is None else cap / (1 << 20),
                "grad_as_bucket_view": bool(getattr(module, "gradient_as_bucket_view", False))}
    if any(n.endswith(".FSDPModule") for n in names):
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            reshard = group is None or group.post_forward_mesh_info is not None
        except AttributeError:
            reshard = True
        return {"parallel": "fsdp", "reshard_after_forward": reshard}
    return {}
