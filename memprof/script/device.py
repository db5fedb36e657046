"""A simulated CUDA device: ordinary CUDA training code runs, unchanged and without a GPU, and what
torch.cuda would report on the budget's card is predicted.

    with memprof.simulated_cuda(budget="a100-80g") as sim:
        train()                      # model.cuda(), torch.autocast("cuda", ...), optimizer.step(), ...
    print(sim.result)                # a memprof.results.Result, source "predicted"

How (no GPU, nothing allocated for real on the CUDA side):
- device tensors are fake CPU tensors (FakeTensorMode: shapes, strides and autograd without data; fake
  *CUDA* tensors cannot run backward on a machine without a GPU). They report `cuda:0` to the user's code
  (`Tensor.device`, `is_cuda`, `get_device`), and see their real (CPU) device inside dispatch, where
  FakeTensorMode computes them. Real CPU tensors stay real: a DataLoader with workers loads real data, and
  only what is moved to the device counts.
- a TorchFunctionMode (`_SimFunctionMode`) turns `device="cuda"` on factories into fake tensors,
  `.cuda()` / `.to("cuda")` / `Module.to` into fake copies (each an allocation), and values read back
  (`.item()`, `float()`, `print`, `.tolist()`, `.cpu()`, `.numpy()`) into stand-ins (zeros), noted once.
- a StorageTracker (memprof.simulation.tracker) logs every device storage, with the CUDA rules of
  memprof.simulation.rules (cuda_rules) acting as on the `memprof run` path; ops on real tensors pass
  through it uncounted. At the end the stream goes through memprof.simulation.simulate.prediction_of,
  the engine's one entrance, like every other prediction.
- `torch.autocast("cuda", dtype)` (and `torch.cuda.amp.autocast`) becomes CPU autocast with that dtype;
  the cuda-autocast-policy rule makes CPU autocast follow CUDA's op lists. `torch.amp.GradScaler("cuda")`
  runs; its inf check reads a stand-in zero, so it takes the finite path (every step is taken).
- `torch.nn.attention.sdpa_kernel` and `torch.backends.cuda.enable_flash_sdp / enable_mem_efficient_sdp /
  enable_math_sdp` choose the attention kernel the rules model, as CUDA selects among the enabled ones (noted);
  the flags are restored on exit.
- optimizers resolve `foreach=None` / `fused=None` as on CUDA: their parameters report `cuda`, and the fake
  tensor type is accepted where torch lists the types its foreach kernels take (restored on exit).
- `torch.cuda.is_available / device_count / get_device_name / get_device_properties / mem_get_info /
  memory_allocated / max_memory_allocated / memory_reserved / max_memory_reserved / reset_peak_memory_stats
  / memory_stats / memory_summary / synchronize / empty_cache` describe the budget's card and return the
  simulation's own figures at that point: the stream so far, with the rules' stream rewrites applied, replayed
  through the caching-allocator model (memprof.simulation.allocator), so a script that prints
  `torch.cuda.max_memory_allocated()` at its end prints the record's peak_allocated_bytes exactly. The
  torch.cuda functions are replaced on entry and restored on exit.
- phases: forward (the model's outermost forward), backward (torch.autograd.backward), optimizer (a global
  optimizer step pre-hook); steps are counted as the measuring twin counts them (memprof.script.counting);
  `steps=N` stops the code with `StopSimulation` after N optimizer steps.
Anything that cannot be simulated raises UnsupportedCall: one line naming the call and the user's file:line.

Limits (each said where it applies, or listed here):
- one device (cuda:0); a torchrun-style DDP / FSDP2 script runs as rank 0 of `world_size` on the engine's fake
  process group (memprof.script.parallel);
- the script's own CUDA streams (`torch.cuda.Stream`, `torch.cuda.stream(s)`) are one stream: what it allocates
  under them is counted on the default stream's pools (FSDP2's own streams are modelled, by the engine's rule);
- CUDA work started from another thread than the one that entered the block is not tracked (the modes are
  per thread; a DataLoader's workers and pinning thread only touch CPU data, and run as usual);
- the script's own constructors run for real on the CPU (their host memory is real); their random fills of CPU
  tensors wait until something could see them (memprof.script.deferred), and are skipped for tensors that go to
  the device unread (the record's script_cpu_fills_skipped);
- a script that would run out of memory on the card runs on; the record says where it would (status "oom");
- `torch.cuda.empty_cache()` and `reset_peak_memory_stats()` act on the figures the script reads, not on the
  record's (noted);
- tensors and modules moved to the device inside the block stay simulated after it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                          FakeTensorMode, UnsupportedOperatorException)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only

from memprof.errors import UsageError
from memprof.script.counting import StepCounting, StopSimulation  # noqa: F401 (StopSimulation: the runner's)
from memprof.script.deferred import DEFERRABLE as _DEFERRABLE, DeferredFills
from memprof.simulation.distributed import local as _local  # (FSDP: the shard this rank holds)
from memprof.simulation.events import ALLOC, FREE
from memprof.simulation.memo import MEMO
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec

CUDA0 = torch.device("cuda", 0)
_META = torch.device("meta")
_TORCH_DIR = os.path.dirname(torch.__file__)
_DISTRIBUTED_DIR = os.path.join(_TORCH_DIR, "distributed", "")
_MEMPROF_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READBACK_NOTE = ("values read back from the device (.item(), float(), print, .tolist(), .cpu(), .numpy()) are "
                 "stand-ins (zeros): the simulation has no data; control flow that reads them (a GradScaler's inf "
                 "check, `if torch.isnan(loss)`) took the finite path")


class UnsupportedCall(UsageError):
    """A call the simulated device cannot honour; the message names the call and the user's file:line."""


class _Internal(threading.local):
    depth = 0


_INTERNAL = _Internal()
_ACTIVE: list = []  # the SimulatedCuda in force (one at a time)


@contextlib.contextmanager
def _internal():
    """Within, fake tensors report their real (CPU) device: code that computes them (dispatch, rules) runs."""
    _INTERNAL.depth += 1
    try:
        yield
    finally:
        _INTERNAL.depth -= 1


_FAKE_DEVICE_PROPERTY = FakeTensor.__dict__["device"]
_MODULE_APPLY = torch.nn.Module._apply.__code__


def _sim_device(self):
    """FakeTensor.device while a simulated device is in force: `cuda:0` for its tensors, outside dispatch."""
    mode = self.fake_mode
    if mode.in_kernel_invocation:
        return _META
    if _INTERNAL.depth == 0 and _ACTIVE and mode is _ACTIVE[-1].fake_mode:
        return CUDA0
    return self.fake_device


def is_sim(t) -> bool:
    """Whether `t` is a tensor on the simulated device."""
    return type(t) is FakeTensor and bool(_ACTIVE) and t.fake_mode is _ACTIVE[-1].fake_mode


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0].strip() == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)


def _is_cpu_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cpu"
    return isinstance(dev, str) and dev.split(":")[0].strip() == "cpu"


class _SimTracker(StorageTracker):
    """The engine's tracker, counting only the simulated device's storages; ops on fake tensors run under
    the device's FakeTensorMode (so the tracker's front cache applies), ops on real tensors run for real."""

    def __init__(self, rules, sim):
        super().__init__(rules, front=MEMO.front)
        self.sim = sim

    def register(self, tensor, op):
        if type(tensor) is not FakeTensor or tensor.fake_mode is not self.sim.fake_mode:
            return None
        return super().register(tensor, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if FakeTensor not in types and not (self.sim._sharded and types and _dtensor_types(types)):
            if not types and self.sim._sharded and _from_distributed():
                # FSDP on the simulated device shards over a CPU mesh, as the engine does: what torch.distributed
                # makes on the mesh's device (all-gather and reduce-scatter buffers) is the device's
                with self.sim.fake_mode:
                    out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self.register(t, str(func))
                return out
            deferred = self.sim._deferred
            # a CPU fill queued, or settled (memprof.script.deferred); not for what the fake mode below will run
            if (deferred.queue or func in _DEFERRABLE) and _get_dispatch_mode(_FAKE_KEY) is None:
                done, out = deferred.dispatch(func, args, kwargs or {})
                if done:
                    return out
            return func(*args, **(kwargs or {}))
        _INTERNAL.depth += 1
        try:
            self.sim._check_devices(func, args, kwargs or {})
            with self.sim.fake_mode:
                return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            _INTERNAL.depth -= 1


_SDP_FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")


def _sdp_flags() -> tuple:
    return tuple(getattr(torch.backends.cuda, f)() for f in _SDP_FLAGS if hasattr(torch.backends.cuda, f))


def _set_sdp_flags(flags: tuple) -> None:
    for name, on in zip((f for f in _SDP_FLAGS if hasattr(torch.backends.cuda, f)), flags):
        getattr(torch.backends.cuda, "enable_" + name.removesuffix("_enabled"))(on)


_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put", "aten::index_put_",
                    "aten::_index_put_impl_", "aten::lift_fresh", "aten::_foreach_copy_", "aten::detach",
                    "aten::alias", "aten::set_", "aten::_has_compatible_shallow_copy_type"}


def _device_constructors():
    from torch.utils._device import _device_constructors as constructors

    return constructors()


def _descriptor(name: str):
    return torch._C.TensorBase.__dict__[name]


class _SimFunctionMode(TorchFunctionMode):
    """What the user's code calls, before dispatch: the device moves, factories and read-backs."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim
        T = torch.Tensor
        self.handlers = {T.cuda: sim._cuda, T.to: sim._to, T.cpu: sim._cpu, T.item: sim._item,
                         T.tolist: sim._tolist, T.numpy: sim._numpy, T.__float__: sim._item, T.__int__: sim._item,
                         T.__bool__: sim._item, T.__index__: sim._item, T.__repr__: sim._repr,
                         T.__format__: sim._format, T.__array__: sim._numpy, T.get_device: sim._get_device,
                         T.pin_memory: sim._pin_memory, T.is_pinned: sim._is_pinned,
                         T.record_stream: sim._record_stream, T.__reduce_ex__: sim._reduce,
                         T.__deepcopy__: sim._deepcopy}
        self.getters = {_descriptor("is_cuda"): lambda t: True, _descriptor("is_cpu"): lambda t: False}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        getter = self.getters.get(getattr(func, "__self__", None))
        if getter is not None:
            if args and is_sim(args[0]):
                return getter(args[0])
            return func(*args, **kwargs)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            return self.sim._factory(func, args, kwargs)
        if dev is None and self.sim._default_cuda and func in _device_constructors():
            return self.sim._factory(func, args, kwargs)  # torch.set_default_device("cuda") under the simulation
        return func(*args, **kwargs)


def _dtensor_types(types) -> bool:
    """Whether an op's tensor types include a DTensor (FSDP's sharded parameters, whose local shards are the
    simulated device's: the op runs, and its outputs are counted, as for a device tensor)."""
    from torch.distributed.tensor import DTensor

    return any(issubclass(t, DTensor) for t in types)


_get_dispatch_mode, _FAKE_KEY = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey.FAKE


def _from_distributed() -> bool:
    """Whether the op being dispatched was called from torch.distributed's Python code (the first frame above
    the dispatch machinery)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_DISTRIBUTED_DIR):
            return True
        if not name.startswith(_TORCH_DIR) and f.f_code is not _FUNCTION_MODE_CODE:
            return False  # the user's code, or memprof's own (a read-back's stand-in)
        f = f.f_back
    return False


_FUNCTION_MODE_CODE = _SimFunctionMode.__torch_function__.__code__


def _from_torch() -> bool:
    """Whether the Tensor method being handled was called from torch's own Python code (two frames up: the
    handler, then __torch_function__)."""
    return sys._getframe(3).f_code.co_filename.startswith(_TORCH_DIR)


def _user_frame(tb=None, user_file: str | None = None):
    """(file, line, text) of the innermost frame of the user's code: in `user_file` when given, else outside
    torch, memprof and the standard library. From a traceback, or from the current stack."""
    frames = traceback.extract_tb(tb) if tb is not None else traceback.extract_stack()[:-1]
    stdlib = os.path.dirname(os.__file__)
    for fr in reversed(frames):
        path = os.path.abspath(fr.filename)
        if user_file is not None:
            if path == os.path.abspath(user_file):
                return fr.filename, fr.lineno, (fr.line or "").strip()
            continue
        if path.startswith((_TORCH_DIR, _MEMPROF_DIR, stdlib)) or "site-packages" in path or fr.filename.startswith("<"):
            continue
        return fr.filename, fr.lineno, (fr.line or "").strip()
    if user_file is not None:
        return _user_frame(tb, None)
    return None


def _where(user_file=None) -> str:
    fr = _user_frame(None, user_file)
    return f"{fr[0]}:{fr[1]}" if fr else "(unknown place)"


@dataclass(frozen=True)
class _RuleSpec(RunSpec):
    """The spec handed to predict_traced: its precision selects every CUDA rule, its key is the record's."""

    record_key: str | None = None

    @property
    def key(self) -> str:
        return self.record_key or super().key


class _Event:
    """torch.cuda.Event on the simulated device: it records nothing; elapsed_time is 0 (no timing is simulated)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        if _ACTIVE:
            _ACTIVE[-1].note("timing", "torch.cuda.Event timings read 0 ms: the simulation predicts memory, not time")

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _Stream:
    """torch.cuda.Stream on the simulated device: one stream; everything runs in order."""

    device = CUDA0
    device_type = 1  # DeviceType.CUDA

    def __init__(self, *args, **kwargs):
        pass

    def is_capturing(self):
        return False

    def synchronize(self):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        return event

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class SimulatedCuda(StepCounting):
    """Context manager: the budget's card as a simulated CUDA device (see the module docstring).

    `budget`: a card name or size (memprof.budget.parse_budget). `steps`: stop with StopSimulation after that
    many optimizer steps (None: let the code end). `user_file`: the script whose lines errors name. `world_size`:
    a torchrun-style script's process group, DDP and FSDP2 run as rank 0 of that many (memprof.script.parallel;
    None: init_process_group is refused with the fix).
    After the block: `result` (a memprof.results.Result), `detected` (what ran), `notes`.
    """

    def __init__(self, budget: str = "titan-x", steps: int | None = None, user_file: str | None = None,
                 label: str | None = None, world_size: int | None = None):
        from memprof.budget import parse_budget

        self.budget = budget
        self.device = parse_budget(budget)
        if steps is not None and steps < 1:
            raise UsageError(f"--steps {steps}: give at least 1 (or leave it out to let the script end)")
        self.max_steps = steps
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            raise UsageError(f"--world-size {world_size}: give the number of ranks, at least 1")
        self.world_size = world_size
        self.user_file = user_file
        if label is None:
            fr = _user_frame()
            label = f"code:{os.path.basename(fr[0])}:{fr[1]}" if fr else "code"
        self.label = label
        self.notes: dict[str, str] = {}  # key -> note (each said once)
        self.detected: dict = {"batch_size": None, "autocast_dtypes": [], "grad_scaler": False,
                               "checkpointing": False, "optimizers": [], "steps": 0,
                               "optimizer_in_backward": False, "parallel": "none", "bucket_cap_mb": None,
                               "grad_as_bucket_view": False, "reshard_after_forward": True}
        self._result = None
        self._trace = None
        self._entered = False

    # --- notes and errors --------------------------------------------------------------------------------
    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, text)

    def refuse(self, text: str):
        """Raise UnsupportedCall: `text`, after the user's file:line."""
        raise UnsupportedCall(f"{_where(self.user_file)}: {text}")

    def _check_devices(self, func, args, kwargs) -> None:
        """CUDA refuses ops mixing a device tensor with a CPU tensor (other than a 0-dim one, a copy or an index)."""
        for a in (*args, *kwargs.values()) if kwargs else args:  # (no pytree: this runs for every op)
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if type(t) is not FakeTensor and isinstance(t, torch.Tensor) and t.dim() > 0 \
                        and t.device.type == "cpu" and not hasattr(t, "_local_tensor"):  # (a DTensor: FSDP's)
                    name = func._schema.name
                    if name in _CROSS_DEVICE_OK:
                        return
                    raise UnsupportedCall(f"{_where(self.user_file)}: {name} is given a tensor on cuda:0 and one on "
                                          f"the CPU (shape {tuple(t.shape)}); on CUDA this fails with 'Expected all "
                                          f"tensors to be on the same device': move it with .to(device)")

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
                                            f"torch.backends.cuda.enable_*_sdp) to {enabled} at "
                                            f"{_where(sim.user_file)}: attention is predicted with the kernel CUDA "
                                            f"selects among those")
            return current(*args, **kwargs)

        return scaled_dot_product_attention

    # --- data-parallel and sharded scripts (memprof.script.parallel) ---------------------------------------
    @staticmethod
    def internal():
        """A block in which the simulated device's tensors report their real (CPU) device (torch code that
        computes with them, as inside dispatch)."""
        return _internal()

    def _add_parallel(self, kind: str, rules) -> None:
        """The engine's rules of a parallelism the script started (DDP or FSDP), joining the run from here."""
        if self.detected["parallel"] not in ("none", kind):
            raise UnsupportedCall(f"{_where(self.user_file)}: the script uses both DistributedDataParallel and "
                                  f"fully_shard: one parallelism per run is simulated")
        self.detected["parallel"] = kind
        for rule in rules:
            self.parallel_rules.append(rule)
            self.tracker.add_rule(rule)
            if hasattr(rule, "mode"):
                self._stack.enter_context(rule.mode())

    def _add_ddp(self, module, bucket_cap_mb, as_view: bool) -> None:
        """DistributedDataParallel(module): its gradient buckets placed now, as DDP's constructor places them, by
        the engine's DDPBuckets (the trainable parameters in the module's order, as DDP and the harness take them)."""
        from memprof.simulation.distributed import DDPBuckets

        rule = DDPBuckets(bucket_cap_mb, bool(as_view))
        self._add_parallel("ddp", [rule])
        self.detected["bucket_cap_mb"], self.detected["grad_as_bucket_view"] = bucket_cap_mb, bool(as_view)
        holder = types.SimpleNamespace(param_groups=[{"params": [p for p in module.parameters() if p.requires_grad]}])
        with _internal(), self.fake_mode:
            rule.attach(self.tracker, holder)

    def _add_fsdp(self, reshard_after_forward: bool) -> None:
        from memprof.simulation.distributed import DTensorLocal, FSDPStorageEvents

        if self.detected["parallel"] != "fsdp":
            self._add_parallel("fsdp", [DTensorLocal(), FSDPStorageEvents()])
            self._sharded = True
        self.detected["reshard_after_forward"] = bool(reshard_after_forward)

    # --- the device moves and factories --------------------------------------------------------------------
    def _to_sim(self, t: torch.Tensor, dtype=None, op: str = "Tensor.to(cuda)",
                memory_format=torch.preserve_format) -> torch.Tensor:
        """A fake device copy of real tensor `t` (an allocation of its size), laid out as `memory_format` asks."""
        from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

        dtype = dtype or t.dtype
        stride = None if t.is_contiguous() or not is_non_overlapping_and_dense(t) else t.stride()  # preserve_format
        with _internal(), self.fake_mode:
            if memory_format not in (None, torch.preserve_format):
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu", memory_format=memory_format)
            elif stride is None:
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu")
            else:
                out = torch.empty_strided(tuple(t.shape), stride, dtype=dtype, device="cpu")
        self._data_alloc()
        self.tracker.register(out, op)
        if t.requires_grad and torch.is_grad_enabled() and (out.is_floating_point() or out.is_complex()):
            out.requires_grad_(True)
            self.note("grad-move", f"a tensor that requires grad was moved to the device at {_where(self.user_file)}: "
                                   "its copy is a new leaf (gradients do not flow back to the CPU tensor)")
        return out

    def _factory(self, func, args, kwargs):
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        kwargs = {**kwargs, "device": "cpu"}
        with _internal(), self.fake_mode:
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        self._data_alloc()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.tracker.register(t, f"torch.{name}(device=cuda)")
        return out

    def _parse_to(self, args, kwargs):
        """(device, dtype, copy, memory_format) of a Tensor.to call; device "sim", "cpu", None or another."""
        rest, kw = list(args[1:]), dict(kwargs)
        other = kw.pop("other", None)
        if other is None and rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
        device = kw.pop("device", None)
        dtype = kw.pop("dtype", None)
        if other is not None:
            device, dtype = ("sim" if is_sim(other) else other.device), other.dtype
        else:
            if rest and (rest[0] is None or isinstance(rest[0], (str, torch.device, int))) \
                    and not isinstance(rest[0], bool):
                device = rest.pop(0)  # to(device, dtype, ...), Module.to passes a None device positionally
                if rest and (rest[0] is None or isinstance(rest[0], torch.dtype)):
                    dtype = rest.pop(0)
            elif rest and isinstance(rest[0], torch.dtype):
                dtype = rest.pop(0)
        if rest:
            rest.pop(0)  # non_blocking
        copy = kw.pop("copy", rest.pop(0) if rest else False)
        memory_format = kw.pop("memory_format", torch.preserve_format)
        if device is not None and device != "sim":
            device = "sim" if _is_cuda_device(device) else ("cpu" if _is_cpu_device(device) else device)
        return device, dtype, copy, memory_format

    def _to(self, func, args, kwargs):
        t = args[0]
        device, dtype, copy, memory_format = self._parse_to(args, kwargs)
        if is_sim(t):
            if device == "cpu" and _from_torch():
                device = None  # torch's own code moving a tensor to the device it grouped it by (its real device)
            if device == "cpu":
                return self._stand_in(t, dtype)
            if device in ("sim", None):
                if dtype in (None, t.dtype) and not copy and memory_format == torch.preserve_format:
                    return t
                return torch.Tensor.to(t, dtype=dtype or t.dtype, copy=copy, memory_format=memory_format)
            return func(*args, **kwargs)
        if device == "sim":
            return self._to_sim(t, dtype, memory_format=memory_format)
        return func(*args, **kwargs)

    def _cuda(self, func, args, kwargs):
        t = args[0]
        return t if is_sim(t) else self._to_sim(t, op="Tensor.cuda()")

    def _cpu(self, func, args, kwargs):
        t = args[0]
        return self._stand_in(t) if is_sim(t) else func(*args, **kwargs)

    def _settling(self, original):
        def settled_first(*args, **kwargs):
            self._settled()
            return original(*args, **kwargs)

        settled_first.__name__ = getattr(original, "__name__", "settled_first")
        return settled_first

    def _swap_tensors(self, original):
        memo = self.fake_mode.fake_tensor_converter.meta_converter.tensor_memo

        def swap_tensors(t1, t2):
            if not (is_sim(t1) or is_sim(t2)):
                return original(t1, t2)
            for key, value in list(memo.items()):  # FakeTensorMode's weak memo would make the swap refuse
                if value is t1 or value is t2:
                    del memo[key]
            original(t1, t2)
            for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
                hooks = getattr(t1, attr, None)
                if hooks:
                    setattr(t1, attr, hooks)  # the setter installs them on t1's new implementation

        return swap_tensors

    # --- read-backs ---------------------------------------------------------------------------------------
    def _stand_in(self, t, dtype=None) -> torch.Tensor:
        self.note("readback", READBACK_NOTE)
        return torch.zeros(tuple(t.shape), dtype=dtype or t.dtype)

    def _item(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        return func(self._stand_in(t), *args[1:], **kwargs)

    def _settled(self) -> None:
        """The CPU's deferred fills run, before something reads CPU memory without an op (memprof.script.deferred)."""
        if self._deferred.queue:
            self._deferred.settle()

    def _tolist(self, func, args, kwargs):
        t = args[0]
        if is_sim(t):
            return self._stand_in(t).tolist()
        self._settled()
        return func(*args, **kwargs)

    def _numpy(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            self._settled()
            return func(*args, **kwargs)
        raise UnsupportedCall(f"{_where(self.user_file)}: .numpy() of a tensor on cuda:0: on CUDA this raises "
                              "(call .cpu() first)") if func is torch.Tensor.numpy else self._stand_in(t).numpy()

    def _repr(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        text = repr(self._stand_in(t))
        return text[:-1] + ", device='cuda:0')" if text.endswith(")") else text

    def _format(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        stand_in = self._stand_in(t)
        return format(stand_in.item(), *args[1:]) if stand_in.dim() == 0 else self._repr(func, args[:1], {})

    def _get_device(self, func, args, kwargs):
        return 0 if is_sim(args[0]) else func(*args, **kwargs)

    def _pin_memory(self, func, args, kwargs):
        self.note("pin", "pin_memory(): host memory, not modelled (nothing on the device)")
        return args[0]

    def _is_pinned(self, func, args, kwargs):
        return False

    def _record_stream(self, func, args, kwargs):
        return None

    def _deepcopy(self, func, args, kwargs):
        """copy.deepcopy of a device tensor (an EMA model, a best-weights copy): a new device tensor of its size,
        as on CUDA (torch's own deepcopy would copy the fake mode with it)."""
        t, memo = args[0], args[1] if len(args) > 1 else kwargs.get("memo", {})
        if not is_sim(t):
            return func(*args, **kwargs)
        if id(t) in memo:
            return memo[id(t)]
        with torch.no_grad():
            new = t.clone()
        if getattr(t, "_is_param", False):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            new.requires_grad_(t.requires_grad)
        memo[id(t)] = new
        if t.grad is not None:
            new.grad = self._deepcopy(func, (t.grad, memo), {})
        return new

    def _reduce(self, func, args, kwargs):
        if is_sim(args[0]):
            raise UnsupportedCall(f"{_where(self.user_file)}: pickling a tensor on cuda:0 (the simulation has no data)")
        self._settled()
        return func(*args, **kwargs)

    # --- torch.cuda ---------------------------------------------------------------------------------------
    def _live(self):
        """The allocator model fed with the stream so far, the rules' rewrites applied (as predict_traced
        applies them to the whole stream); fed incrementally while the rewritten prefix stays the same."""
        from memprof.simulation.allocator import DEFAULT_STREAM, CachingAllocatorModel

        events = self.tracker.events
        streams = self.tracker.stream  # (FSDP's streams; empty otherwise)
        rewriters = [r for r in self.rules if hasattr(r, "rewrite")]
        for rule in rewriters:
            folded = getattr(rule, "folded", None)
            events = rule.rewrite(events)
            if folded is not None:
                rule.folded = folded  # predict_traced counts the folds of its own rewrite
        fed = self._fed
        if self._alloc is None or len(events) < len(fed) or events[:len(fed)] != fed:
            self._alloc, fed = CachingAllocatorModel(), []
            self._fed = fed
            self._peak_alloc = self._peak_reserved = 0
        alloc = self._alloc
        for ev in events[len(fed):]:
            if ev.kind is ALLOC:
                alloc.malloc(ev.sid, ev.nbytes, streams.get(ev.sid, DEFAULT_STREAM))
                self._peak_alloc = max(self._peak_alloc, alloc.allocated)
                self._peak_reserved = max(self._peak_reserved, alloc.reserved)
            elif ev.kind is FREE:
                alloc.free(ev.sid)
            fed.append(ev)
        return alloc

    def memory_allocated(self, device=None) -> int:
        return self._live().allocated

    def max_memory_allocated(self, device=None) -> int:
        self._live()
        return self._peak_alloc

    def memory_reserved(self, device=None) -> int:
        return self._live().reserved

    def max_memory_reserved(self, device=None) -> int:
        self._live()
        return self._peak_reserved

    def reset_peak_memory_stats(self, device=None) -> None:
        alloc = self._live()
        self._peak_alloc, self._peak_reserved = alloc.allocated, alloc.reserved
        self.note("reset", f"torch.cuda.reset_peak_memory_stats() at {_where(self.user_file)}: the script's own "
                           "max_memory_* figures count from there; the record's peaks are over the whole run")

    def empty_cache(self) -> None:
        alloc = self._live()
        alloc.release_cached()
        self.note("empty_cache", f"torch.cuda.empty_cache() at {_where(self.user_file)}: the script's own reserved "
                                 "figures reflect it; the record's peak_reserved_bytes does not model it (it can "
                                 "only be higher than with it)")

    def memory_stats(self, device=None) -> dict:
        alloc = self._live()
        out = {"num_alloc_retries": 0, "num_ooms": 0, "num_device_alloc": alloc._segments}
        for name, cur, peak in (("allocated_bytes", alloc.allocated, self._peak_alloc),
                                ("reserved_bytes", alloc.reserved, self._peak_reserved),
                                ("active_bytes", alloc.allocated, self._peak_alloc)):
            for pool in ("all", "small_pool", "large_pool"):
                if pool == "all":
                    out[f"{name}.{pool}.current"], out[f"{name}.{pool}.peak"] = cur, peak
        out["requested_bytes.all.current"] = self.tracker.live_bytes
        return dict(sorted(out.items()))

    def memory_summary(self, device=None, abbreviated=False) -> str:
        alloc = self._live()
        mib = 1 << 20
        return (f"|  memprof simulated CUDA device: {self.device_name} (predicted, not measured)\n"
                f"|  Allocated memory: {alloc.allocated / mib:10.1f} MiB (peak {self._peak_alloc / mib:.1f} MiB)\n"
                f"|  Reserved memory:  {alloc.reserved / mib:10.1f} MiB (peak {self._peak_reserved / mib:.1f} MiB)\n")

    def mem_get_info(self, device=None) -> tuple[int, int]:
        alloc = self._live()
        total = self.device.total_bytes
        return max(0, total - self.device.context_bytes - alloc.reserved), total

    @property
    def device_name(self) -> str:
        return self.device.label.split(",")[0] if self.device.compute_capability else self.device.label

    def _properties(self, device=None):
        cc = self.device.compute_capability or (8, 0)
        return types.SimpleNamespace(name=self.device_name, total_memory=self.device.total_bytes, major=cc[0],
                                     minor=cc[1], multi_processor_count=108,
                                     L2_cache_size=self.device.l2_cache_bytes or 0, is_integrated=False,
                                     is_multi_gpu_board=False, gcnArchName="", uuid="memprof-simulated")

    def _cuda_functions(self) -> dict:
        cc = self.device.compute_capability or (8, 0)

        def set_device(device):
            idx = device.index if isinstance(device, torch.device) else device
            if isinstance(idx, str):
                idx = torch.device(idx).index
            if idx not in (None, 0, -1):
                raise UnsupportedCall(f"{_where(self.user_file)}: torch.cuda.set_device({device!r}): the simulated "
                                      "machine has one device (cuda:0)")

        class _DeviceContext:
            def __init__(self, device=None):
                self.device = device

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        def synchronize(device=None):
            return None

        return {
            "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
            "set_device": set_device, "get_device_name": lambda device=None: self.device_name,
            "get_device_capability": lambda device=None: cc, "get_device_properties": self._properties,
            "is_bf16_supported": lambda including_emulation=True: True,
            "is_current_stream_capturing": lambda: False, "synchronize": synchronize, "empty_cache": self.empty_cache,
            "memory_allocated": self.memory_allocated, "max_memory_allocated": self.max_memory_allocated,
            "memory_reserved": self.memory_reserved, "max_memory_reserved": self.max_memory_reserved,
            "memory_cached": self.memory_reserved, "max_memory_cached": self.max_memory_reserved,
            "reset_peak_memory_stats": self.reset_peak_memory_stats,
            "reset_max_memory_allocated": self.reset_peak_memory_stats,
            "reset_max_memory_cached": self.reset_peak_memory_stats,
            "memory_stats": self.memory_stats, "memory_summary": self.memory_summary, "mem_get_info": self.mem_get_info,
            "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda new_state, device="cuda": None,
            "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)],
            "set_rng_state_all": lambda new_states: None,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None, "seed": lambda: None,
            "seed_all": lambda: None, "device": _DeviceContext, "device_of": _DeviceContext,
            "get_arch_list": lambda: [f"sm_{cc[0]}{cc[1]}"],
            "current_stream": lambda device=None: _Stream(), "default_stream": lambda device=None: _Stream(),
            "Stream": _Stream, "Event": _Event, "stream": lambda stream=None: contextlib.nullcontext(),
            "is_tf32_supported": lambda: cc >= (8, 0), "init": lambda: None,
        }

    def _accelerator_functions(self) -> dict:
        """torch.accelerator (and torch.accelerator.memory) as the simulated CUDA device answers them."""
        return {
            "is_available": lambda: True, "device_count": lambda: 1,
            "current_accelerator": lambda check_available=False: torch.device("cuda"),
            "current_device_index": lambda: 0, "current_device_idx": lambda: 0,
            "set_device_index": lambda device: None, "set_device_idx": lambda device: None,
            "current_stream": lambda device=None: _Stream(), "synchronize": lambda device=None: None,
            "empty_cache": self.empty_cache, "memory_stats": self.memory_stats,
            "memory_allocated": self.memory_allocated, "max_memory_allocated": self.max_memory_allocated,
            "memory_reserved": self.memory_reserved, "max_memory_reserved": self.max_memory_reserved,
            "reset_peak_memory_stats": self.reset_peak_memory_stats,
        }

    # --- autocast -----------------------------------------------------------------------------------------
    def _autocast_init(self, original):
        sim = self

        def __init__(ac, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cuda":
                dtype = dtype if dtype is not None else torch.get_autocast_dtype("cuda")
                if enabled:
                    if dtype not in sim.detected["autocast_dtypes"]:
                        sim.detected["autocast_dtypes"].append(dtype)
                device_type = "cpu"  # fake tensors are CPU tensors; the cuda-autocast-policy rule applies CUDA's lists
            return original(ac, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        return __init__

    # --- phases, steps, detection ---------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        if self._depth == 0:
            if self._in_backward:
                self.detected["checkpointing"] = True  # a forward rerun inside backward: a checkpoint's recompute
            else:
                if self.tracker.phase not in ("forward",):
                    self._phase("forward")
                self._root(module, args)
        elif self._in_backward:
            self.detected["checkpointing"] = True
        self._depth += 1

    def _forward_post(self, module, args, output):
        self._depth = max(0, self._depth - 1)

    def _root(self, module, args) -> None:
        if module not in self._roots:
            self._roots.add(module)
            for name, p in module.named_parameters():
                shard = _local(p)  # (FSDP's parameters: this rank's shard)
                if is_sim(shard):
                    self._params.add(self.tracker.storage_id(shard))
                if id(p) not in self._param_info:  # what the model holds, as its first forward finds it
                    self._param_info[id(p)] = (name, p.numel(), p.element_size(), p.requires_grad, str(p.dtype))
                    if shard is not p:
                        self._shard_numel[id(p)] = shard.numel()
            for b in module.buffers():
                if is_sim(b):
                    self._params.add(self.tracker.storage_id(b))
            if self._attribution is None:
                from memprof.simulation.attribution import ModuleAttribution

                att = self._attribution = ModuleAttribution(module, self.tracker)
                att.__enter__()
                # a script may drop its model and build another: what the attribution keeps must not keep it alive
                att._params, att._buffers = weakref.WeakSet(att._params), []
                att.modules.names = weakref.WeakKeyDictionary(att.modules.names)
        if self.detected["batch_size"] is None:
            flat, _ = tree_flatten(args)
            first = next((t for t in flat if is_sim(t) and t.dim() >= 1), None)
            if first is not None:
                self.detected["batch_size"] = int(first.shape[0])

    def _data_alloc(self) -> None:
        """A tensor made on (or moved to) the device by the user's code, not by Module.to, an optimizer step or
        backward: a new batch, so the next step's forward begins here (as the harness marks it: before the batch)."""
        if self._in_step or self._in_backward or self.tracker.phase not in ("setup", "optimizer"):
            return
        f = sys._getframe(2)
        while f is not None:
            if f.f_code is _MODULE_APPLY:
                return
            f = f.f_back
        self._phase("forward")

    def _phase(self, name: str) -> None:
        self.tracker.set_phase(name, self.detected["steps"])

    def _optimizer_pre(self, optimizer, args, kwargs):
        self._in_step += 1
        if not self._in_backward:
            self._phase("optimizer")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            grad = p.grad if p.grad is None else _local(p.grad)
            if grad is not None and is_sim(grad):
                self._grads.add(self.tracker.storage_id(grad))
        if self._attribution is not None:
            self._attribution._grads()
        if id(optimizer) not in self._described:
            self._described.add(id(optimizer))
            for rule in self.rules:  # rules acting on the optimizer (bitsandbytes' 8-bit states), as trace_step does
                rule.attach(self.tracker, optimizer)
            self.detected["optimizers"].append(_describe_optimizer(optimizer, params))

    def _optimizer_post(self, optimizer, args, kwargs):
        self._in_step = max(0, self._in_step - 1)
        for state in optimizer.state.values():
            for t in state.values():
                t = _local(t)
                if is_sim(t):
                    self._states.add(self.tracker.storage_id(t))
        if self._attribution is not None:
            self._attribution._states(optimizer)
        from memprof.simulation.tracing import state_summary

        self._state_summaries[id(optimizer)] = state_summary(optimizer)
        self._optimizer_stepped()

    # --- enter / exit -------------------------------------------------------------------------------------
    def rule_spec(self, key: str | None = None):
        """The spec the CUDA rules are made for: every precision rule joins (each acts only on the half-precision
        ops, autocast regions or GradScaler it is about, so an fp32 script is unaffected). `key`: the record's
        spec key, which names the timeline and snapshot files predict_traced writes."""
        return _RuleSpec(model="script", optim="custom", precision="fp16-amp", budget=self.budget, record_key=key)

    def __enter__(self) -> "SimulatedCuda":
        from memprof.simulation.rules import cuda_rules

        if _ACTIVE:
            raise UsageError("simulated_cuda is already in force: nest no second one")
        if torch.cuda.is_available() and not os.environ.get("MEMPROF_SIMULATE_ON_GPU"):
            self.note("gpu", "a GPU is present, but this run is a simulation of the budget's card (predicted)")
        self._start = time.perf_counter()
        self.rules = cuda_rules(self.device, self.rule_spec())
        from memprof.simulation.fake_compat import register_meta_kernels

        register_meta_kernels()
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.tracker = _SimTracker(self.rules, self)
        self._deferred = DeferredFills()  # the CPU's random fills, until read (memprof.script.deferred)
        self.parallel_rules = []  # DDP's or FSDP's, once the script starts it (memprof.script.parallel)
        self._fsdp_mesh = None
        self._sharded = False  # FSDP started: torch.distributed's factories on the (CPU) mesh make device tensors
        self._fed, self._alloc = [], None
        self._peak_alloc = self._peak_reserved = 0
        self._in_step = 0
        self._sdp_default = _sdp_flags()
        self._depth = 0
        self._start_counting()
        self._roots, self._param_info, self._shard_numel = weakref.WeakSet(), {}, {}
        self._params, self._grads, self._states = set(), set(), set()
        self._state_summaries, self._described, self._attribution = {}, set(), None
        self._stack = contextlib.ExitStack()
        stack = self._stack

        try:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()  # releases follow reference counts alone, as the engine's traces do
            stack.callback(lambda: gc.enable() if self._gc_was_enabled else None)
            _ACTIVE.append(self)
            stack.callback(_ACTIVE.pop)
            self._patch(stack)
            stack.enter_context(self.tracker)
            for rule in self.rules:
                if hasattr(rule, "mode"):
                    stack.enter_context(rule.mode())
            import torch.nn.functional as F

            current = F.scaled_dot_product_attention  # (the rules' own, looked up at call time as torch does)
            F.scaled_dot_product_attention = self._sdpa(current)
            stack.callback(setattr, F, "scaled_dot_product_attention", current)
            self.function_mode = _SimFunctionMode(self)
            stack.enter_context(self.function_mode)
        except BaseException:
            stack.close()
            raise
        self._entered = True
        return self

    def _patch(self, stack) -> None:
        """Replace, for the duration, what cannot be reached through torch's modes; every one is restored."""
        from torch.amp import autocast_mode
        from torch.optim import optimizer as optim_mod
        from torch.nn.modules import module as module_mod

        def setattr_restored(obj, name, value):
            had = name in vars(obj)
            old = vars(obj).get(name)
            setattr(obj, name, value)
            stack.callback(lambda: setattr(obj, name, old) if had else delattr(obj, name))

        setattr_restored(FakeTensor, "device", property(_sim_device, _FAKE_DEVICE_PROPERTY.fset))
        stack.callback(_set_sdp_flags, _sdp_flags())  # a script's enable_*_sdp(False) ends with it
        # Module.to / .cuda() keep each Parameter object (as CUDA's in-place `.data =` does), so optimizers built
        # before the move and hooks registered on parameters survive: torch's swap-on-conversion path, with the
        # hooks re-installed on the swapped object (the C++ hooks travel with the tensor's implementation)
        original_get_swap = torch.__future__.get_swap_module_params_on_conversion

        def get_swap_module_params_on_conversion():
            # Module._apply only: load_state_dict keeps its in-place copy_, as it does on CUDA
            return sys._getframe(1).f_code is _MODULE_APPLY or original_get_swap()

        setattr_restored(torch.__future__, "get_swap_module_params_on_conversion", get_swap_module_params_on_conversion)
        setattr_restored(torch.utils, "swap_tensors", self._swap_tensors(torch.utils.swap_tensors))
        cuda_mem = sys.modules.get("torch.cuda.memory")
        for name, fn in self._cuda_functions().items():
            if name in vars(torch.cuda):
                setattr_restored(torch.cuda, name, fn)
            if cuda_mem is not None and name in vars(cuda_mem):
                setattr_restored(cuda_mem, name, fn)
        import importlib

        pin_mod = importlib.import_module("torch.utils.data._utils.pin_memory")
        for mod in (importlib.import_module("torch.accelerator"), sys.modules.get("torch.accelerator.memory")):
            for name, fn in self._accelerator_functions().items():
                if mod is not None and name in vars(mod):
                    setattr_restored(mod, name, fn)
        setattr_restored(pin_mod, "pin_memory", lambda data, device=None: data)  # the loader's pinning thread
        queued = list(torch.cuda._queued_calls)
        stack.callback(lambda: torch.cuda._queued_calls.__setitem__(slice(None), queued))
        setattr_restored(autocast_mode.autocast, "__init__", self._autocast_init(autocast_mode.autocast.__init__))
        original_enabled, original_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

        def is_autocast_enabled(device_type=None):  # CUDA's autocast state is the CPU's here (see _autocast_init)
            if device_type is None or device_type == "cuda":
                return original_enabled("cpu")
            return original_enabled(device_type)

        def get_autocast_dtype(device_type):
            if device_type == "cuda" and original_enabled("cpu"):
                return original_dtype("cpu")
            return original_dtype(device_type)

        setattr_restored(torch, "is_autocast_enabled", is_autocast_enabled)
        setattr_restored(torch, "get_autocast_dtype", get_autocast_dtype)
        if FakeTensor not in optim_mod._foreach_supported_types:
            optim_mod._foreach_supported_types.append(FakeTensor)
            stack.callback(optim_mod._foreach_supported_types.remove, FakeTensor)
        setattr_restored(torch.autograd, "backward", self._backward(torch.autograd.backward))
        from torch.amp import grad_scaler

        original_scale = grad_scaler.GradScaler.scale

        def scale(scaler, outputs):
            if scaler.is_enabled():
                self.detected["grad_scaler"] = True
            return original_scale(scaler, outputs)

        setattr_restored(grad_scaler.GradScaler, "scale", scale)
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if any(is_sim(t) for t in tree_flatten(obj)[0]):
                self.note(f"save:{_where(self.user_file)}", f"torch.save at {_where(self.user_file)}: it holds tensors "
                                                            "on the simulated device; nothing was written")
                return None
            self._settled()
            return original_save(obj, f, *args, **kwargs)

        setattr_restored(torch, "save", save)
        from memprof.script.deferred import trunc_normal

        setattr_restored(torch.nn.init, "trunc_normal_", trunc_normal(self._deferred, torch.nn.init.trunc_normal_))
        for mod in (torch, torch.random):  # the CPU generator read or reset: the deferred fills run first
            for name in ("get_rng_state", "set_rng_state", "manual_seed", "seed"):
                if name in vars(mod):
                    setattr_restored(mod, name, self._settling(getattr(mod, name)))
        original_load = torch.load

        def load(f, map_location=None, *args, **kwargs):
            """torch.load(..., map_location="cuda" / a cuda device): loaded on the CPU, then each tensor copied to
            the device (what landing on the card allocates)."""
            if map_location is not None and not callable(map_location) and not isinstance(map_location, dict) \
                    and _is_cuda_device(map_location):
                obj = original_load(f, *args, map_location="cpu", **kwargs)
                return tree_map_only(torch.Tensor, lambda t: self._to_sim(t, op="torch.load(map_location=cuda)"),
                                     obj)
            return original_load(f, *args, map_location=map_location, **kwargs)

        setattr_restored(torch, "load", load)

        def compile_(model=None, **kwargs):
            self.note("compile", "torch.compile runs eager here: compiled code's memory differs (predicted as eager)")
            return model if model is not None else (lambda fn: fn)

        setattr_restored(torch, "compile", compile_)
        original_set_default, original_get_default = torch.set_default_device, torch.get_default_device

        def set_default_device(device):
            self._default_cuda = device is not None and _is_cuda_device(device)
            if not self._default_cuda:
                original_set_default(device)

        def get_default_device():
            return CUDA0 if self._default_cuda else original_get_default()

        self._default_cuda = False
        setattr_restored(torch, "set_default_device", set_default_device)
        setattr_restored(torch, "get_default_device", get_default_device)
        from memprof.script import parallel

        parallel.install(self, stack, setattr_restored)
        for handle in (optim_mod.register_optimizer_step_pre_hook(self._optimizer_pre),
                       optim_mod.register_optimizer_step_post_hook(self._optimizer_post),
                       module_mod.register_module_forward_pre_hook(self._forward_pre),
                       module_mod.register_module_forward_hook(self._forward_post, always_call=True)):
            stack.callback(handle.remove)

    def __exit__(self, exc_type, exc, tb):
        self._deferred.drop()  # fills of CPU tensors that went to the device unread (the record's count)
        try:
            if exc is None or isinstance(exc, StopSimulation) or (isinstance(exc, SystemExit) and not exc.code):
                self._phase("done")
                self._trace = self._make_trace()
            else:
                self._phase("done")
        finally:
            if self._attribution is not None:
                self._attribution.__exit__(None, None, None)
            self._stack.close()
            self._entered = False
        if exc is not None and not isinstance(exc, (StopSimulation, SystemExit, KeyboardInterrupt, UsageError)) \
                and not os.environ.get("MEMPROF_DEBUG"):
            raise self.explain(exc) from None
        return isinstance(exc, StopSimulation)  # the requested steps ran: the block ends there, cleanly

    def explain(self, exc: BaseException) -> UnsupportedCall:
        """One line for an exception raised under the simulated device: the call and the user's file:line."""
        if isinstance(exc, SyntaxError):
            return UnsupportedCall(f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg} (the script does not compile)")
        fr = _user_frame(exc.__traceback__, self.user_file)
        where = f"{fr[0]}:{fr[1]}" if fr else "(unknown place)"
        call = f" `{fr[2]}`" if fr and fr[2] else ""
        first = (str(exc).strip().splitlines() or [""])[0]
        if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException)):
            op = getattr(exc, "func", None) or type(exc).__name__
            return UnsupportedCall(f"{where}:{call} needs tensor data ({op}), which the simulated device does not "
                                   f"have: predict without it or measure on a GPU (--backend cuda)")
        if isinstance(exc, UnsupportedOperatorException):
            return UnsupportedCall(f"{where}:{call} runs {first}, which the simulation cannot run (no shape function)")
        tb, last = exc.__traceback__, None
        while tb is not None:
            last, tb = tb, tb.tb_next
        origin = os.path.abspath(last.tb_frame.f_code.co_filename) if last is not None else ""
        if origin and not origin.startswith((_TORCH_DIR, _MEMPROF_DIR)):  # the user's own code raised it
            return UnsupportedCall(f"{where}:{call} raised {type(exc).__name__}: {first} (on the simulated device)")
        return UnsupportedCall(f"{where}:{call} cannot be simulated: {type(exc).__name__}: {first}")

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

    def param_dtypes(self) -> list[str]:
        return list(dict.fromkeys(d for *_, d in self._param_info.values()))

    def precision(self) -> str:
        """fp32, bf16-amp, fp16-amp (autocast seen), bf16 / fp16 (the parameters in that dtype)."""
        dtypes = self.detected["autocast_dtypes"]
        if torch.float16 in dtypes:
            return "fp16-amp"
        if torch.bfloat16 in dtypes:
            return "bf16-amp"
        pd = self.param_dtypes()
        if "torch.bfloat16" in pd:
            return "bf16"
        if "torch.float16" in pd:
            return "fp16"
        return "fp32"

    @property
    def result(self):
        if self._result is None:
            from memprof.script.record import result_of

            self._result = result_of(self)
        return self._result


def _describe_optimizer(optimizer, params) -> dict:
    """The optimizer's class and the implementation its step runs, resolved as torch resolves it on CUDA."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        impl = "fused"
    elif foreach is None and "foreach" in group:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            impl = "foreach" if _default_to_fused_or_foreach(params, bool(group.get("differentiable")))[1] \
                else "forloop"
    elif foreach:
        impl = "foreach"
    elif "foreach" in group:
        impl = "forloop"
    else:
        impl = "own"
    cls = type(optimizer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "name": cls.__name__, "implementation": impl,
            "params": len(params)}


def simulated_cuda(budget: str = "titan-x", steps: int | None = None, label: str | None = None,
                   world_size: int | None = None) -> SimulatedCuda:
    """`with memprof.simulated_cuda(budget="a100-80g") as sim: train()`, then `sim.result` (predicted). With
    `world_size`, code that starts a process group runs as rank 0 of that many (memprof.script.parallel)."""
    return SimulatedCuda(budget, steps=steps, label=label, world_size=world_size)
