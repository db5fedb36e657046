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
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.harness import prepare, train_steps
from memprof.optims import build_optimizer
from memprof.spec import RunSpec
from memprof.tracker import ALLOC, FREE, PHASE, StorageTracker

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "workspace")


@dataclass
class Trace:
    events: list
    category: dict  # storage id -> one of CATEGORIES
    origin: dict  # storage id -> op that made it
    params_total: int
    params_trainable: int
    frozen: list
    state_bytes: int  # exact bytes of the optimizer's device state tensors
    step_ms: list = field(default_factory=list)  # wall time of each step after the first (real runs)
    rules: list = field(default_factory=list)


def to_device_order(module):
    """Parameters and buffers in the order `Module.to(device)` copies them (Module._apply: children first)."""
    for child in module.children():
        yield from to_device_order(child)
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


def trace(spec: RunSpec, rules=(), fake: bool = True, limit_bytes: int | None = None) -> Trace:
    """Run the harness under a StorageTracker: on fake CPU tensors (`fake`) or real ones.

    `limit_bytes` makes the tracker raise torch.OutOfMemoryError once live tensor bytes would exceed it
    (the `cpu` backend's budget). Garbage collection is off while tracing, so releases follow reference
    counts alone and the stream is the same on every run.
    """
    modes = [r.mode() for r in rules if hasattr(r, "mode")]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with FakeTensorMode() if fake else contextlib.nullcontext(), contextlib.ExitStack() as stack:
            prepared = prepare(spec, load_weights=not fake)
            model = prepared.model
            tracker = StorageTracker(rules, limit_bytes=limit_bytes)
            params, grads, states, starts = set(), set(), set(), []
            stack.enter_context(tracker)
            for mode in modes:
                stack.enter_context(mode)
            for t in to_device_order(model):
                params.add(tracker.register(t, "Module.to (parameters and buffers)"))
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_optimizer(prepared.optim_info, trainable)

            def on_phase(phase, step):
                if phase == "optimizer":
                    grads.update(tracker.storage_id(p.grad) for p in trainable if p.grad is not None)
                if phase in ("forward", "done"):
                    starts.append(time.perf_counter())
                tracker.set_phase(phase, step)

            try:
                train_steps(model, optimizer, spec, "cpu", on_phase)
            except torch.OutOfMemoryError as oom:
                oom.phase, oom.step = tracker.phase, tracker.step
                raise
            events = list(tracker.events)
            state_tensors = [t for s in optimizer.state.values() for t in s.values()
                             if isinstance(t, torch.Tensor) and tracker.storage_id(t) is not None]
            states.update(tracker.storage_id(t) for t in state_tensors)
            result = Trace(events, {}, dict(tracker.origin),
                           params_total=sum(p.numel() for p in model.parameters()),
                           params_trainable=sum(p.numel() for p in trainable), frozen=prepared.frozen,
                           state_bytes=sum(t.untyped_storage().nbytes() for t in state_tensors),
                           step_ms=[1000 * (b - a) for a, b in zip(starts[1:], starts[2:])],
                           rules=[r.describe() for r in rules])
            del model, optimizer, trainable, prepared, state_tensors
    finally:
        if was_enabled:
            gc.enable()
    result.category = _categorize(events, params, grads, states, result.origin)
    return result


def _categorize(events, params, grads, states, origin) -> dict:
    """Each storage's role; saved activations are forward allocations still alive when backward starts."""
    category, live_forward, phase = {}, set(), "setup"
    for ev in events:
        if ev[0] == PHASE:
            if phase == "forward" and ev[1] == "backward":
                for sid in live_forward:
                    category.setdefault(sid, "activations")
            if ev[1] == "forward":
                live_forward = set()
            phase = ev[1]
        elif ev[0] == ALLOC:
            sid = ev[1]
            if sid in params:
                category[sid] = "parameters"
            elif sid in grads:
                category[sid] = "gradients"
            elif sid in states:
                category[sid] = "optimizer_state"
            elif origin[sid].startswith("cuBLAS"):
                category[sid] = "workspace"
            elif phase == "forward":
                live_forward.add(sid)
        elif ev[0] == FREE:
            live_forward.discard(ev[1])
    return {sid: category.get(sid, "temporaries") for sid in origin}


def phase_at(events, index: int) -> tuple[str, int]:
    for ev in reversed(events[: index + 1]):
        if ev[0] == PHASE:
            return ev[1], ev[2]
    return "setup", 0


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
        if ev[0] == ALLOC:
            sizes[ev[1]] = ev[2]
            live += ev[2]
            if live > peak:
                peak, peak_index = live, i
            phase_peaks[phase] = max(phase_peaks[phase], live)
        elif ev[0] == FREE:
            live -= sizes.pop(ev[1])
        else:
            phase = ev[1]
    breakdown = dict.fromkeys(CATEGORIES, 0)
    alive = {}
    for ev in t.events[: peak_index + 1]:
        if ev[0] == ALLOC:
            alive[ev[1]] = ev[2]
        elif ev[0] == FREE:
            alive.pop(ev[1])
    for sid, nbytes in alive.items():
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
        "optimizer_state_bytes": t.state_bytes,
        "alloc_requests": sum(1 for ev in t.events if ev[0] == ALLOC),
    }


def median_ms(samples: list) -> float | None:
    return round(statistics.median(samples), 3) if samples else None
