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
  dispatch); what is replaced in torch: memprof.script.torch_patches (torch.cuda: cuda_api, files: files,
  torch.distributed: parallel), every patch installed and restored through memprof.script.patches; what is read
  back: memprof.script.standins; what ran (phases, steps, the setup): memprof.script.detection; the engine's trace,
  live figures and prediction: memprof.script.trace.
- this module is the block: a StorageTracker (memprof.simulation.tracker) logs every device storage with the CUDA
  rules of memprof.simulation.rules acting as on the `memprof run` path; ops on real tensors pass through
  uncounted. At the end the stream goes through the engine's one entrance, like every other prediction.
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
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprof.errors import UsageError
from memprof.script import moves, torch_patches, trace
from memprof.script.deferred import DEFERRABLE as _DEFERRABLE, DeferredFills
from memprof.script.detection import Detection, StopSimulation  # noqa: F401 (StopSimulation: the runner's)
from memprof.script.failures import UnsupportedCall, explain, is_simulations, user_frame, where  # noqa: F401
from memprof.script.patches import Patches
from memprof.script.standins import StandIns, materialise, value_of
from memprof.script.state import ACTIVE, INTERNAL, TORCH_DIR, CudaError, internal, is_sim, under_module_apply
from memprof.simulation.distributed import local as _local  # (FSDP: the shard this rank holds)
from memprof.simulation.memo import MEMO
from memprof.simulation.replay import Replayer
from memprof.simulation.tracing import TraceBuilder
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec

_DISTRIBUTED_DIR = os.path.join(TORCH_DIR, "distributed", "")
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_EQUAL = torch.ops.aten.equal.default
_get_dispatch_mode, _FAKE_KEY = torch._C._get_dispatch_mode, torch._C._TorchDispatchModeKey.FAKE
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put", "aten::index_put_",
                    "aten::_index_put_impl_", "aten::lift_fresh", "aten::_foreach_copy_", "aten::detach",
                    "aten::alias", "aten::set_", "aten::_has_compatible_shallow_copy_type"}


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
        sim, kwargs = self.sim, kwargs or {}
        if FakeTensor not in types and not (sim.sharded and types and _dtensor_types(types)):
            if not types and sim.sharded and _from_distributed():
                # FSDP on the simulated device shards over a CPU mesh, as the engine does: what torch.distributed
                # makes on the mesh's device (all-gather and reduce-scatter buffers) is the device's
                with sim.fake_mode:
                    return self._made(func, args, kwargs, func(*args, **kwargs))
            made = moves.dispatch_factory(sim, func, args, kwargs)
            if made is not None:  # an op naming the CUDA device, reached without the function mode
                return self._made(func, args, kwargs, made)
            deferred = sim.deferred
            # a CPU fill queued, or settled (memprof.script.deferred); not for what the fake mode below will run
            if (deferred.queue or func in _DEFERRABLE) and _get_dispatch_mode(_FAKE_KEY) is None:
                done, out = deferred.dispatch(func, args, kwargs)
                if done:
                    return out
            return func(*args, **kwargs)
        if func is _LOCAL_SCALAR and is_sim(args[0]):  # .item() inside torch's own code: a stand-in value
            return sim.standins.scalar(args[0])
        if func is _EQUAL and (is_sim(args[0]) or is_sim(args[1])):
            known = value_of(args[0]), value_of(args[1])
            if all(isinstance(v, torch.Tensor) for v in known):
                return torch.equal(*(materialise(v, t) for v, t in zip(known, args[:2])))
            return False  # (unknown data: read as unequal)
        INTERNAL.depth += 1
        try:
            sim.check_devices(func, args, kwargs)
            with sim.fake_mode:
                out = super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            INTERNAL.depth -= 1
        sim.standins.after_op(func, args, kwargs, out)
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


@dataclass(frozen=True)
class _RuleSpec(RunSpec):
    """The spec handed to the engine: its precision selects every CUDA rule, its key is the record's."""

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
        from memprof.options import parse

        self.world_size = parse("world_size", world_size)
        self.user_file = user_file
        if label is None:
            fr = user_frame()
            label = f"code:{os.path.basename(fr[0])}:{fr[1]}" if fr else "code"
        self.label = label
        self.notes: dict[str, str] = {}  # key -> note (each said once)
        self._start_detection()
        self._result = None
        self.trace = None
        self.entered = False

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
                    raise CudaError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                    f"cuda:0 and cpu! ({name} is given a CPU tensor of shape {tuple(t.shape)}: move "
                                    f"it with .to(device))")

    @staticmethod
    def internal():
        """A block in which the simulated device's tensors report their real (CPU) device (torch code that
        computes with them, as inside dispatch)."""
        return internal()

    def settled(self) -> None:
        """The CPU's deferred fills run, before something reads CPU memory without an op (memprof.script.deferred)."""
        if self.deferred.queue:
            self.deferred.settle()

    def data_alloc(self) -> None:
        """A tensor made on (or moved to) the device by the user's code, not by Module.to, an optimizer step or
        backward: a new batch, so the next step's forward begins here (as the harness marks it: before the batch)."""
        if self._in_step or self._in_backward or self.tracker.phase not in ("setup", "optimizer"):
            return
        if under_module_apply(3):
            return
        self._phase("forward")

    @staticmethod
    def move_input(value):
        """A user step's input, on the device (memprof.script.steps)."""
        from memprof.script.steps import to_cuda

        return to_cuda(value)

    def build_user(self, build):
        """A user's build() inside the block: on the meta device (constructors allocate nothing; device="cuda" and
        .cuda() still reach the device), then moved, each Parameter object kept (memprof.script.steps)."""
        from memprof.script.steps import remaining_meta

        with torch.device("meta"):
            model, optimizer, frozen = build()
        model.cuda()  # a no-op for what build() already put there
        remaining_meta(model, self)
        return model, optimizer, frozen

    def live(self):
        """The allocator model as the stream stands (memprof.script.trace.live): torch.cuda's figures now."""
        return trace.live(self)

    # --- what ran (memprof.script.detection) -----------------------------------------------------------------
    def _phase(self, name: str) -> None:
        self.tracker.set_phase(name, self.detected["steps"])

    def _enter_forward(self) -> None:
        if self.tracker.phase != "forward":
            self._phase("forward")

    def _is_device_tensor(self, t) -> bool:
        return is_sim(_local(t))

    def _on_root(self, module) -> None:
        builder = self.builder
        builder.record_model(module)
        builder.own(builder.params, (t for t in (*module.parameters(), *module.buffers()) if is_sim(_local(t))))
        if self.attribution is None:
            from memprof.simulation.attribution import ModuleAttribution

            self.attribution = ModuleAttribution(module, self.tracker, weak=True)
            self.attribution.__enter__()

    def _on_optimizer_pre(self, optimizer, params) -> None:
        self.builder.own(self.builder.grads, (p.grad for p in params if p.grad is not None and is_sim(_local(p.grad))))
        if self.attribution is not None:
            self.attribution._grads()
        if id(optimizer) not in self._attached:
            self._attached.add(id(optimizer))
            for rule in self.rules:  # rules acting on the optimizer (bitsandbytes' 8-bit states), as trace_step does
                rule.attach(self.tracker, optimizer)

    def _on_optimizer_post(self, optimizer) -> None:
        self.builder.own_states(optimizer)
        if self.attribution is not None:
            self.attribution._states(optimizer)

    def _autocast_device(self, device_type: str) -> str:
        return "cpu" if device_type == "cuda" else device_type  # (the cuda-autocast-policy rule applies CUDA's lists)

    # --- enter / exit -------------------------------------------------------------------------------------
    def rule_spec(self, key: str | None = None):
        """The spec the CUDA rules are made for: every precision rule joins (each acts only on the half-precision
        ops, autocast regions or GradScaler it is about, so an fp32 script is unaffected). `key`: the record's
        spec key, which names the timeline and snapshot files the prediction writes."""
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
        self.builder = TraceBuilder(self.tracker)
        self.replayer = Replayer()  # torch.cuda's figures while the script runs (memprof.script.trace.live)
        self.standins = StandIns()
        self.deferred = DeferredFills()  # the CPU's random fills, until read (memprof.script.deferred)
        self.parallel_rules = []  # DDP's or FSDP's, once the script starts it (memprof.script.parallel)
        self.fsdp_mesh = None
        self.sharded = False  # FSDP started: torch.distributed's factories on the (CPU) mesh make device tensors
        self._attached, self.attribution = set(), None
        self.saving = 0  # > 0 while torch.save pickles (memprof.script.files)
        self.default_cuda = False  # torch.set_default_device("cuda")
        self.threads, self.main_thread = set(), threading.get_ident()
        self.calls = moves.DeviceCalls(self)
        self._start_detection()
        self.patches = patches = Patches()
        try:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()  # releases follow reference counts alone, as the engine's traces do
            patches.callback(lambda: gc.enable() if self._gc_was_enabled else None)
            ACTIVE.append(self)
            patches.callback(ACTIVE.pop)
            torch_patches.install(self, patches)
            self._install_detection(patches)
            patches.enter_context(self.tracker)
            for rule in self.rules:
                if hasattr(rule, "mode"):
                    patches.enter_context(rule.mode())
            torch_patches.restricted_sdpa(self, patches)  # outermost: the rules' own SDPA below it
            patches.enter_context(self.calls)
        except BaseException:
            patches.close()
            raise
        self.entered = True
        return self

    def __exit__(self, exc_type, exc, tb):
        self.deferred.drop()  # fills of CPU tensors that went to the device unread (the record's count)
        try:
            self._phase("done")
            if not isinstance(exc, KeyboardInterrupt):  # (what ran before an error too: the record keeps it)
                self.trace = trace.make_trace(self)
        finally:
            if self.attribution is not None:
                self.attribution.__exit__(None, None, None)
            self.entered = False
            self.patches.close()
        self._closing_notes()
        if isinstance(exc, Exception) and not isinstance(exc, UsageError) and is_simulations(exc) \
                and not os.environ.get("MEMPROF_DEBUG"):
            raise explain(exc, self.user_file) from None
        return isinstance(exc, StopSimulation)  # the requested steps ran: the block ends there, cleanly

    def _closing_notes(self) -> None:
        note = self.standins.note()
        if note:
            self.note("readback", note)
        if self.deferred.skipped_before_a_draw:
            self.note("cpu-rng", f"{self.deferred.skipped_before_a_draw} random initialisations of CPU tensors that "
                                 f"went to the device unread were not drawn, so the CPU generator's later draws (data "
                                 f"order, augmentation) differ from an eager run's; no device figure depends on them")
        if self.threads:
            n = len(self.threads)
            self.note("threads", f"{n} thread{'s' * (n > 1)} the script started put tensors on the simulated device "
                                 f"(counted in the order the work ran)")

    def predict(self, out_dir: str | None = None, snapshot_dir: str | None = None, key: str | None = None):
        """(status, metrics) of what ran (memprof.script.trace.predict)."""
        return trace.predict(self, out_dir, snapshot_dir, key)

    @property
    def result(self):
        return self.result_with()

    def result_with(self, out_dir: str | None = None, snapshot_dir: str | None = None):
        """The block's Result (predicted), made once; with `out_dir` / `snapshot_dir` its timeline and predicted
        allocator snapshot are written there (memprof.reports.artifacts)."""
        if self._result is None:
            from memprof.script.record import result_of

            self._result = result_of(self, out_dir, snapshot_dir)
        return self._result


def simulated_cuda(budget="titan-x", steps: int | None = None, label: str | None = None,
                   world_size: int | None = None) -> SimulatedCuda:
    """`with memprof.simulated_cuda(budget="a100-80g") as sim: train()`, then `sim.result` (predicted). With
    `world_size`, code that starts a process group runs as rank 0 of that many (memprof.script.parallel)."""
    return SimulatedCuda(budget, steps=steps, label=label, world_size=world_size)
