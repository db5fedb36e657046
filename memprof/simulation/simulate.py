"""Backend `simulate`: predict what torch.cuda would report for a spec, on a machine with no GPU.

How: the harness runs on fake CPU tensors (FakeTensorMode: shapes, strides and autograd, no data, no
memory; fake CUDA tensors cannot run backward without a GPU). A StorageTracker logs every storage's
allocation and release, the CUDA rules (memprof.simulation.rules) add or change what CUDA does differently, and the
resulting request stream is replayed through the caching-allocator model: without a limit, for the
peaks torch.cuda reports on a card with room (max_memory_allocated / max_memory_reserved), and, where that
replay reserves more than the budget card's usable memory, with that limit, for the out-of-memory verdict
(below the limit the two replays are the same). The model moves to the device in
`Module.to` order. Every figure this module produces is a prediction.

Allocations that nothing here models (a kernel's own scratch, e.g. cuDNN's convolution workspace) are listed
in `unmodelled` with a bound each; `peak_allocated_bytes_upper` adds them to the peak, and `fits` reads
"may not fit" when the predicted status is "ok" but the band reaches past the budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memprof.simulation.allocator import CachingAllocatorModel, SimulatedOOM, round_size, segment_size
from memprof.simulation.replay import Replay, replay  # noqa: F401 (Replay: callers read it from here)
from memprof.budget import parse_budget
from memprof.models import resolve_model
from memprof.simulation.rules import FakeGradScalerStep, LayerNormStatsFp32, cuda_rules
from memprof.spec import RunSpec
from memprof.simulation.events import ALLOC, allocation_phases, live_after, phase_at
from memprof.simulation.tracing import CATEGORIES, Trace, common_metrics, live_peak, peak_to_floor, trace


def blocks_at(events, index: int, block_bytes: dict) -> dict:
    """Request id -> block bytes of every request allocated right after event `index` (what the allocator
    holds then: a block's size does not change while it is allocated)."""
    return {sid: block_bytes[sid] for sid in live_after(events, index)}


@dataclass
class Prediction:
    """One prediction: its status ("ok", or "oom" on the budget card) and metrics, and what they came from: the
    traced stream, the unlimited replay (its allocator's history kept when asked), the budget card's replay
    (its allocator, when it ran: over the card's usable memory, or asked for), where it ran out, the card."""
    status: str
    metrics: dict
    trace: Trace
    full: Replay
    capped: CachingAllocatorModel | None
    oom_index: int | None
    device: object  # memprof.budget.DeviceProfile


def predict(spec: RunSpec) -> tuple[str, dict]:
    """(status, metrics) for `spec` on a CUDA device: status is "ok" or "oom" (does not fit the budget card)."""
    p = prediction(spec)
    return p.status, p.metrics


def prediction(spec: RunSpec, history: bool = False, capped_history: bool = False, memo=None) -> Prediction:
    """The Prediction of `spec` (its forward and backward shared with other optimizers' where they can be,
    memprof.simulation.shared, through `memo`: the process's memprof.simulation.memo.MEMO unless given).
    `history`: keep the unlimited replay's allocator history (for a timeline); `capped_history`: replay the
    budget card's allocator with its history even when it fits (for a snapshot)."""
    from memprof.simulation.memo import MEMO
    from memprof.simulation.shared import shareable, trace_shared

    def make_trace(rules):
        if shareable(spec):
            resolve_model(spec.model, True, spec.freeze, spec.input_shape)  # a name it cannot predict says why
            return trace_shared(spec, rules, memo or MEMO)
        return trace(spec, rules, front=(memo or MEMO).front)

    p = prediction_of(make_trace, spec.budget, spec, history, capped_history)
    model_notes = resolve_model(spec.model, True, spec.freeze, spec.input_shape).notes  # e.g. the loss it trains on
    if model_notes:
        p.metrics["notes"] = [*p.metrics.get("notes", []), *model_notes]
    return p


def predict_traced(make_trace, budget: str, spec: RunSpec | None = None) -> tuple[str, dict]:
    """(status, metrics) of any traced run on the `budget` card (memprof.simulation.simulate.prediction_of)."""
    p = prediction_of(make_trace, budget, spec)
    return p.status, p.metrics


def prediction_of(make_trace, budget: str, spec: RunSpec | None = None, history: bool = False,
                  capped_history: bool = False) -> Prediction:
    """The engine's one entrance: the Prediction of any traced run on the `budget` card. `make_trace(rules)`
    traces it (on fake tensors) with the CUDA rules (and `spec`'s precision rules); the stream is replayed
    through the allocator model. Registry models (`prediction`), a user's own step (memprof.api.predict_step)
    and a user's script all come through here. Writes nothing."""
    device = parse_budget(budget)
    rules = cuda_rules(device, spec)
    t = make_trace(rules)
    folded = 0
    for rule in rules:
        if hasattr(rule, "rewrite"):  # rules that change the stream once it is complete
            t.events = rule.rewrite(t.events)
            folded += rule.folded
    full = replay(t.events, record=history, streams=t.stream)
    at_peak = blocks_at(t.events, full.peak_index, full.block_bytes)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for sid, nbytes in at_peak.items():
        breakdown[t.category[sid]] += nbytes
    phase, step = phase_at(t.events, full.peak_index)
    sums = holder_bytes(t, at_peak, full.peak_index)
    metrics = {
        "peak_allocated_bytes": full.peak_allocated,
        "peak_reserved_bytes": full.peak_reserved,
        "peak_live_bytes": live_peak(t).peak_bytes,
        "peak_phase": phase,
        "peak_step": step,
        "peak_op": t.events[full.peak_index].op if t.events[full.peak_index].kind is ALLOC else None,  # (none: empty)
        "breakdown_at_peak_bytes": breakdown,
        "top_modules_at_peak": top_holders(sums),
        "top_blocks_at_peak": top_blocks(sums),
        "phase_peak_allocated_bytes": {p: full.phase_peaks.get(p, 0) for p in ("forward", "backward", "optimizer")},
        **common_metrics(t),
        "budget_device": device.label,
        "budget_bytes": device.total_bytes,
        "context_bytes_estimate": device.context_bytes,
        "nvml_process_peak_bytes": full.peak_reserved + device.context_bytes,
        "over_budget_bytes": max(0, full.peak_reserved + device.context_bytes - device.total_bytes),
        "rules": [r.name for r in rules if not r.idle()] + [r["name"] for r in t.rules[len(rules):]],  # (acting)
        "in_place_accumulations": folded,
    }
    metrics["peak_to_floor_ratio"] = peak_to_floor(full.peak_allocated, metrics.get("floor_bytes"))
    metrics.update(band(metrics, device))
    status, capped, oom_index = "ok", None, None
    try:
        # the card's allocator acts as the unlimited one until a new segment would pass its limit: below
        # it, the limited replay only matters for the snapshot it draws
        if full.peak_reserved > device.usable_bytes or capped_history:
            capped = replay(t.events, capacity=device.usable_bytes, record=capped_history, streams=t.stream).allocator
    except SimulatedOOM as oom:
        oom_phase, oom_step = phase_at(t.events, oom.index)
        metrics["oom"] = {"phase": oom_phase, "step": oom_step, "op": t.events[oom.index].op,
                          "requested_bytes": oom.requested, "allocated_bytes": oom.allocated,
                          "reserved_bytes": oom.reserved, "usable_bytes": oom.capacity}
        metrics["fits"] = "no"
        status, capped, oom_index = "oom", oom.allocator, oom.index
    return Prediction(status, metrics, t, full, capped, oom_index, device)


TOP_MODULES = 10


def holder_bytes(t: Trace, at_peak: dict, peak_index: int) -> dict:
    """Allocated bytes (block sizes) at the peak per holder and category: holders are module paths
    (parameters, gradients and optimizer state under their parameter's module), or what holds them outside
    modules (memprof.simulation.attribution.holder)."""
    from memprof.simulation.attribution import holder

    phase_of = allocation_phases(t.events, peak_index)
    sums: dict = defaultdict(lambda: defaultdict(int))
    for sid, nbytes in at_peak.items():
        cat = t.category[sid]
        sums[holder(t.module.get(sid, ""), cat, phase_of.get(sid, "setup"))][cat] += nbytes
    return sums


def top_holders(sums: dict, n: int = TOP_MODULES) -> list[dict]:
    """The n largest holders, each with its bytes per category."""
    ranked = sorted(sums.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:n]
    return [{"module": name, "bytes": sum(cats.values()), "categories_bytes": dict(cats)} for name, cats in ranked]


def top_blocks(sums: dict, n: int = 5) -> list[dict]:
    """The n largest holders with module paths cut after their first numbered part (one entry per
    transformer block, e.g. `visual.transformer.resblocks.7`), so a block's layers count together."""
    grouped: dict = defaultdict(int)
    for name, cats in sums.items():
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        grouped[".".join(parts[: cut + 1])] += sum(cats.values())
    ranked = sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"module": name, "bytes": nbytes} for name, nbytes in ranked]


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
    rules = [LayerNormStatsFp32(on_cpu=True)] if spec.precision != "fp32" else []
    if spec.precision == "fp16-amp":
        rules.append(FakeGradScalerStep())  # fake tensors have no value for the scaler's found_inf check
    return cpu_rules_metrics(trace(spec, rules=rules))


def cpu_rules_metrics(t: Trace) -> tuple[Trace, dict]:
    """Peak live tensor bytes of a trace with no CUDA rules, with its phase peaks and breakdown."""
    peak = live_peak(t)
    return t, {"peak_live_bytes": peak.peak_bytes, "peak_to_floor_ratio": peak_to_floor(peak.peak_bytes, t.extra.get("floor_bytes")), "phase_peak_live_bytes": peak.phase_peaks,
               "breakdown_at_peak_bytes": peak.breakdown, **common_metrics(t), "host_scalars_note": HOST_SCALARS_NOTE}
