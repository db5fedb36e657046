"""Backend `simulate`: predict what torch.cuda would report for a spec, on a machine with no GPU.

How: the harness runs on fake CPU tensors (FakeTensorMode: shapes, strides and autograd, no data, no
memory; fake CUDA tensors cannot run backward without a GPU). A StorageTracker logs every storage's
allocation and release, the CUDA rules (memprof.rules) add or change what CUDA does differently, and the
resulting request stream is replayed through the caching-allocator model twice: without a limit, for the
peaks torch.cuda reports on a card with room (max_memory_allocated / max_memory_reserved), and with the
budget card's usable memory, for the out-of-memory verdict. The model moves to the device in
`Module.to` order. Every figure this module produces is a prediction.

Allocations that nothing here models (a kernel's own scratch, e.g. cuDNN's convolution workspace) are listed
in `unmodelled` with a bound each; `peak_allocated_bytes_upper` adds them to the peak, and `fits` reads
"may not fit" when the predicted status is "ok" but the band reaches past the budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memprof.allocator import CachingAllocatorModel, SimulatedOOM, round_size, segment_size
from memprof.budget import parse_budget
from memprof.rules import cuda_rules
from memprof.spec import RunSpec
from memprof.tracing import CATEGORIES, Trace, common_metrics, live_peak, phase_at, trace
from memprof.tracker import ALLOC, FREE


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


def predict(spec: RunSpec) -> tuple[str, dict]:
    """(status, metrics) for `spec` on a CUDA device: status is "ok" or "oom" (does not fit the budget card)."""
    return predict_traced(lambda rules: trace(spec, rules), spec.budget)


def predict_traced(make_trace, budget: str) -> tuple[str, dict]:
    """(status, metrics) of any traced run on the `budget` card: `make_trace(rules)` traces it (on fake
    tensors) with the CUDA rules; the stream is replayed through the allocator model. Registry models
    (predict) and a user's own step (memprof.api.predict_step) both come through here."""
    device = parse_budget(budget)
    rules = cuda_rules(device)
    t = make_trace(rules)
    folded = 0
    for rule in rules:
        if hasattr(rule, "rewrite"):  # rules that change the stream once it is complete
            t.events = rule.rewrite(t.events)
            folded += rule.folded
    full = replay(t.events)
    at_peak = replay(t.events, stop_at=full.peak_index).allocator
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for sid, block in at_peak._blocks.items():
        breakdown[t.category[sid]] += block.size
    phase, step = phase_at(t.events, full.peak_index)
    metrics = {
        "peak_allocated_bytes": full.peak_allocated,
        "peak_reserved_bytes": full.peak_reserved,
        "peak_live_bytes": live_peak(t).peak_bytes,
        "peak_phase": phase,
        "peak_step": step,
        "peak_op": t.events[full.peak_index][4],
        "breakdown_at_peak_bytes": breakdown,
        "phase_peak_allocated_bytes": {p: full.phase_peaks.get(p, 0) for p in ("forward", "backward", "optimizer")},
        **common_metrics(t),
        "budget_device": device.label,
        "budget_bytes": device.total_bytes,
        "context_bytes_estimate": device.context_bytes,
        "nvml_process_peak_bytes": full.peak_reserved + device.context_bytes,
        "over_budget_bytes": max(0, full.peak_reserved + device.context_bytes - device.total_bytes),
        "rules": [r["name"] for r in t.rules],
        "in_place_accumulations": folded,
    }
    metrics.update(band(metrics, device))
    try:
        replay(t.events, capacity=device.usable_bytes)
    except SimulatedOOM as oom:
        oom_phase, oom_step = phase_at(t.events, oom.index)
        metrics["oom"] = {"phase": oom_phase, "step": oom_step, "op": t.events[oom.index][4],
                          "requested_bytes": oom.requested, "allocated_bytes": oom.allocated,
                          "reserved_bytes": oom.reserved, "usable_bytes": oom.capacity}
        metrics["fits"] = "no"
        return "oom", metrics
    return "ok", metrics


def band(metrics: dict, device) -> dict:
    """The prediction's upper band: every unmodelled allocation at its bound, all at the peak at once.

    Allocated: the bounds rounded as the allocator rounds a request. Reserved: each bound as a new segment
    (the worst case: no cached block serves it). `fits` is "yes" when even the upper reserved figure plus the
    context fits the card, else "may not fit" (the caller sets "no" when the prediction itself runs out).
    """
    items = metrics.get("unmodelled", [])
    extra_alloc = sum(round_size(i["bound_bytes"]) for i in items if i["bound_bytes"])
    extra_reserved = sum(segment_size(round_size(i["bound_bytes"])) for i in items if i["bound_bytes"])
    upper_reserved = metrics["peak_reserved_bytes"] + extra_reserved
    return {"unmodelled": items,
            "peak_allocated_bytes_upper": metrics["peak_allocated_bytes"] + extra_alloc,
            "peak_reserved_bytes_upper": upper_reserved,
            "fits": "yes" if upper_reserved + device.context_bytes <= device.total_bytes else "may not fit"}


HOST_SCALARS_NOTE = ("optimizer step counters (torch.tensor(0.0) per parameter, 4 B each) are host memory on CUDA and "
                     "absent from every prediction, but a CPU allocator counter counts them: compare the cpu backend "
                     "with a prediction or a GPU measurement only after allowing for them")


def predict_cpu(spec: RunSpec) -> tuple[Trace, dict]:
    """The prediction under CPU rules (no CUDA corrections, no allocator): peak live tensor bytes. The
    `cpu` backend measures the same quantity on real tensors; on a small model the two agree exactly."""
    return cpu_rules_metrics(trace(spec, rules=()))


def cpu_rules_metrics(t: Trace) -> tuple[Trace, dict]:
    """Peak live tensor bytes of a trace with no CUDA rules, with its phase peaks and breakdown."""
    peak = live_peak(t)
    return t, {"peak_live_bytes": peak.peak_bytes, "phase_peak_live_bytes": peak.phase_peaks,
               "breakdown_at_peak_bytes": peak.breakdown, **common_metrics(t), "host_scalars_note": HOST_SCALARS_NOTE}
