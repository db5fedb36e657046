"""Backend `simulate`: predict what torch.cuda would report for a spec, on a machine with no GPU.

How: the harness runs on fake CPU tensors (FakeTensorMode: shapes, strides and autograd, no data, no
memory; fake CUDA tensors cannot run backward without a GPU). A StorageTracker logs every storage's
allocation and release, the CUDA rules (memprof.rules) add or change what CUDA does differently, and the
resulting request stream is replayed through the caching-allocator model twice: without a limit, for the
peaks torch.cuda reports on a card with room (max_memory_allocated / max_memory_reserved), and with the
budget card's usable memory, for the out-of-memory verdict. The model moves to the device in
`Module.to` order. Every figure this module produces is a prediction.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.allocator import CachingAllocatorModel, SimulatedOOM
from memprof.budget import DeviceProfile, parse_budget
from memprof.harness import prepare, train_steps
from memprof.optims import build_optimizer
from memprof.rules import MemEfficientAttention, cuda_rules
from memprof.spec import RunSpec
from memprof.tracker import ALLOC, FREE, StorageTracker

PHASE = 2  # event kind: (PHASE, name, step)
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "workspace")


@dataclass
class Trace:
    """The request stream of one simulated run and what each storage was."""

    events: list
    category: dict  # storage id -> one of CATEGORIES
    origin: dict  # storage id -> op that made it
    params_total: int
    params_trainable: int
    frozen: list
    state_bytes: int  # exact bytes of the optimizer's device state tensors
    rules: list = field(default_factory=list)


def trace(spec: RunSpec, device: DeviceProfile) -> Trace:
    """Run the harness on fake tensors and log every storage's life."""
    rules = cuda_rules(device)
    attention = next(r for r in rules if isinstance(r, MemEfficientAttention))
    was_enabled = gc.isenabled()
    gc.disable()  # releases then follow reference counts alone: the same order every run
    try:
        with FakeTensorMode():
            prepared = prepare(spec, load_weights=False)
            model = prepared.model
            tracker = StorageTracker(rules)
            params, grads, states = set(), set(), set()
            with tracker, attention.mode():
                for t in to_device_order(model):
                    params.add(tracker.register(t, "Module.to (parameters and buffers)"))
                trainable = [p for p in model.parameters() if p.requires_grad]
                optimizer = build_optimizer(prepared.optim_info, trainable)

                def on_phase(phase, step):
                    if phase == "optimizer":
                        grads.update(tracker.storage_id(p.grad) for p in trainable if p.grad is not None)
                    tracker.events.append((PHASE, phase, step))
                    tracker.set_phase(phase, step)

                tracker.events.append((PHASE, "setup", 0))
                train_steps(model, optimizer, spec, "cpu", on_phase)
                events = list(tracker.events)
                state_tensors = [t for s in optimizer.state.values() for t in s.values()
                                 if isinstance(t, torch.Tensor) and tracker.storage_id(t) is not None]
                states.update(tracker.storage_id(t) for t in state_tensors)
                state_bytes = sum(t.untyped_storage().nbytes() for t in state_tensors)
            info = Trace(events, {}, dict(tracker.origin),
                         params_total=sum(p.numel() for p in model.parameters()),
                         params_trainable=sum(p.numel() for p in trainable), frozen=prepared.frozen,
                         state_bytes=state_bytes, rules=[r.describe() for r in rules])
            del model, optimizer, trainable, prepared, state_tensors
    finally:
        if was_enabled:
            gc.enable()
    info.category = _categorize(events, params, grads, states, info.origin)
    return info


def to_device_order(module):
    """Parameters and buffers in the order `Module.to(device)` copies them (Module._apply: children first)."""
    for child in module.children():
        yield from to_device_order(child)
    yield from (p for p in module._parameters.values() if p is not None)
    yield from (b for b in module._buffers.values() if b is not None)


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


@dataclass
class Replay:
    peak_allocated: int
    peak_reserved: int
    peak_index: int
    phase_peaks: dict
    allocator: CachingAllocatorModel


def replay(events, capacity: int | None = None, stop_at: int | None = None) -> Replay:
    """Feed the request stream to the allocator model; `stop_at` ends right after that event."""
    alloc = CachingAllocatorModel(capacity)
    phase, peak, peak_index, phase_peaks = "setup", 0, -1, defaultdict(int)
    for i, ev in enumerate(events):
        kind = ev[0]
        if kind == ALLOC:
            try:
                alloc.malloc(ev[1], ev[2])
            except SimulatedOOM as oom:
                oom.index = i
                raise
            if alloc.allocated > peak:
                peak, peak_index = alloc.allocated, i
            if alloc.allocated > phase_peaks[phase]:
                phase_peaks[phase] = alloc.allocated
        elif kind == FREE:
            alloc.free(ev[1])
        else:
            phase = ev[1]
        if i == stop_at:
            break
    return Replay(peak, alloc.peak_reserved, peak_index, dict(phase_peaks), alloc)


def _phase_at(events, index: int) -> tuple[str, int]:
    for ev in reversed(events[: index + 1]):
        if ev[0] == PHASE:
            return ev[1], ev[2]
    return "setup", 0


def predict(spec: RunSpec) -> tuple[str, dict]:
    """(status, metrics) for `spec`: status is "ok" or "oom" (does not fit the budget card)."""
    device = parse_budget(spec.budget)
    t = trace(spec, device)
    full = replay(t.events)
    at_peak = replay(t.events, stop_at=full.peak_index).allocator
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for sid, block in at_peak._blocks.items():
        breakdown[t.category[sid]] += block.size
    peak_ev = t.events[full.peak_index]
    phase, step = _phase_at(t.events, full.peak_index)
    metrics = {
        "peak_allocated_bytes": full.peak_allocated,
        "peak_reserved_bytes": full.peak_reserved,
        "peak_phase": phase,
        "peak_step": step,
        "peak_op": peak_ev[4],
        "breakdown_at_peak_bytes": breakdown,
        "phase_peak_allocated_bytes": {p: full.phase_peaks.get(p, 0) for p in ("forward", "backward", "optimizer")},
        "params_total": t.params_total,
        "params_trainable": t.params_trainable,
        "params_frozen": t.params_total - t.params_trainable,
        "frozen_parameter_names": t.frozen,
        "optimizer_state_bytes": t.state_bytes,
        "alloc_requests": sum(1 for ev in t.events if ev[0] == ALLOC),
        "budget_device": device.label,
        "budget_bytes": device.total_bytes,
        "context_bytes_estimate": device.context_bytes,
        "predicted_device_bytes": full.peak_reserved + device.context_bytes,
        "over_budget_bytes": max(0, full.peak_reserved + device.context_bytes - device.total_bytes),
        "rules": [r["name"] for r in t.rules],
    }
    try:
        replay(t.events, capacity=device.usable_bytes)
    except SimulatedOOM as oom:
        oom_phase, oom_step = _phase_at(t.events, oom.index)
        metrics["oom"] = {"phase": oom_phase, "step": oom_step, "op": t.events[oom.index][4],
                          "requested_bytes": oom.requested, "allocated_bytes": oom.allocated,
                          "reserved_bytes": oom.reserved, "usable_bytes": oom.capacity}
        return "oom", metrics
    return "ok", metrics

