"""One traced run of the harness: every storage's life as an event stream, and what each storage was.

Used by the simulation (fake tensors: no data, no memory) and by the `cpu` backend (real tensors), with
the same tracker, so a CPU measurement and a prediction under CPU rules see the very same stream.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          FakeTensorMode, unset_fake_temporarily)

from memprof.simulation import distributed
from memprof.simulation.distributed import local
from memprof.simulation.fake_compat import fake_storage, register_meta_kernels
from memprof.adapters import parameter_split
from memprof.harness import apply_precision, prepare, train_steps
from memprof.models import resolve_model
from memprof.simulation.attribution import ModuleAttribution
from memprof.optims import build_optimizer
from memprof.spec import RunSpec
from memprof.simulation.events import ALLOC, FREE, PHASE, allocation_count, live_after
from memprof.simulation.tracker import StorageTracker

from memprof.simulation import CATEGORIES  # noqa: E402 (re-exported: the categories every trace uses)


@dataclass
class Trace:
    events: list
    category: dict  # storage id -> one of CATEGORIES
    origin: dict  # storage id -> op that made it
    params_total: int
    params_trainable: int
    frozen: list
    state: dict  # memprof.simulation.tracing.state_summary of the optimizer after the last step
    step_ms: list = field(default_factory=list)  # wall time of each step after the first (real runs)
    rules: list = field(default_factory=list)
    module: dict = field(default_factory=dict)  # storage id -> module path ("" outside modules)
    extra: dict = field(default_factory=dict)  # metrics the rules add
    stream: dict = field(default_factory=dict)  # storage id -> its stream, for those off the default one (FSDP)


def to_device_order(module):
    """Parameters and buffers in the order `Module.to(device)` copies them (Module._apply: children first)."""
    for child in module.children():
        yield from to_device_order(child)
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


def trace(spec: RunSpec, rules=(), fake: bool = True, limit_bytes: int | None = None, front=None) -> Trace:
    """Run the harness for `spec` under a StorageTracker: on fake CPU tensors (`fake`) or real ones.

    `limit_bytes` makes the tracker raise torch.OutOfMemoryError once live tensor bytes would exceed it
    (the `cpu` backend's budget); `front` serves the tracker's fake dispatch (StorageTracker). The run is
    `trace_step` with the harness's model, optimizer and step (the
    shortcut that shares a forward between optimizers, memprof.simulation.shared, sits above this: it is
    memprof.simulation.simulate.prediction that takes it).
    """
    if fake:
        resolve_model(spec.model, True, spec.freeze, spec.input_shape)  # a name the simulation cannot predict says why

    def build():
        prepared = prepare(spec, load_weights=not fake)

        def make_optimizer(trainable):
            return build_optimizer(prepared.optim_info, trainable, spec.state_bits, spec.paged, spec.optim_impl,
                                   spec.optim_in_backward)

        return prepared.model, make_optimizer, prepared.frozen

    def run(model, optimizer, on_phase):
        train_steps(model, optimizer, spec, "cpu", on_phase)

    def prepare_model(model):
        apply_precision(model, spec)
        if spec.parallel == "fsdp":
            distributed.shard(model, spec)

    return trace_step(build, run, (*rules, *distributed.parallel_rules(spec)), fake, limit_bytes, prepare_model,
                      distributed.process_group(spec),
                      distributed.sharded_bytes if spec.parallel != "none" else None, front)


@contextlib.contextmanager
def no_gc():
    """Garbage collection off: releases follow reference counts alone, so the stream is the same every run."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class UntraceableModel(RuntimeError):
    """The model needs tensor data (`.item()`, a data-dependent shape), which fake tensors do not have."""


def _untraceable(exc: Exception, model) -> UntraceableModel:
    """One line naming the op and the module whose forward asked for data."""
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
    module, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = f"{names[id(owner)]} ({type(owner).__name__})"
        tb = tb.tb_next
    op = getattr(exc, "func", None) or type(exc).__name__
    return UntraceableModel(f"{op} in module {module or '(outside any module)'} needs tensor data, which the "
                            f"simulation's fake tensors do not have: use --backend cpu (measures on the CPU) or cuda")


def trace_step(build, run, rules=(), fake: bool = True, limit_bytes: int | None = None,
               prepare_model=None, context=None, rank_bytes=None, front=None) -> Trace:
    """Trace `steps` training steps of any model and step function under a StorageTracker.

    `build()` returns (model, optimizer, frozen names); the optimizer may be a callable taking the trainable
    parameters (built outside the tracker). `run(model, optimizer, on_phase)` runs the steps, calling
    on_phase(name, step) as forward / backward / optimizer begin (harness.run_steps does);
    `prepare_model(model)` runs once the model has its storage, before the optimizer is built (precision,
    FSDP sharding); `context` is entered around the run (a fake process group); `rank_bytes(model, trainable,
    optimizer)` adds per-rank figures at each optimizer step (DDP / FSDP). With `fake`, build() runs on the meta device outside the fake mode (constructors keep
    their host values), the model gets fake CPU storage and an optimizer built on the meta parameters is
    pointed at the fake ones. Garbage collection is off while tracing, so releases follow reference counts
    alone and the stream is the same on every run.
    """
    modes = [r.mode() for r in rules if hasattr(r, "mode")]
    register_meta_kernels()
    with no_gc():
        if fake:  # constructors run outside the fake mode, on the meta device (memprof.simulation.fake_compat)
            with torch.device("meta"):
                model, optimizer, frozen = build()
        with context or contextlib.nullcontext(), FakeTensorMode() if fake else contextlib.nullcontext(), \
                contextlib.ExitStack() as stack:
            if fake:
                before = {id(p): n for n, p in model.named_parameters()}
                fake_storage(model)
                after = dict(model.named_parameters())
                if isinstance(optimizer, torch.optim.Optimizer):
                    for group in optimizer.param_groups:
                        group["params"] = [after[before[id(p)]] if id(p) in before else p for p in group["params"]]
            else:
                model, optimizer, frozen = build()
            if prepare_model is not None:
                prepare_model(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not isinstance(optimizer, torch.optim.Optimizer):
                # built outside the fake mode and the tracker: constructors allocate no device memory, and
                # bitsandbytes computes its quantization maps on the host here
                with unset_fake_temporarily():
                    optimizer = optimizer(trainable)
            groups = getattr(optimizer, "param_groups", None)  # optims.InBackward has none: it has them all
            if groups:
                ids = {id(p) for g in groups for p in g["params"]}
                trainable = [p for p in trainable if id(p) in ids] or trainable
            tracker = StorageTracker(rules, limit_bytes=limit_bytes, front=front)
            builder, starts, rank = TraceBuilder(tracker), [], {}
            stack.enter_context(tracker)
            for mode in modes:
                stack.enter_context(mode)
            for t in to_device_order(model):
                builder.params.add(tracker.register(local(t), "Module.to (parameters and buffers)"))
            for rule in rules:
                rule.attach(tracker, optimizer)
            if hasattr(optimizer, "on_grad"):  # in backward: gradients live and die there; record them as they come
                optimizer.on_grad = lambda p: builder.own(builder.grads, (p.grad,))
            attribution = stack.enter_context(ModuleAttribution(model, tracker, optimizer))

            held = [model, optimizer]  # for rank_bytes; cleared with the names below (ruff F821 on a closure's del)
            timed = [None]  # the step whose start was taken (a step's later micro-steps are part of it)

            def on_phase(phase, step):
                if phase == "optimizer":
                    builder.own(builder.grads, (p.grad for p in trainable if p.grad is not None))
                    if rank_bytes is not None:  # DDP / FSDP: what this rank holds of each
                        rank.update(rank_bytes(held[0], trainable, held[1]))
                if phase == "forward":  # gradients alive into a forward (accumulating, or kept past the step)
                    builder.own(builder.grads, (p.grad for p in trainable if p.grad is not None))
                if phase == "done" or (phase == "forward" and step != timed[0]):
                    timed[0] = step
                    starts.append(time.perf_counter())
                tracker.set_phase(phase, step)

            try:
                run(model, optimizer, on_phase)
            except torch.OutOfMemoryError as oom:
                oom.phase, oom.step = tracker.phase, tracker.step
                raise
            except (DataDependentOutputException, DynamicOutputShapeException) as exc:
                raise _untraceable(exc, model) from None
            builder.own_states(optimizer)
            builder.record_model(model, trainable)
            result = builder.trace(list(tracker.events), rules, attribution.result(),
                                   [1000 * (b - a) for a, b in zip(starts[1:], starts[2:])], rank, frozen)
            held.clear()
            del model, optimizer, run  # (trainable stays: on_phase closes over it)
    return result


class TraceBuilder:
    """What a trace says besides its events, filled while it runs: which storages hold parameters (and buffers),
    gradients and optimizer state, the model's parameters as its forward or the harness finds them, and each
    optimizer's state. The engine's trace_step and the simulated device (memprof.script.device) both fill one and
    make their Trace with it."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.params, self.grads, self.states = set(), set(), set()
        self.param_info: dict = {}  # id(parameter) -> (name, numel held here, element size, trains, dtype)
        self.state_summaries: dict = {}  # id(optimizer) -> state_summary

    def own(self, kind: set, tensors) -> None:
        """Storage ids of `tensors` (the shards this rank holds, for FSDP's) into `kind` (params/grads/states)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                sid = self.tracker.storage_id(local(t))
                if sid is not None:
                    kind.add(sid)

    def own_states(self, optimizer) -> None:
        self.own(self.states, (t for s in optimizer.state.values() for t in s.values()))
        self.state_summaries[id(optimizer)] = state_summary(optimizer)

    def record_model(self, model, trainable=None) -> None:
        """The model's parameters (name, the numel this rank holds, element size, whether it trains: in `trainable`
        when given, else requires_grad, dtype), each once, as first seen."""
        ids = None if trainable is None else {id(p) for p in trainable}
        for name, p in model.named_parameters():
            if id(p) not in self.param_info:
                trains = p.requires_grad if ids is None else id(p) in ids
                self.param_info[id(p)] = (name, p.numel(), local(p).numel(), p.element_size(), trains, str(p.dtype))

    def trace(self, events, rules, module: dict, step_ms=(), extra: dict | None = None, frozen=None) -> Trace:
        """The Trace of `events`; `frozen`: the frozen parameters' names as the caller lists them (else those that
        do not train, sorted)."""
        tracker = self.tracker
        info = self.param_info.values()
        state: dict = {"optimizer_state_bytes": 0}
        for summary in self.state_summaries.values():
            for k, v in summary.items():
                state[k] = state.get(k, 0) + v
        weights = sum(held * size for _, _, held, size, _, _ in info)
        grads = sum(held * size for _, _, held, size, trains, _ in info if trains)
        return Trace(events, _categorize(events, self.params, self.grads, self.states, tracker.origin),
                     dict(tracker.origin), params_total=sum(n for _, n, *_ in info),
                     params_trainable=sum(n for _, n, _, _, trains, _ in info if trains),
                     frozen=list(frozen) if frozen is not None else
                     sorted(name for name, _, _, _, trains, _ in info if not trains), state=state,
                     step_ms=list(step_ms), rules=[r.describe() for r in rules], module=module,
                     extra={**common_rule_metrics(rules), "floor_bytes": weights + grads + state["optimizer_state_bytes"],
                            **parameter_split((n, held, size, trains) for n, _, held, size, trains, _ in info),
                            **(extra or {})},
                     stream=dict(tracker.stream))


def common_rule_metrics(rules) -> dict:
    """The figures every rule adds (Rule.metrics), in rule order; the `unmodelled` and `notes` lists of several
    rules joined."""
    out: dict = {}
    for r in rules:
        for k, v in r.metrics().items():
            out[k] = out.get(k, []) + v if k in ("unmodelled", "notes") else v
    return out


def floor(model, trainable, optimizer) -> dict:
    """The least memory any implementation of this training step could need: every weight (frozen ones stay
    resident too), one gradient per trainable parameter and the optimizer's state, each in the dtype this run
    keeps it in (bytes of the tensors themselves, no allocator rounding)."""
    weights = sum(local(p).numel() * p.element_size() for p in model.parameters())
    grads = sum(local(p).numel() * p.element_size() for p in trainable)
    return {"floor_bytes": weights + grads + state_summary(optimizer)["optimizer_state_bytes"]}


def peak_to_floor(peak_bytes: int | None, floor_bytes: int | None) -> float | None:
    return round(peak_bytes / floor_bytes, 4) if peak_bytes and floor_bytes else None


def state_summary(optimizer) -> dict:
    """What the optimizer's state holds, read from the state tensors themselves: bytes of every distinct
    storage (shared ones, e.g. bitsandbytes' quantization maps, once), without the host-side step counters;
    for bitsandbytes, how many parameters kept fp32 states (under min_8bit_size) and how many are 8-bit."""
    seen, nbytes, fp32_kept, quantized = set(), 0, 0, 0
    for st in optimizer.state.values():
        if "state1" in st:
            if st["state1"].dtype == torch.uint8:
                quantized += 1
            else:
                fp32_kept += 1
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and key != "step":
                storage = local(t).untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    nbytes += storage.nbytes()
    out = {"optimizer_state_bytes": nbytes}
    if fp32_kept or quantized:
        out.update(state_params_fp32_kept=fp32_kept, state_params_8bit=quantized)
    return out


def _categorize(events, params, grads, states, origin) -> dict:
    """Each storage's role; saved activations are forward allocations still alive when backward starts."""
    category, live_forward, phase = {}, set(), "setup"
    for ev in events:
        if ev.kind is PHASE:
            if phase == "forward" and ev.name == "backward":
                for sid in live_forward:
                    category.setdefault(sid, "activations")
            if ev.name == "forward":
                live_forward = set()
            phase = ev.name
        elif ev.kind is ALLOC:
            sid = ev.sid
            if sid in params:
                category[sid] = "parameters"
            elif sid in grads:
                category[sid] = "gradients"
            elif sid in states:
                category[sid] = "optimizer_state"
            elif origin[sid].startswith(distributed.UNSHARDED):
                category[sid] = "parameters"
            elif origin[sid].startswith(distributed.COMMUNICATION):
                category[sid] = "communication"
            elif origin[sid].startswith("cuBLAS"):
                category[sid] = "workspace"
            elif phase == "forward":
                live_forward.add(sid)
        elif ev.kind is FREE:
            live_forward.discard(ev.sid)
    return {sid: category.get(sid, "temporaries") for sid in origin}


@dataclass
class LivePeak:
    peak_bytes: int
    peak_index: int
    phase_peaks: dict
    breakdown: dict


def live_peak(t: Trace) -> LivePeak:
    """Peak of the sum of live storage bytes (no allocator rounding), per phase, and its breakdown."""
    sizes, live, peak, peak_index, phase = {}, 0, 0, -1, "setup"
    phase_peaks = defaultdict(int)
    for i, ev in enumerate(t.events):
        if ev.kind is ALLOC:
            sizes[ev.sid] = ev.nbytes
            live += ev.nbytes
            if live > peak:
                peak, peak_index = live, i
            phase_peaks[phase] = max(phase_peaks[phase], live)
        elif ev.kind is FREE:
            live -= sizes.pop(ev.sid)
        else:
            phase = ev.name
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for sid, nbytes in live_after(t.events, peak_index).items():
        breakdown[t.category[sid]] += nbytes
    return LivePeak(peak, peak_index, {p: phase_peaks.get(p, 0) for p in ("forward", "backward", "optimizer")},
                    breakdown)


def common_metrics(t: Trace) -> dict:
    """What every traced run reports besides its peaks."""
    return {
        "params_total": t.params_total,
        "params_trainable": t.params_trainable,
        "params_frozen": t.params_total - t.params_trainable,
        "frozen_parameter_names": t.frozen,
        **t.state,
        "state_bytes_per_trainable_param": round(t.state["optimizer_state_bytes"] / t.params_trainable, 4)
        if t.params_trainable else None,
        "alloc_requests": allocation_count(t.events),
        **t.extra,
    }


def median_ms(samples: list) -> float | None:
    return round(statistics.median(samples), 3) if samples else None
