"""A simulated CUDA device: ordinary CUDA training code runs, unchanged and without a GPU, and what torch.cuda
would report on the budget's card is predicted.

    with memprof.simulated_cuda(budget="a100-80g") as sim:
        train()                      # model.cuda(), torch.autocast("cuda", ...), optimizer.step(), ...
    print(sim.result)                # a memprof.results.Result, source "predicted"

How (no GPU, nothing allocated for real on the CUDA side), by concern:
- device tensors are fake CPU tensors (FakeTensorMode: shapes, strides and autograd without data; fake *CUDA*
  tensors cannot run backward on a machine without a GPU) that report `cuda:0` outside dispatch
  (memprof.script.state). Real CPU tensors stay real: a DataLoader with workers loads real data.
- what reaches, leaves and is made on the device: memprof.script.moves (a TorchFunctionMode, and the same at
  dispatch); torch.cuda's queries: memprof.script.cuda_api; files: memprof.script.files; what is read back:
  memprof.script.standins; what ran (phases, steps, the setup): memprof.script.detection; every patch of torch
  installed and restored through memprof.script.patches.
- this module talks to the engine: a StorageTracker (memprof.simulation.tracker) logs every device storage with
  the CUDA rules of memprof.simulation.rules acting as on the `memprof run` path; ops on real tensors pass through
  uncounted. At the end the stream goes through memprof.simulation.simulate.prediction_of, the engine's one
  entrance, like every other prediction. `live()` replays the stream so far through the caching-allocator model,
  so `torch.cuda.max_memory_allocated()` inside the script returns the record's figure at that point.
- `torch.autocast("cuda", dtype)` becomes CPU autocast with that dtype; the cuda-autocast-policy rule makes CPU
  autocast follow CUDA's op lists. `torch.nn.attention.sdpa_kernel` and `torch.backends.cuda.enable_*_sdp` choose
  the attention kernel the rules model (noted); optimizers resolve `foreach=None` / `fused=None` as on CUDA.
- threads the script starts inside the block run on the same device (the modes are per thread: they are entered
  in each new thread too).
A call that cannot be simulated raises UnsupportedCall (memprof.script.failures): one line naming the call and the
user's file:line; the script's own errors propagate unchanged.

Limits (each said where it applies, or listed here):
- one device (cuda:0); a torchrun-style DDP / FSDP2 script runs as rank 0 of `world_size` on the engine's fake
  process group (memprof.script.parallel);
- the script's own CUDA streams (`torch.cuda.Stream`, `torch.cuda.stream(s)`) are one stream: what it allocates
  under them is counted on the default stream's pools (FSDP2's own streams are modelled, by the engine's rule);
- the script's own constructors run for real on the CPU (their host memory is real); their random fills of CPU
  tensors wait until something could see them (memprof.script.deferred), and are skipped for tensors that go to
  the device unread (the record's script_cpu_fills_skipped);
- a script that would run out of memory on the card runs on; the record says where it would (status "oom");
- `torch.cuda.empty_cache()` and `reset_peak_memory_stats()` act on the figures the script reads, not on the
  record's (noted);
- tensors and modules moved to the device inside the block stay simulated after it.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprof.errors import UsageError
from memprof.script import files, moves
from memprof.script.cuda_api import CudaApi
from memprof.script.deferred import DEFERRABLE as _DEFERRABLE, DeferredFills, stand_in_fill
from memprof.script.detection import Detection, StopSimulation  # noqa: F401 (StopSimulation: the runner's)
from memprof.script.failures import UnsupportedCall, explain, is_simulations, user_frame, where  # noqa: F401
from memprof.script.patches import Patches
from memprof.script.standins import LIMIT, StandIns, materialise, value_of
from memprof.script.state import (ACTIVE, CUDA0, INTERNAL, META, TORCH_DIR, internal, is_sim,  # noqa: F401
                                  under_module_apply)
from memprof.simulation.distributed import local as _local  # (FSDP: the shard this rank holds)
from memprof.simulation.events import ALLOC, FREE
from memprof.simulation.memo import MEMO
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec

_DISTRIBUTED_DIR = os.path.join(TORCH_DIR, "distributed", "")
_FAKE_DEVICE_PROPERTY = FakeTensor.__dict__["device"]
_MODULE_APPLY = torch.nn.Module._apply.__code__
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_EQUAL = torch.ops.aten.equal.default
_get_dispatch_mode, _FAKE_KEY = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey.FAKE
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put", "aten::index_put_",
                    "aten::_index_put_impl_", "aten::lift_fresh", "aten::_foreach_copy_", "aten::detach",
                    "aten::alias", "aten::set_", "aten::_has_compatible_shallow_copy_type"}
_ADDRESS_BASE, _ADDRESS_ALIGN = 0x7F0000000000, 512  # where the simulated card's (unique) addresses begin


def _sim_device(self):
    """FakeTensor.device while a simulated device is in force: `cuda:0` for its tensors, outside dispatch."""
    mode = self.fake_mode
    if mode.in_kernel_invocation:
        return META
    if INTERNAL.depth == 0 and ACTIVE and mode is ACTIVE[-1].fake_mode:
        return CUDA0
    return self.fake_device


class _SimTracker(StorageTracker):
    """The engine's tracker, counting only the simulated device's storages; ops on fake tensors run under
    the device's FakeTensorMode (so the tracker's front cache applies), ops on real tensors run for real."""

    def __init__(self, rules, sim):
        super().__init__(rules, front=MEMO.front)
        self.sim = sim

    def register(self, tensor, op):
        if type(tensor) is not FakeTensor or tensor.fake_mode is not self.sim.fake_mode:
            return None
        thread = threading.get_ident()
        if thread != self.sim.main_thread:
            self.sim.threads.add(thread)  # (a thread the script started used the device)
        return super().register(tensor, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sim = self.sim
        if FakeTensor not in types and not (sim._sharded and types and _dtensor_types(types)):
            if not types and sim._sharded and _from_distributed():
                # FSDP on the simulated device shards over a CPU mesh, as the engine does: what torch.distributed
                # makes on the mesh's device (all-gather and reduce-scatter buffers) is the device's
                with sim.fake_mode:
                    out = func(*args, **(kwargs or {}))
                return self._made(func, args, kwargs or {}, out)
            made = moves.dispatch_factory(sim, func, args, kwargs or {})
            if made is not None:  # an op naming the CUDA device, reached without the function mode
                return self._made(func, args, kwargs or {}, made)
            deferred = sim._deferred
            # a CPU fill queued, or settled (memprof.script.deferred); not for what the fake mode below will run
            if (deferred.queue or func in _DEFERRABLE) and _get_dispatch_mode(_FAKE_KEY) is None:
                done, out = deferred.dispatch(func, args, kwargs or {})
                if done:
                    return out
            return func(*args, **(kwargs or {}))
        if func is _LOCAL_SCALAR and is_sim(args[0]):  # .item() inside torch's own code: a stand-in value
            return sim.standins.scalar(args[0])
        if func is _EQUAL and (is_sim(args[0]) or is_sim(args[1])):
            known = value_of(args[0]), value_of(args[1])
            if all(isinstance(v, torch.Tensor) for v in known):
                return torch.equal(*(materialise(v, t) for v, t in zip(known, args[:2])))
            return False  # (unknown data: read as unequal)
        INTERNAL.depth += 1
        try:
            sim.check_devices(func, args, kwargs or {})
            with sim.fake_mode:
                out = super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            INTERNAL.depth -= 1
        sim.standins.after_op(func, args, kwargs or {}, out)
        return out

    def _made(self, func, args, kwargs, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.register(t, str(func))
        self.sim.standins.after_op(func, args, kwargs, out)
        return out


def _dtensor_types(types) -> bool:
    """Whether an op's tensor types include a DTensor (FSDP's sharded parameters, whose local shards are the
    simulated device's: the op runs, and its outputs are counted, as for a device tensor)."""
    from torch.distributed.tensor import DTensor

    return any(issubclass(t, DTensor) for t in types)


def _from_distributed() -> bool:
    """Whether the op being dispatched was called from torch.distributed's Python code (the first frame above
    the dispatch machinery)."""
    import sys

    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_DISTRIBUTED_DIR):
            return True
        if not name.startswith(TORCH_DIR) and f.f_code is not _FUNCTION_MODE_CODE:
            return False  # the user's code, or memprof's own (a read-back's stand-in)
        f = f.f_back
    return False


_FUNCTION_MODE_CODE = moves.DeviceCalls.__torch_function__.__code__
_SDP_FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")


def _sdp_flags() -> tuple:
    return tuple(getattr(torch.backends.cuda, f)() for f in _SDP_FLAGS if hasattr(torch.backends.cuda, f))


def _set_sdp_flags(flags: tuple) -> None:
    for name, on in zip((f for f in _SDP_FLAGS if hasattr(torch.backends.cuda, f)), flags):
        getattr(torch.backends.cuda, "enable_" + name.removesuffix("_enabled"))(on)


@dataclass(frozen=True)
class _RuleSpec(RunSpec):
    """The spec handed to predict_traced: its precision selects every CUDA rule, its key is the record's."""

    record_key: str | None = None

    @property
    def key(self) -> str:
        return self.record_key or super().key


class SimulatedCuda(Detection):
    """Context manager: the budget's card as a simulated CUDA device (see the module docstring).

    `budget`: a card name or size (memprof.budget.parse_budget), or a number of bytes. `steps`: stop with
    StopSimulation after that many optimizer steps (None: let the code end). `user_file`: the script whose lines
    errors name. `world_size`: a torchrun-style script's process group, DDP and FSDP2 run as rank 0 of that many
    (memprof.script.parallel; None: init_process_group is refused with the fix).
    After the block: `result` (a memprof.results.Result), `detected` (what ran), `notes`.
    """

    def __init__(self, budget="titan-x", steps: int | None = None, user_file: str | None = None,
                 label: str | None = None, world_size: int | None = None):
        from memprof.budget import parse_budget

        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:  # bytes
            budget = f"{budget >> 20}MiB" if budget % (1 << 20) == 0 else f"{budget / (1 << 20)!r}MiB"
        if not isinstance(budget, str):
            raise UsageError(f"budget={budget!r}: give a card name (`memprof list budgets`), a size like '24GiB', or "
                             f"a number of bytes")
        self.budget = budget
        self.device = parse_budget(budget)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise UsageError(f"--steps {steps}: give at least 1 (or leave it out to let the script end)")
        self.max_steps = steps
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            raise UsageError(f"--world-size {world_size}: give the number of ranks, at least 1")
        self.world_size = world_size
        self.user_file = user_file
        if label is None:
            fr = user_frame()
            label = f"code:{os.path.basename(fr[0])}:{fr[1]}" if fr else "code"
        self.label = label
        self.notes: dict[str, str] = {}  # key -> note (each said once)
        self._start_detection()
        self._result = None
        self._trace = None
        self._entered = False

    # --- notes and errors --------------------------------------------------------------------------------
    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, text)

    def where(self) -> str:
        return where(self.user_file)

    def refuse(self, text: str):
        """Raise UnsupportedCall: `text`, after the user's file:line."""
        raise UnsupportedCall(f"{self.where()}: {text}")

    def check_devices(self, func, args, kwargs) -> None:
        """CUDA refuses ops mixing a device tensor with a CPU tensor (other than a 0-dim one, a copy or an index)."""
        for a in (*args, *kwargs.values()) if kwargs else args:  # (no pytree: this runs for every op)
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if type(t) is not FakeTensor and isinstance(t, torch.Tensor) and t.dim() > 0 \
                        and t.device.type == "cpu" and not hasattr(t, "_local_tensor"):  # (a DTensor: FSDP's)
                    name = func._schema.name
                    if name in _CROSS_DEVICE_OK:
                        return
                    raise moves.CudaError(f"Expected all tensors to be on the same device, but found at least two "
                                          f"devices, cuda:0 and cpu! ({name} is given a CPU tensor of shape "
                                          f"{tuple(t.shape)}: move it with .to(device))")

    def _sdpa(self, current):
        """F.scaled_dot_product_attention, outermost: torch.nn.attention.sdpa_kernel / torch.backends.cuda.enable_*_sdp
        choose SDPA's kernel on CUDA, and the simulation's attention rules select among the enabled kernels as CUDA
        does (memprof.simulation.rules MemEfficientAttention, HalfPrecisionAttention): a restricted choice is said."""
        sim = self

        def scaled_dot_product_attention(*args, **kwargs):
            flags = _sdp_flags()
            if flags != sim._sdp_default:
                enabled = ", ".join(n.removesuffix("_sdp_enabled").replace("mem_", "memory-") for n, on in
                                    zip(_SDP_FLAGS, flags) if on) or "none"
                sim.note(f"sdpa:{enabled}", f"the SDPA backends were restricted (torch.nn.attention.sdpa_kernel or "
                                            f"torch.backends.cuda.enable_*_sdp) to {enabled} at {sim.where()}: "
                                            f"attention is predicted with the kernel CUDA selects among those")
            return current(*args, **kwargs)

        return scaled_dot_product_attention

    # --- data-parallel and sharded scripts (memprof.script.parallel) ---------------------------------------
    @staticmethod
    def internal():
        """A block in which the simulated device's tensors report their real (CPU) device (torch code that
        computes with them, as inside dispatch)."""
        return internal()

    def _add_parallel(self, kind: str, rules) -> None:
        """The engine's rules of a parallelism the script started (DDP or FSDP), joining the run from here."""
        if self.detected["parallel"] not in ("none", kind):
            self.refuse("the script uses both DistributedDataParallel and fully_shard: one parallelism per run is "
                        "simulated")
        self.detected["parallel"] = kind
        for rule in rules:
            self.parallel_rules.append(rule)
            self.tracker.add_rule(rule)
            if hasattr(rule, "mode"):
                self._patches.enter_context(rule.mode())

    def _add_ddp(self, module, bucket_cap_mb, as_view: bool) -> None:
        """DistributedDataParallel(module): its gradient buckets placed now, as DDP's constructor places them, by
        the engine's DDPBuckets (the trainable parameters in the module's order, as DDP and the harness take them)."""
        import types

        from memprof.simulation.distributed import DDPBuckets

        rule = DDPBuckets(bucket_cap_mb, bool(as_view))
        self._add_parallel("ddp", [rule])
        self.detected["bucket_cap_mb"], self.detected["grad_as_bucket_view"] = bucket_cap_mb, bool(as_view)
        holder = types.SimpleNamespace(param_groups=[{"params": [p for p in module.parameters() if p.requires_grad]}])
        with internal(), self.fake_mode:
            rule.attach(self.tracker, holder)

    def _add_fsdp(self, reshard_after_forward: bool) -> None:
        from memprof.simulation.distributed import DTensorLocal, FSDPStorageEvents

        if self.detected["parallel"] != "fsdp":
            self._add_parallel("fsdp", [DTensorLocal(), FSDPStorageEvents()])
            self._sharded = True
        self.detected["reshard_after_forward"] = bool(reshard_after_forward)

    # --- what reaches, leaves and is made on the device (memprof.script.moves) -------------------------------
    def to_device(self, t: torch.Tensor, dtype=None, op: str = "Tensor.to(cuda)",
                  memory_format=torch.preserve_format) -> torch.Tensor:
        """A fake device copy of real (or meta) tensor `t` (an allocation of its size), laid out as `memory_format`
        asks; it keeps `t`'s values when they are few (memprof.script.standins)."""
        from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

        dtype = dtype or t.dtype
        stride = None if t.is_contiguous() or not is_non_overlapping_and_dense(t) else t.stride()  # preserve_format
        with internal(), self.fake_mode:
            if memory_format not in (None, torch.preserve_format):
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu", memory_format=memory_format)
            elif stride is None:
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu")
            else:
                out = torch.empty_strided(tuple(t.shape), stride, dtype=dtype, device="cpu")
        self._data_alloc()
        self.tracker.register(out, op)
        if t.device.type == "cpu" and t.untyped_storage()._cdata not in self._deferred.pending:
            self.standins.copied(out, t)  # (not a tensor whose random fill is still queued: that would run it)
        if t.requires_grad and torch.is_grad_enabled() and (out.is_floating_point() or out.is_complex()):
            out.requires_grad_(True)
            self.note("grad-move", f"a tensor that requires grad was moved to the device at {self.where()}: its copy "
                                   "is a new leaf (gradients do not flow back to the CPU tensor)")
        return out

    def factory(self, func, args, kwargs, device):
        """A torch factory given the CUDA device: a fake tensor (an allocation). A `*_like` / `new_*` factory's
        CPU or meta template is given as its meta twin (FakeTensorMode would keep a weak reference to it)."""
        moves.check_ordinal(device)
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        kwargs = {**kwargs, "device": "cpu"}
        if args and isinstance(args[0], torch.Tensor) and type(args[0]) is not FakeTensor:
            args = (files.meta_twin(args[0]), *args[1:])
        with internal(), self.fake_mode:
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        self._data_alloc()
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.tracker.register(t, f"torch.{name}(device=cuda)")
        self.standins.made(func, args, kwargs, out)
        return out

    def off_device(self, t, dtype=None) -> torch.Tensor:
        """Module.cpu() / Module.to("cpu"): a real CPU tensor of stand-in values in the parameter's place (the card's
        copy is freed when the parameter is swapped)."""
        self.note("off-device", f"parameters moved off the device at {self.where()} (Module.cpu / to('cpu')) hold "
                                f"stand-in values; the card's memory they held is freed")
        return self.host_stand_in(t, dtype)

    def host_stand_in(self, t, dtype=None, value=None) -> torch.Tensor:
        """A real CPU tensor of `t`'s shape holding its stand-in values (`value`, else what is known of `t`); a
        large one is filled only when read (an optimizer's state moved to the CPU at teardown is never touched)."""
        dtype = dtype or t.dtype
        value = value if value is not None else value_of(t) if type(t) is FakeTensor else None
        if t.numel() <= LIMIT or isinstance(value, torch.Tensor):
            return materialise(value, t).to(dtype)
        out = torch.empty(tuple(t.shape), dtype=dtype)
        fill = value.value if value is not None else (False if dtype == torch.bool else 1)
        self._deferred.defer(stand_in_fill, out, (fill,), {})
        return out

    def stand_in(self, t, dtype=None) -> torch.Tensor:
        """What the script reads back from device tensor `t` (memprof.script.standins), as a real CPU tensor."""
        return self.host_stand_in(t, dtype, self.standins.counted(t))

    def settled(self) -> None:
        """The CPU's deferred fills run, before something reads CPU memory without an op (memprof.script.deferred)."""
        if self._deferred.queue:
            self._deferred.settle()

    def address(self, storage) -> int:
        """A device storage's data pointer: unique and 512-aligned, as the caching allocator's are (sharing checks
        such as safetensors' and transformers' tell storages apart by it)."""
        sid = self.tracker.id_of_storage(storage)
        if sid is None:
            return 0
        address = self._addresses.get(sid)
        if address is None:
            address = self._addresses[sid] = self._next_address
            self._next_address += -(-max(storage.nbytes(), 1) // _ADDRESS_ALIGN) * _ADDRESS_ALIGN
        return address

    def _data_alloc(self) -> None:
        """A tensor made on (or moved to) the device by the user's code, not by Module.to, an optimizer step or
        backward: a new batch, so the next step's forward begins here (as the harness marks it: before the batch)."""
        if self._in_step or self._in_backward or self.tracker.phase not in ("setup", "optimizer"):
            return
        if under_module_apply(3):
            return
        self._phase("forward")

    def _swap_tensors(self, original):
        converter = self.fake_mode.fake_tensor_converter
        memos = [converter.tensor_memo, converter.meta_converter.tensor_memo]
        describer = getattr(converter.meta_converter, "describer", None)
        if describer is not None:
            memos.append(describer.lookup_tensor)

        def swap_tensors(t1, t2):
            if not (is_sim(t1) or is_sim(t2)):
                return original(t1, t2)
            for memo in memos:  # FakeTensorMode's weak memos would make the swap refuse
                for key, value in list(memo.items()):
                    if key is t1 or key is t2 or value is t1 or value is t2:
                        del memo[key]
            original(t1, t2)
            for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
                hooks = getattr(t1, attr, None)
                if hooks:
                    setattr(t1, attr, hooks)  # the setter installs them on t1's new implementation

        return swap_tensors

    # --- torch.cuda's figures: the stream so far, replayed ---------------------------------------------------
    def live(self):
        """The allocator model fed with the stream so far, the rules' rewrites applied (as predict_traced
        applies them to the whole stream); fed incrementally while the rewritten prefix stays the same."""
        from memprof.simulation.allocator import DEFAULT_STREAM, CachingAllocatorModel

        events = self.tracker.events
        streams = self.tracker.stream  # (FSDP's streams; empty otherwise)
        for rule in self.rules:
            if hasattr(rule, "rewrite"):
                folded = getattr(rule, "folded", None)
                events = rule.rewrite(events)
                if folded is not None:
                    rule.folded = folded  # predict_traced counts the folds of its own rewrite
        fed = self._fed
        if self._alloc is None or len(events) < len(fed) or events[:len(fed)] != fed:
            self._alloc, fed = CachingAllocatorModel(), []
            self._fed = fed
            self.peaks = [0, 0]
        alloc = self._alloc
        for ev in events[len(fed):]:
            if ev.kind is ALLOC:
                alloc.malloc(ev.sid, ev.nbytes, streams.get(ev.sid, DEFAULT_STREAM))
                self.peaks = [max(self.peaks[0], alloc.allocated), max(self.peaks[1], alloc.reserved)]
            elif ev.kind is FREE:
                alloc.free(ev.sid)
            fed.append(ev)
        return alloc

    # --- what ran (memprof.script.detection) -----------------------------------------------------------------
    def _phase(self, name: str) -> None:
        self.tracker.set_phase(name, self.detected["steps"])

    def _enter_forward(self) -> None:
        if self.tracker.phase != "forward":
            self._phase("forward")

    def _is_device_tensor(self, t) -> bool:
        return is_sim(_local(t))

    def _record_params(self, module) -> None:
        for name, p in module.named_parameters():
            if id(p) not in self._param_info:
                shard = _local(p)  # (FSDP's parameters: this rank's shard)
                self._param_info[id(p)] = (name, p.numel(), p.element_size(), p.requires_grad, str(p.dtype))
                if shard is not p:
                    self._shard_numel[id(p)] = shard.numel()

    def _on_root(self, module) -> None:
        for p in module.parameters():
            shard = _local(p)
            if is_sim(shard):
                self._params.add(self.tracker.storage_id(shard))
        for b in module.buffers():
            if is_sim(b):
                self._params.add(self.tracker.storage_id(b))
        if self._attribution is None:
            from memprof.simulation.attribution import ModuleAttribution

            self._attribution = ModuleAttribution(module, self.tracker, weak=True)
            self._attribution.__enter__()

    def _on_optimizer_pre(self, optimizer, params) -> None:
        for p in params:
            grad = p.grad if p.grad is None else _local(p.grad)
            if grad is not None and is_sim(grad):
                self._grads.add(self.tracker.storage_id(grad))
        if self._attribution is not None:
            self._attribution._grads()
        if id(optimizer) not in self._attached:
            self._attached.add(id(optimizer))
            for rule in self.rules:  # rules acting on the optimizer (bitsandbytes' 8-bit states), as trace_step does
                rule.attach(self.tracker, optimizer)

    def _on_optimizer_post(self, optimizer) -> None:
        for state in optimizer.state.values():
            for t in state.values():
                t = _local(t)
                if is_sim(t):
                    self._states.add(self.tracker.storage_id(t))
        if self._attribution is not None:
            self._attribution._states(optimizer)
        from memprof.simulation.tracing import state_summary

        self._state_summaries[id(optimizer)] = state_summary(optimizer)

    def _autocast_device(self, device_type: str) -> str:
        return "cpu" if device_type == "cuda" else device_type  # (the cuda-autocast-policy rule applies CUDA's lists)

    # --- enter / exit -------------------------------------------------------------------------------------
    def rule_spec(self, key: str | None = None):
        """The spec the CUDA rules are made for: every precision rule joins (each acts only on the half-precision
        ops, autocast regions or GradScaler it is about, so an fp32 script is unaffected). `key`: the record's
        spec key, which names the timeline and snapshot files predict_traced writes."""
        return _RuleSpec(model="script", optim="custom", precision="fp16-amp", budget=self.budget, record_key=key)

    def __enter__(self) -> "SimulatedCuda":
        from memprof.simulation.fake_compat import register_meta_kernels
        from memprof.simulation.rules import cuda_rules

        if ACTIVE:
            raise UsageError("simulated_cuda is already in force: nest no second one")
        if torch.cuda.is_available() and not os.environ.get("MEMPROF_SIMULATE_ON_GPU"):
            self.note("gpu", "a GPU is present, but this run is a simulation of the budget's card (predicted)")
        self._start = time.perf_counter()
        self.rules = cuda_rules(self.device, self.rule_spec())
        register_meta_kernels()
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.tracker = _SimTracker(self.rules, self)
        self.standins = StandIns()
        self._deferred = DeferredFills()  # the CPU's random fills, until read (memprof.script.deferred)
        self.parallel_rules = []  # DDP's or FSDP's, once the script starts it (memprof.script.parallel)
        self._fsdp_mesh = None
        self._sharded = False  # FSDP started: torch.distributed's factories on the (CPU) mesh make device tensors
        self._fed, self._alloc, self.peaks = [], None, [0, 0]
        self._addresses, self._next_address = {}, _ADDRESS_BASE
        self._sdp_default = _sdp_flags()
        self._shard_numel, self._params, self._grads, self._states = {}, set(), set(), set()
        self._state_summaries, self._attached, self._attribution = {}, set(), None
        self.saving = 0
        self.default_cuda = False
        self.threads, self.main_thread = set(), threading.get_ident()
        self.calls = moves.DeviceCalls(self)
        self._patches = patches = Patches()
        try:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()  # releases follow reference counts alone, as the engine's traces do
            patches.callback(lambda: gc.enable() if self._gc_was_enabled else None)
            ACTIVE.append(self)
            patches.callback(ACTIVE.pop)
            self._patch(patches)
            patches.enter_context(self.tracker)
            for rule in self.rules:
                if hasattr(rule, "mode"):
                    patches.enter_context(rule.mode())
            import torch.nn.functional as F

            # (the rules' own sdpa, looked up at call time as torch does)
            patches.set(F, "scaled_dot_product_attention", self._sdpa(F.scaled_dot_product_attention))
            patches.enter_context(self.calls)
        except BaseException:
            patches.close()
            raise
        self._entered = True
        return self

    def _patch(self, patches) -> None:
        """Replace, for the duration, what cannot be reached through torch's modes; every one is restored."""
        import importlib

        patches.set(FakeTensor, "device", property(_sim_device, _FAKE_DEVICE_PROPERTY.fset))
        patches.callback(_set_sdp_flags, _sdp_flags())  # a script's enable_*_sdp(False) ends with it
        # Module.to / .cuda() keep each Parameter object (as CUDA's in-place `.data =` does), so optimizers built
        # before the move and hooks registered on parameters survive: torch's swap-on-conversion path, with the
        # hooks re-installed on the swapped object (the C++ hooks travel with the tensor's implementation)
        original_get_swap = torch.__future__.get_swap_module_params_on_conversion

        def get_swap_module_params_on_conversion():
            import sys

            # Module._apply only: load_state_dict keeps its in-place copy_, as it does on CUDA
            return sys._getframe(1).f_code is _MODULE_APPLY or original_get_swap()

        patches.set(torch.__future__, "get_swap_module_params_on_conversion", get_swap_module_params_on_conversion)
        patches.wrap(torch.utils, "swap_tensors", self._swap_tensors)
        original_data_ptr = torch._C.StorageBase.data_ptr

        def data_ptr(storage):
            if storage.device.type == "meta" and self.tracker.id_of_storage(storage) is not None:
                return self.address(storage)
            return original_data_ptr(storage)

        patches.set(torch.UntypedStorage, "data_ptr", data_ptr)
        CudaApi(self).install(patches)
        pin_mod = importlib.import_module("torch.utils.data._utils.pin_memory")
        patches.set(pin_mod, "pin_memory", lambda data, device=None: data)  # the loader's pinning thread
        self._start_detection()
        self._install_detection(patches)
        original_enabled, original_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

        def is_autocast_enabled(device_type=None):  # CUDA's autocast state is the CPU's here (_autocast_device)
            if device_type is None or device_type == "cuda":
                return original_enabled("cpu")
            return original_enabled(device_type)

        def get_autocast_dtype(device_type):
            if device_type == "cuda" and original_enabled("cpu"):
                return original_dtype("cpu")
            return original_dtype(device_type)

        patches.set(torch, "is_autocast_enabled", is_autocast_enabled)
        patches.set(torch, "get_autocast_dtype", get_autocast_dtype)
        from torch.optim import optimizer as optim_mod

        if FakeTensor not in optim_mod._foreach_supported_types:
            optim_mod._foreach_supported_types.append(FakeTensor)
            patches.callback(optim_mod._foreach_supported_types.remove, FakeTensor)
        files.install(self, patches)
        from memprof.script.deferred import trunc_normal

        patches.set(torch.nn.init, "trunc_normal_", trunc_normal(self._deferred, torch.nn.init.trunc_normal_))
        for mod in (torch, torch.random):  # the CPU generator read or reset: the deferred fills run first
            for name in ("get_rng_state", "set_rng_state", "manual_seed", "seed"):
                if name in vars(mod):
                    patches.wrap(mod, name, self._settling)

        def compile_(model=None, **kwargs):
            self.note("compile", "torch.compile runs eager here: compiled code's memory differs (predicted as eager)")
            return model if model is not None else (lambda fn: fn)

        patches.set(torch, "compile", compile_)
        # FakeTensorMode logs a meta kernel's refusal (a check CUDA makes too) before raising it: the script's error
        # is printed once, as Python prints it (memprof.script.failures)
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        patches.callback(fake_log.setLevel, fake_log.level)
        fake_log.setLevel(logging.CRITICAL)
        original_set_default, original_get_default = torch.set_default_device, torch.get_default_device

        def set_default_device(device):
            self.default_cuda = device is not None and moves.is_cuda_device(device)
            if self.default_cuda:
                moves.check_ordinal(device)
            else:
                original_set_default(device)

        def get_default_device():
            return CUDA0 if self.default_cuda else original_get_default()

        patches.set(torch, "set_default_device", set_default_device)
        patches.set(torch, "get_default_device", get_default_device)
        patches.wrap(threading.Thread, "_bootstrap_inner", self._in_threads)
        patches.wrap(os, "_exit", self._os_exit)
        from memprof.script import parallel

        parallel.install(self, patches)

    def _settling(self, original):
        def settled_first(*args, **kwargs):
            self.settled()
            return original(*args, **kwargs)

        settled_first.__name__ = getattr(original, "__name__", "settled_first")
        return settled_first

    def _in_threads(self, original):
        """Threads started inside the block run on the simulated device too (torch's modes are per thread)."""
        sim = self

        def _bootstrap_inner(thread):
            if not sim._entered:
                return original(thread)
            with sim.tracker, sim.calls:
                return original(thread)

        return _bootstrap_inner

    def _os_exit(self, original):
        """os._exit in the script ends it as sys.exit would, so the run still leaves a record (in this process
        only: a forked worker, a DataLoader's, ends as it always does)."""
        pid = os.getpid()

        def _exit(code):
            if os.getpid() != pid:
                original(code)
            raise SystemExit(code)

        return _exit

    def __exit__(self, exc_type, exc, tb):
        self._deferred.drop()  # fills of CPU tensors that went to the device unread (the record's count)
        try:
            self._phase("done")
            if not isinstance(exc, KeyboardInterrupt):  # (what ran before an error too: the record keeps it)
                self._trace = self._make_trace()
        finally:
            if self._attribution is not None:
                self._attribution.__exit__(None, None, None)
            self._entered = False
            self._patches.close()
        note = self.standins.note()
        if note:
            self.note("readback", note)
        if self._deferred.skipped_before_a_draw:
            self.note("cpu-rng", f"{self._deferred.skipped_before_a_draw} random initialisations of CPU tensors that "
                                 f"went to the device unread were not drawn, so the CPU generator's later draws (data "
                                 f"order, augmentation) differ from an eager run's; no device figure depends on them")
        if self.threads:
            n = len(self.threads)
            self.note("threads", f"{n} thread{'s' * (n > 1)} the script started put tensors on the simulated device "
                                 f"(counted in the order the work ran)")
        if isinstance(exc, Exception) and not isinstance(exc, UsageError) and is_simulations(exc) \
                and not os.environ.get("MEMPROF_DEBUG"):
            raise explain(exc, self.user_file) from None
        return isinstance(exc, StopSimulation)  # the requested steps ran: the block ends there, cleanly

    # --- the trace and the result -------------------------------------------------------------------------
    def _make_trace(self):
        from memprof.simulation.tracing import Trace, _categorize, common_rule_metrics

        tracker = self.tracker
        events = list(tracker.events)
        info = self._param_info.values()
        total = sum(n for _, n, _, _, _ in info)
        trainable = sum(n for _, n, _, rg, _ in info if rg)
        held = self._shard_numel  # what this rank holds of a sharded (FSDP) parameter
        weights = sum(held.get(k, n) * size for k, (_, n, size, _, _) in self._param_info.items())
        grads_floor = sum(held.get(k, n) * size for k, (_, n, size, rg, _) in self._param_info.items() if rg)
        frozen = sorted(name for name, _, _, rg, _ in info if not rg)
        summaries: dict = {"optimizer_state_bytes": 0}
        for s in self._state_summaries.values():
            for k, v in s.items():
                summaries[k] = summaries.get(k, 0) + v
        module = self._attribution.result() if self._attribution is not None else dict(tracker.module)
        return Trace(events, _categorize(events, self._params, self._grads, self._states, tracker.origin),
                     dict(tracker.origin), params_total=total, params_trainable=trainable, frozen=frozen,
                     state=summaries, rules=[r.describe() for r in (*self.rules, *self.parallel_rules)],
                     module=module, extra={**common_rule_metrics((*self.rules, *self.parallel_rules)),
                            "floor_bytes": weights + grads_floor + summaries["optimizer_state_bytes"]},
                     stream=dict(tracker.stream))

    def predict(self, out_dir: str | None = None, snapshot_dir: str | None = None, key: str | None = None):
        """(status, metrics) of what ran, through the engine's entrance (memprof.simulation.simulate.prediction_of);
        with `out_dir` its timeline goes to out_dir/timelines/, with `snapshot_dir` the predicted allocator
        snapshot there (memprof.backends.simulate.write_artifacts), both named by `key` (the record's spec key)."""
        from memprof.backends.simulate import write_artifacts
        from memprof.simulation.simulate import prediction_of

        if self._trace is None:
            raise UsageError("simulated_cuda: no result (the code under it did not finish)")
        ran = self.rules

        def make_trace(rules):
            # the rules that acted during the run hold its state (e.g. which accumulations fold): the fresh
            # instances predict_traced made for the same card and spec take it over
            if len(rules) != len(ran) or any(type(a) is not type(b) for a, b in zip(rules, ran)):
                raise RuntimeError("cuda_rules gave other rules than those the run used")
            for fresh, old in zip(rules, ran):
                fresh.__dict__.update(old.__dict__)
            return self._trace

        spec = self.rule_spec(key)
        p = prediction_of(make_trace, self.budget, spec, history=out_dir is not None,
                          capped_history=snapshot_dir is not None)
        status, metrics = p.status, {**p.metrics, **write_artifacts(spec, p, out_dir, snapshot_dir)}
        metrics["rules"] = [n for n in metrics["rules"] if n not in self._idle_rules()]
        return status, metrics

    def _idle_rules(self) -> set:
        """Rules installed for every run that had nothing to act on in this one (not listed in the record)."""
        idle = set()
        half = bool(self.detected["autocast_dtypes"]) or any(
            d in ("torch.bfloat16", "torch.float16") for d in self.param_dtypes())
        if not half:
            idle |= {"half-precision-attention", "flash-attention-backward-temporaries", "layer-norm-stats-fp32"}
        if not self.detected["autocast_dtypes"]:
            idle.add("cuda-autocast-policy")
        if not self.detected["grad_scaler"]:
            idle.add("grad-scaler-fake-step")
        return idle

    @property
    def result(self):
        if self._result is None:
            from memprof.script.record import result_of

            self._result = result_of(self)
        return self._result


def simulated_cuda(budget="titan-x", steps: int | None = None, label: str | None = None,
                   world_size: int | None = None) -> SimulatedCuda:
    """`with memprof.simulated_cuda(budget="a100-80g") as sim: train()`, then `sim.result` (predicted). With
    `world_size`, code that starts a process group runs as rank 0 of that many (memprof.script.parallel)."""
    return SimulatedCuda(budget, steps=steps, label=label, world_size=world_size)
