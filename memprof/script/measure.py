"""`memprof script --backend cuda`: the same script run for real on the GPU at hand, measured.

MeasuredCuda is the measuring twin of memprof.script.device.SimulatedCuda: the same detection (batch size, autocast
dtypes, GradScaler, optimizers and their resolved implementation, checkpointing, optimizer-in-backward, steps) and
the same phases (forward, backward, optimizer) from the same hooks, so its record's key equals the prediction's
(backend `cuda` instead of `simulate`) and the two sit side by side for `memprof fidelity`. At every phase boundary
the device is synchronised, the phase's torch.cuda.max_memory_allocated / max_memory_reserved are read and the peaks
reset (as the `cuda` backend of `memprof run` does, memprof.backends.cuda): the overall peak is the largest phase
peak. Figures are measured; a budget other than the card is only judged against (not emulated), and says so.
"""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
from torch.utils._pytree import tree_flatten

from memprof.errors import UsageError
from memprof.script.counting import StepCounting, StopSimulation
from memprof.script.device import _describe_optimizer, _user_frame

PHASES = ("forward", "backward", "optimizer")


class MeasuredCuda(StepCounting):
    """Context manager: measure the code inside on the real CUDA device (see the module docstring)."""

    def __init__(self, budget: str | None = None, steps: int | None = None, user_file: str | None = None,
                 label: str | None = None, world_size: int | None = None):
        if world_size not in (None, 1):
            raise UsageError(f"--world-size {world_size}: one GPU measures world size 1 only; predict larger worlds "
                             f"on the simulated card (leave --backend out)")
        self.world_size = world_size
        self.budget = budget
        self.max_steps = steps
        self.user_file = user_file
        if label is None:
            fr = _user_frame()
            label = f"code:{fr[0].rsplit('/', 1)[-1]}:{fr[1]}" if fr else "code"
        self.label = label
        self.notes: dict[str, str] = {}
        self.detected: dict = {"batch_size": None, "autocast_dtypes": [], "grad_scaler": False,
                               "checkpointing": False, "optimizers": [], "steps": 0, "optimizer_in_backward": False,
                               "parallel": "none"}
        self._result = None

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, text)

    # --- phases and peaks -------------------------------------------------------------------------------------
    def _close_phase(self) -> None:
        torch.cuda.synchronize()
        ph = self._current
        self.allocated[ph] = max(self.allocated.get(ph, 0), torch.cuda.max_memory_allocated() - self._base)
        self.reserved[ph] = max(self.reserved.get(ph, 0), torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def _phase(self, name: str) -> None:
        self._close_phase()
        self._current = name

    # --- detection (as SimulatedCuda detects) -----------------------------------------------------------------
    def _forward_pre(self, module, args):
        if self._depth == 0:
            if self._in_backward:
                self.detected["checkpointing"] = True
            else:
                if self._current != "forward":
                    self._phase("forward")
                if module not in self._roots:
                    self._roots.add(module)
                    from memprof.script.parallel import parallel_of

                    self.detected.update(parallel_of(module))  # DDP / FSDP2, as the simulated device records it
                    for name, p in module.named_parameters():
                        self._param_info.setdefault(id(p), (name, p.numel(), p.requires_grad, str(p.dtype)))
                if self.detected["batch_size"] is None:
                    flat, _ = tree_flatten(args)
                    first = next((t for t in flat if isinstance(t, torch.Tensor) and t.is_cuda and t.dim() >= 1),
                                 None)
                    if first is not None:
                        self.detected["batch_size"] = int(first.shape[0])
        elif self._in_backward:
            self.detected["checkpointing"] = True
        self._depth += 1

    def _forward_post(self, module, args, output):
        self._depth = max(0, self._depth - 1)

    def _optimizer_pre(self, optimizer, args, kwargs):
        if not self._in_backward:
            self._phase("optimizer")
        if id(optimizer) not in self._described:
            self._described.add(id(optimizer))
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.detected["optimizers"].append(_describe_optimizer(optimizer, params))

    def _optimizer_post(self, optimizer, args, kwargs):
        self._state_bytes[id(optimizer)] = sum(
            t.untyped_storage().nbytes() for st in optimizer.state.values() for k, t in st.items()
            if isinstance(t, torch.Tensor) and t.is_cuda and k != "step")
        self._optimizer_stepped()

    def param_dtypes(self) -> list[str]:
        return list(dict.fromkeys(d for *_, d in self._param_info.values()))

    def precision(self) -> str:
        from memprof.script.device import SimulatedCuda

        return SimulatedCuda.precision(self)

    # --- enter / exit -----------------------------------------------------------------------------------------
    def __enter__(self) -> "MeasuredCuda":
        from torch.amp import autocast_mode, grad_scaler
        from torch.nn.modules import module as module_mod
        from torch.optim import optimizer as optim_mod

        if not torch.cuda.is_available():
            raise UsageError("--backend cuda measures on a CUDA GPU and this machine has none: leave --backend out "
                             "to predict (the simulated card)")
        self._start = time.perf_counter()
        self._depth = 0
        self._start_counting()
        self._roots, self._param_info, self._described, self._state_bytes = weakref.WeakSet(), {}, set(), {}
        self.allocated, self.reserved = {}, {}
        self._stack = stack = contextlib.ExitStack()
        try:
            if self.world_size is not None:  # a torchrun script's own init_process_group, on this one GPU
                from memprof.script.parallel import environment

                stack.enter_context(environment(self.world_size))
            sim = self
            original_init = autocast_mode.autocast.__init__

            def autocast_init(ac, device_type, dtype=None, enabled=True, cache_enabled=None):
                if device_type == "cuda" and enabled:
                    d = dtype if dtype is not None else torch.get_autocast_dtype("cuda")
                    if d not in sim.detected["autocast_dtypes"]:
                        sim.detected["autocast_dtypes"].append(d)
                return original_init(ac, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

            autocast_mode.autocast.__init__ = autocast_init
            stack.callback(setattr, autocast_mode.autocast, "__init__", original_init)
            original_scale = grad_scaler.GradScaler.scale

            def scale(scaler, outputs):
                if scaler.is_enabled():
                    sim.detected["grad_scaler"] = True
                return original_scale(scaler, outputs)

            grad_scaler.GradScaler.scale = scale
            stack.callback(setattr, grad_scaler.GradScaler, "scale", original_scale)
            original_backward = torch.autograd.backward
            torch.autograd.backward = self._backward(original_backward)
            stack.callback(setattr, torch.autograd, "backward", original_backward)
            for handle in (optim_mod.register_optimizer_step_pre_hook(self._optimizer_pre),
                           optim_mod.register_optimizer_step_post_hook(self._optimizer_post),
                           module_mod.register_module_forward_pre_hook(self._forward_pre),
                           module_mod.register_module_forward_hook(self._forward_post, always_call=True)):
                stack.callback(handle.remove)
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()  # what the process held before the code (not the code's)
            torch.cuda.reset_peak_memory_stats()
            self._current = "setup"
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._phase("done")
            self._oom = exc if isinstance(exc, torch.OutOfMemoryError) else None
            self._end_phase = self._current
        finally:
            self._stack.close()
        if self._oom is not None:
            return True  # a measured out-of-memory is a result
        return isinstance(exc, StopSimulation)

    @property
    def result(self):
        if self._result is None:
            self._result = measured_result(self)
        return self._result


def measured_result(meas):
    """The Result of a finished MeasuredCuda block (measured)."""
    from memprof.backends.base import MEASURED
    from memprof.results import Result
    from memprof.budget import CONTEXT_ESTIMATE_BYTES, parse_budget
    from memprof.results import environment, make_record
    from memprof.script.record import record_spec

    peak = max(meas.allocated.values()) if meas.allocated else 0
    name = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    info = meas._param_info.values()
    metrics = {
        "peak_allocated_bytes": peak,
        "peak_reserved_bytes": max(meas.reserved.values()) if meas.reserved else 0,
        "peak_phase": max(meas.allocated, key=meas.allocated.get) if meas.allocated else None,
        "phase_peak_allocated_bytes": {p: meas.allocated.get(p, 0) for p in PHASES},
        "phase_peak_reserved_bytes": {p: meas.reserved.get(p, 0) for p in PHASES},
        "params_total": sum(n for _, n, _, _ in info),
        "params_trainable": sum(n for _, n, rg, _ in info if rg),
        "params_frozen": sum(n for _, n, rg, _ in info if not rg),
        "optimizer_state_bytes": sum(meas._state_bytes.values()),
        "budget_device": name,
        "budget_bytes": total,
        "baseline_allocated_bytes": meas._base,
        "script_batch_size": meas.detected["batch_size"],
        "script_precision": meas.precision(),
        "script_autocast_dtypes": [str(t).removeprefix("torch.") for t in meas.detected["autocast_dtypes"]],
        "script_parameter_dtypes": [t.removeprefix("torch.") for t in meas.param_dtypes()],
        "script_grad_scaler": meas.detected["grad_scaler"],
        "script_checkpointing": meas.detected["checkpointing"],
        "script_optimizers": meas.detected["optimizers"],
        "script_optimizer_in_backward": meas.detected["optimizer_in_backward"],
        "script_steps": meas.detected["steps"],
        "script_steps_limit": meas.max_steps,
        "notes": list(meas.notes.values()),
    }
    if getattr(meas, "script_args", None) is not None:
        metrics.update(script_args=meas.script_args, script_path=meas.user_file)
    status = "ok"
    if meas._oom is not None:
        status = "oom"
        metrics["oom"] = {"phase": meas._end_phase, "message": str(meas._oom).splitlines()[0][:300]}
    budget = meas.budget
    if budget is not None:
        card = parse_budget(budget)
        if card.total_bytes < total * 0.97:
            metrics["notes"].append(f"--budget {budget} is smaller than this {name}: not emulated here; fits is judged "
                                    f"from the measured reserved peak plus a {CONTEXT_ESTIMATE_BYTES >> 20} MiB context "
                                    f"estimate")
        metrics["fits"] = "yes" if metrics["peak_reserved_bytes"] + card.context_bytes <= card.total_bytes else "no"
    env = environment("cuda", name)
    spec_holder = meas
    if budget is None:
        meas.budget = "device"
    try:
        spec = record_spec(spec_holder)
    finally:
        meas.budget = budget
    return Result(make_record(spec, status, MEASURED, env, metrics, elapsed_s=time.perf_counter() - meas._start))
