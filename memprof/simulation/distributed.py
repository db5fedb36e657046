"""Data-parallel (DDP) and sharded (FSDP2) training, as rank 0 of `world_size` sees it, in one process.

How: torch's fake process group (`init_process_group("fake")`, a FakeStore; collectives return at once)
stands in for the other ranks, so the run needs no GPU and no second process; the traced step
(memprof.simulation.tracing) runs on fake tensors as always. Every figure is rank 0's, and a prediction.

- FSDP: torch's own FSDP2 `fully_shard` wraps each block (the model's longest nn.ModuleList) and then the
  root, with `reshard_after_forward` from the spec. Parameters, gradients and optimizer state are sharded
  DTensors; the tracker counts their local shards (padded as FSDP pads them, `DTensorLocal`). FSDP's
  unsharded parameters live in storages it resizes rather than allocates (`alloc_storage`/`free_storage`),
  which no dispatch mode sees: `FSDPStorageEvents` logs those resizes as allocations and releases. What
  FSDP's all-gather and reduce-scatter make is labelled `communication:`; the unsharded parameters
  `unsharded parameter:` (category parameters, memprof.simulation.tracing). FSDP enters its own streams
  through its device handle, here `torch.cpu`, whose `current_stream()` follows `torch.cpu.stream(s)`: the
  rule names each allocation's stream by its role in FSDP's FSDPCommContext (STREAM_ROLES: the all-gather
  output is made on the all-gather copy-in stream, the reduce-scatter output, the new sharded gradient, on
  the reduce-scatter stream; unsharded parameters and the reduce-scatter input on the default stream).
- DDP: DDP itself cannot run two iterations on fake tensors (its Reducer's bucket rebuild needs real
  data), so its memory is modelled from its own rule: `DDPBuckets` places the gradient buckets with DDP's
  own `dist._compute_bucket_assignment_by_size` (one bucket of every trainable parameter for the first
  iteration, as DDP does without find_unused_parameters; rebuilt before the second forward in the order
  gradients became ready, with the first-bucket and `bucket_cap_mb` limits), as flat tensors allocated when
  DDP would allocate them. Each gradient is copied into its bucket view as it is ready; with
  gradient_as_bucket_view the parameter's .grad becomes that view (autograd's own gradient is freed),
  otherwise the gradients stay separate and the buckets are extra memory.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch

from memprof.simulation.rule import Rule


COMMUNICATION = "communication:"
# FSDPCommContext.lazy_init's streams (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py) by role
STREAM_ROLES = (("all_gather_copy_in_stream", "all-gather copy-in"), ("all_gather_stream", "all-gather"),
                ("reduce_scatter_stream", "reduce-scatter"), ("all_reduce_stream", "all-reduce"))
UNSHARDED = "unsharded parameter:"
DDP_DEFAULT_BUCKET_CAP_MB = 25


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank holds: a DTensor's local shard, else the tensor itself."""
    return getattr(t, "_local_tensor", t)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch.distributed initialised as rank 0 of `world_size` on the fake backend, for the block."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def blocks(model: torch.nn.Module) -> list:
    """The modules FSDP wraps one by one: the longest nn.ModuleList (a transformer's blocks); none if absent."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: torch.nn.Module, spec) -> None:
    """FSDP2 `fully_shard` on each block, then the root, over a CPU mesh of `spec.world_size` (fake) ranks.
    Call inside the FakeTensorMode, after the model has its (fake) storage and dtype."""
    from torch.distributed.fsdp import fully_shard

    mesh = fsdp_mesh(spec.world_size)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=spec.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=spec.reshard_after_forward)


def fsdp_mesh(world_size: int):
    """The CPU device mesh of `world_size` fake ranks FSDP shards over (its rank map read as host values)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return DeviceMesh("cpu", torch.arange(world_size))


class DTensorLocal(Rule):
    """Rule: count a DTensor output by its local shard. (The tracker registers the wrapper, whose storage
    is the global size; the memory this rank holds is the local tensor's.)"""

    name = "dtensor-local-shard"

    def before_op(self, tracker, func, args, kwargs):
        pass

    def after_op(self, tracker, func, args, kwargs, out):
        for t in _tensors(out):
            if hasattr(t, "_local_tensor"):
                tracker.treat_as_host(t)
                tracker.register(t._local_tensor, str(func))

    def attach(self, tracker, optimizer):
        pass

    def describe(self) -> dict:
        return {"name": self.name, "what": "a DTensor's memory is its local shard"}

    def metrics(self) -> dict:
        return {}


def _tensors(out):
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, (tuple, list)):
            yield from (u for u in t if isinstance(u, torch.Tensor))


class FSDPStorageEvents(Rule):
    """Rule: FSDP2's storage resizes as allocations and releases, its collectives' buffers labelled, and the
    stream each allocation is made on.

    `mode()` patches FSDP2's alloc_storage / free_storage (where it (re)allocates and frees unsharded
    parameters) and wraps foreach_all_gather / foreach_reduce so every storage they make is labelled
    `communication:` (all-gather output, reduce-scatter input and output). It also wraps
    FSDPCommContext.lazy_init to learn FSDP's streams, and has the tracker record the current stream's name
    (`stream_name`) with each allocation."""

    name = "fsdp-storage-events"

    def __init__(self):
        self.tracker = None
        self.label = None
        self.default_stream = None  # torch.cpu's current stream when the mode was entered
        self.streams: dict[int, tuple] = {}  # id(stream) -> (stream, name): the streams kept alive, by identity

    def attach(self, tracker, optimizer):
        pass

    def before_op(self, tracker, func, args, kwargs):
        if self.tracker is not tracker:
            self.tracker = tracker
            tracker.track_streams(self.stream_name)

    def stream_name(self) -> str | None:
        """The current stream's name: None for the default stream, FSDP's by role (STREAM_ROLES), another one
        "stream N" in the order of first use."""
        current = torch.cpu.current_stream()
        if current is self.default_stream:
            return None
        known = self.streams.get(id(current))
        if known is None:
            known = self.streams[id(current)] = (current, self._unique(f"stream {len(self.streams) + 1}"))
        return known[1]

    def _unique(self, name: str) -> str:
        taken = {n for _, n in self.streams.values()}
        k, out = 1, name
        while out in taken:
            k += 1
            out = f"{name} ({k})"
        return out

    def _lazy_init(self, original):
        rule = self

        def lazy_init(ctx, *args, **kwargs):
            original(ctx, *args, **kwargs)
            for attr, role in STREAM_ROLES:
                stream = getattr(ctx, attr, None)
                if stream is not None and id(stream) not in rule.streams:
                    rule.streams[id(stream)] = (stream, rule._unique(role))
        return lazy_init

    def after_op(self, tracker, func, args, kwargs, out):
        if self.label:
            for t in _tensors(out):
                sid = tracker.storage_id(local(t))
                if sid is not None and not tracker.origin[sid].startswith((COMMUNICATION, UNSHARDED)):
                    tracker.relabel(sid, f"{self.label} {tracker.origin[sid]}")

    def describe(self) -> dict:
        return {"name": self.name, "what": "FSDP2 storage resizes are allocations; its collectives' buffers are "
                                           "communication, each on the FSDP stream it is made on"}

    def metrics(self) -> dict:
        return {}

    def _alloc(self, original):
        def alloc_storage(tensor):
            original(tensor)
            if self.tracker is not None:
                self.tracker.register(tensor, f"{UNSHARDED} FSDP alloc_storage")
        return alloc_storage

    def _free(self, original):
        def free_storage(tensor):
            if self.tracker is not None and tensor.untyped_storage().size() != 0:
                self.tracker.release(tensor)
            original(tensor)
        return free_storage

    def _labelled(self, original, label):
        def wrapped(*args, **kwargs):
            self.label = label
            try:
                return original(*args, **kwargs)
            finally:
                self.label = None
        return wrapped

    @contextlib.contextmanager
    def mode(self):
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group as group

        self.default_stream = torch.cpu.current_stream()
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(group.FSDPCommContext, "lazy_init",
                                                  self._lazy_init(group.FSDPCommContext.lazy_init)))
            for module in (_fsdp_param, group):
                stack.enter_context(mock.patch.object(module, "alloc_storage", self._alloc(module.alloc_storage)))
            stack.enter_context(mock.patch.object(_fsdp_param, "free_storage", self._free(_fsdp_param.free_storage)))
            for name, label in (("foreach_all_gather", f"{COMMUNICATION} all-gather"),
                                ("foreach_all_gather_copy_out", f"{UNSHARDED} all-gather copy-out"),
                                ("foreach_reduce", f"{COMMUNICATION} reduce-scatter")):
                stack.enter_context(mock.patch.object(group, name, self._labelled(getattr(group, name), label)))
            yield


class DDPBuckets(Rule):
    """Rule: DistributedDataParallel's gradient buckets (see the module docstring)."""

    name = "ddp-gradient-buckets"

    def __init__(self, bucket_cap_mb: float | None, as_view: bool):
        import torch.distributed as dist

        self.params: list = []
        cap = DDP_DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb
        self.cap_bytes = int(cap * 1024 * 1024)
        self.first_bytes = dist._DEFAULT_FIRST_BUCKET_BYTES if bucket_cap_mb is None else self.cap_bytes
        self.as_view = as_view
        self.tracker = None
        self.buckets: list = []  # (flat tensor, [params])
        self.views: dict = {}  # id(param) -> its view into a bucket
        self.ready: list = []  # parameters in the order their gradients became ready (first iteration)
        self.rebuilt = False
        self.bucket_bytes: list = []
        self.syncing = True  # False inside no_sync(): the Reducer's hooks do nothing, gradients accumulate locally
        self.copied: dict = {}  # "step.micro-step" -> bytes its backward copied into the buckets (0 under no_sync)
        self._phase, self._backward = None, None

    def _assign(self, params, limits) -> None:
        import torch.distributed as dist

        indices, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
        self.buckets, self.views = [], {}
        with torch.no_grad():
            for idx in indices:
                members = [params[i] for i in idx]
                flat = torch.empty(sum(p.numel() for p in members), dtype=members[0].dtype)
                self.tracker.relabel(self.tracker.register(flat, "bucket"), f"{COMMUNICATION} DDP gradient bucket")
                offset = 0
                for p in members:
                    self.views[id(p)] = flat[offset: offset + p.numel()].view_as(p)
                    offset += p.numel()
                self.buckets.append((flat, members))
        self.bucket_bytes = [flat.numel() * flat.element_size() for flat, _ in self.buckets]

    def attach(self, tracker, optimizer) -> None:
        self.tracker = tracker
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._assign(self.params, [sys.maxsize])  # DDP's first iteration: one bucket (no unused-parameter search)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._ready)

    def mode(self):
        """For the run: the harness's no_sync(model) (memprof.harness.no_sync) turns this rule's reduction off, as
        DistributedDataParallel.no_sync() does its Reducer's (the model here is not wrapped)."""
        from memprof import harness

        @contextlib.contextmanager
        def no_sync(model):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        return mock.patch.object(harness, "no_sync", no_sync)

    def _ready(self, p) -> None:
        if not self.syncing:  # no_sync(): Reducer::autograd_hook returns at once (no bucket, no ready order)
            return
        if self._backward is not None:
            self.copied[self._backward] += p.numel() * p.element_size()
        if not self.rebuilt and id(p) not in {id(q) for q in self.ready}:
            self.ready.append(p)
        view = self.views[id(p)]
        with torch.no_grad():
            if p.grad is not view:
                view.copy_(p.grad)  # the Reducer copies each ready gradient into its bucket
                if self.as_view:
                    p.grad = view  # gradient_as_bucket_view: .grad is the bucket view; autograd's copy dies

    def before_op(self, tracker, func, args, kwargs):
        if tracker.phase == "backward" and self._phase != "backward":  # a backward begins
            micro = sum(1 for k in self.copied if k.startswith(f"{tracker.step}."))
            self._backward = f"{tracker.step}.{micro}"
            self.copied[self._backward] = 0
        self._phase = tracker.phase
        # DDP rebuilds its buckets in gradient-ready order at the start of the first forward after a synced backward
        if not self.rebuilt and tracker.phase == "forward" and tracker.step >= 1 and self.ready:
            self.rebuilt = True
            old = self.buckets
            self.buckets = []
            del old  # the Reducer clears its buckets before it makes the new ones
            self._assign(self.ready, [self.first_bytes, self.cap_bytes])

    def after_op(self, tracker, func, args, kwargs, out):
        pass

    def describe(self) -> dict:
        return {"name": self.name, "what": "DDP gradient buckets placed by torch's own bucket assignment"}

    def metrics(self) -> dict:
        return {"ddp_bucket_count": len(self.bucket_bytes), "ddp_bucket_bytes": sum(self.bucket_bytes),
                "ddp_bucket_cap_bytes": self.cap_bytes, "ddp_first_bucket_cap_bytes": self.first_bytes,
                "ddp_bucket_copy_bytes": dict(self.copied)}


def sharded_bytes(model, trainable, optimizer) -> dict:
    """Rank 0's resident state, read from the tensors: parameter shards (padded storage), gradient shards
    and optimizer state, each counted once per storage."""
    def nbytes(tensors):
        seen = {}
        for t in tensors:
            st = local(t).untyped_storage()
            seen[st._cdata] = st.nbytes()
        return sum(seen.values())

    states = [t for s in optimizer.state.values() for k, t in s.items() if isinstance(t, torch.Tensor) and k != "step"]
    return {"rank_parameter_bytes": nbytes(model.parameters()),
            "rank_gradient_bytes": nbytes(p.grad for p in trainable if p.grad is not None),
            "rank_optimizer_state_bytes": nbytes(states)}


def parallel_rules(spec) -> list:
    """The rules a spec's parallelism adds to the trace (none for a single-process run)."""
    if spec.parallel == "fsdp":
        return [DTensorLocal(), FSDPStorageEvents()]
    if spec.parallel == "ddp":
        return [DDPBuckets(spec.bucket_cap_mb, spec.grad_as_bucket_view)]
    return []


def process_group(spec):
    """The fake process group a spec runs in (a null context for a single-process run)."""
    return fake_process_group(spec.world_size) if spec.parallel != "none" else contextlib.nullcontext()
