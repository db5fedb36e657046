"""Allocator snapshots in PyTorch's own format: predicted ones written, any one's peaks read back.

`build_snapshot` turns the allocator model's history and final state (memprof.simulation.allocator, `record=True`)
into the dict `torch.cuda.memory._snapshot()` returns: `segments` (each with its blocks: address, size,
requested_size, state, frames) and `device_traces` (alloc / free_requested / free_completed /
segment_alloc / segment_free / oom entries: action, addr, size, stream, time_us, frames). `stream` is the
allocator model's number for the stream (0 the default stream, then in the order of first use,
CachingAllocatorModel.stream_number), not a CUDA stream handle. As in torch, a
trace entry's size is the bytes requested (before rounding) and a block's size is what it occupies. Frames
name the op (`name`) and the module path (`filename`); a second frame says category, phase and step.
`time_us` is the event's index in memprof's tracker stream (a logical clock, not microseconds). The file
loads in https://pytorch.org/memory_viz and in `python -m torch.cuda._memory_viz trace_plot|segment_plot`.

`trace_peaks` reads any snapshot's trace (predicted or recorded on a GPU) back into the figures torch.cuda
reports: peak allocated (sum of the blocks handed out, recovered from the addresses: a block runs from its
address to the next live block or the segment's end unless the allocator split off the rest, which it does
for a remainder >= 512 B in the small pool and > 1 MiB in the large one) and peak reserved (segments),
checking the trace as it goes (overlaps, frees of unknown blocks, segments freed while in use).
"""

from __future__ import annotations

import bisect
import os
import pickle
from dataclasses import dataclass, field

from memprof.simulation.allocator import MIN_BLOCK, SMALL_SIZE, round_size

BASE_ADDR = 0x7F0000000000  # where predicted segments start (torch's are similar; below 2**53 for the viewer)
PICKLE_PROTOCOL = 4  # the viewer's unpickler reads protocols 2-4 (newer copies 2-5)


class SnapshotError(ValueError):
    """A snapshot whose trace contradicts itself (or its final state)."""


def snapshot_name(key: str) -> str:
    """File name for a record key (`<spec key>@<backend>`): slashes become underscores."""
    return key.replace("/", "_") + ".pickle"


# --- writing ------------------------------------------------------------------------------------------

def _request_info(events, category: dict, module: dict) -> dict:
    """request id -> (op, module path or holder, category, phase, step) from the tracker's stream."""
    from memprof.simulation.attribution import holder  # (torch: only where a snapshot is built)

    from memprof.simulation.events import ALLOC, PHASE

    info, phase, step = {}, "setup", 0
    for ev in events:
        if ev.kind is PHASE:
            phase, step = ev.name, ev.step
        elif ev.kind is ALLOC:
            cat = category.get(ev.sid, "temporaries")
            info[ev.sid] = (ev.op, holder(module.get(ev.sid, ""), cat, phase), cat, phase, step)
    return info


class _Frames:
    """One shared frames list per distinct (op, holder, category, phase, step): a smaller pickle."""

    def __init__(self, info: dict):
        self.info, self.cache = info, {}

    def __call__(self, rid) -> list:
        key = self.info.get(rid)
        if key is None:
            return []
        frames = self.cache.get(key)
        if frames is None:
            op, where, cat, phase, step = key
            frames = self.cache[key] = [
                {"filename": where, "line": 0, "name": op},
                {"filename": "memprof (predicted)", "line": step, "name": f"{cat}, {phase} step {step}"}]
        return frames


def build_snapshot(allocator, events, category: dict, module: dict, meta: dict | None = None) -> dict:
    """The snapshot dict for a replay with `record=True`: its history as the trace, its state as segments."""
    frames = _Frames(_request_info(events, category, module))
    trace = []
    history = allocator.history
    for i, entry in enumerate(history):
        action = entry[0]
        if action == "alloc":
            _, rid, addr, nbytes, _size, stream, clock = entry
            trace.append(_entry("alloc", addr, nbytes, stream, clock, frames(rid)))
        elif action == "free":
            _, rid, addr, nbytes, _size, stream, clock = entry
            trace.append(_entry("free_requested", addr, nbytes, stream, clock, frames(rid)))
            trace.append(_entry("free_completed", addr, nbytes, stream, clock, frames(rid)))
        elif action in ("segment_alloc", "segment_free"):
            _, addr, size, stream, clock = entry
            nxt = history[i + 1] if i + 1 < len(history) else None
            fr = frames(nxt[1]) if action == "segment_alloc" and nxt is not None and nxt[0] == "alloc" else []
            trace.append(_entry(action, addr, size, stream, clock, fr))
        elif action == "oom":
            _, rounded, device_free, stream, clock = entry
            trace.append({"action": "oom", "device_free": device_free, "size": rounded, "stream": stream,
                          "time_us": clock, "frames": []})
    segments = []
    for blocks in allocator.segments():
        out_blocks = [{"address": BASE_ADDR + b.addr, "size": b.size, "requested_size": 0 if b.free else b.requested,
                       "state": "inactive" if b.free else "active_allocated",
                       "frames": [] if b.free else frames(b.rid)} for b in blocks]
        active = sum(b.size for b in blocks if not b.free)
        segments.append({"device": 0, "address": BASE_ADDR + blocks[0].addr, "total_size": sum(b.size for b in blocks),
                         "allocated_size": active, "active_size": active,
                         "requested_size": sum(b.requested for b in blocks if not b.free),
                         "stream": allocator.stream_number(blocks[0].stream),
                         "segment_type": "small" if blocks[0].small else "large", "segment_pool_id": (0, 0),
                         "is_expandable": False, "frames": [], "blocks": out_blocks})
    snap = {"segments": segments, "device_traces": [trace], "allocator_settings": {}, "external_annotations": []}
    if meta is not None:
        snap["memprof"] = meta
    return snap


def _entry(action: str, addr: int, size: int, stream: int, clock: int, frames: list) -> dict:
    return {"action": action, "addr": BASE_ADDR + addr, "size": size, "stream": stream, "time_us": clock,
            "frames": frames}


def write_snapshot(snap: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(snap, fh, protocol=PICKLE_PROTOCOL)
    os.replace(tmp, path)
    return path


def load_snapshot(path: str) -> dict:
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    if isinstance(data, list):  # segments only (what torch.cuda.memory_snapshot() returns)
        data = {"segments": data, "device_traces": []}
    return data


# --- reading ------------------------------------------------------------------------------------------

@dataclass
class TracePeaks:
    """What a snapshot's trace implies, in torch.cuda's terms (bytes)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_requested_bytes: int  # what the viewer's Active Memory Timeline peaks at (sizes as requested)
    final_allocated_bytes: int
    final_reserved_bytes: int
    entries: int
    start_allocated_bytes: int = 0  # held before recording began (0 for a predicted snapshot)
    start_reserved_bytes: int = 0
    oom: bool = False
    series: list = field(default_factory=list)  # (time_us, allocated, reserved) after each alloc/free, if asked


def _block_size(nbytes: int, gap: int) -> int:
    """The block a request of `nbytes` gets from a free block of `gap` bytes (the allocator's split rule)."""
    size = round_size(nbytes)
    remaining = gap - size
    small = size <= SMALL_SIZE
    return size if ((remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE)) else gap


def trace_peaks(snap: dict, device: int = 0, strict: bool = True, series: bool = False) -> TracePeaks:
    """Replay a snapshot's trace: peaks of allocated (block sizes) and reserved (segments) bytes.

    `strict` (for predicted snapshots, whose trace starts with an empty allocator): any block or segment
    the trace did not create is an error. Otherwise (a GPU recording that began after some allocations)
    what the final state and the frees show existed before is counted from the start.
    """
    traces = snap.get("device_traces") or []
    entries = traces[device] if device < len(traces) else []
    segs: dict[int, int] = {}  # live segment address -> size
    seg_starts: list[int] = []
    active: dict[int, tuple[int, int]] = {}  # live block address -> (block size, requested)
    starts: list[int] = []
    pending: set[int] = set()
    allocated = reserved = requested = 0
    start_alloc = start_res = 0
    if not strict:
        created = {e["addr"] for e in entries if e["action"] == "segment_alloc"}
        made = {e["addr"] for e in entries if e["action"] == "alloc"}
        for seg in snap.get("segments", []):
            if seg.get("device", device) == device and seg["address"] not in created:
                segs[seg["address"]] = seg["total_size"]
                start_res += seg["total_size"]
                for b in seg["blocks"]:
                    if b["state"] != "inactive" and b["address"] not in made:
                        active[b["address"]] = (b["size"], b.get("requested_size", b["size"]))
                        start_alloc += b["size"]
        for e in entries:
            if e["action"] == "segment_free" and e["addr"] not in created and e["addr"] not in segs:
                segs[e["addr"]] = e["size"]
                start_res += e["size"]
        for e in entries:
            if e["action"] == "free_requested" and e["addr"] not in made and e["addr"] not in active:
                active[e["addr"]] = (round_size(e["size"]), e["size"])
                start_alloc += round_size(e["size"])
        seg_starts = sorted(segs)
        starts = sorted(active)
        allocated, reserved = start_alloc, start_res
        requested = sum(r for _s, r in active.values())
    peak_alloc, peak_res, peak_req, oom, points = allocated, reserved, requested, False, []
    for n, e in enumerate(entries):
        action = e["action"]
        if action == "segment_alloc":
            addr, size = e["addr"], e["size"]
            j = bisect.bisect_right(seg_starts, addr)
            if (j and seg_starts[j - 1] + segs[seg_starts[j - 1]] > addr) or (j < len(seg_starts) and seg_starts[j] < addr + size):
                raise SnapshotError(f"entry {n}: segment at {addr:#x} overlaps a live segment")
            segs[addr] = size
            seg_starts.insert(j, addr)
            reserved += size
            peak_res = max(peak_res, reserved)
        elif action == "segment_free":
            addr = e["addr"]
            if addr not in segs:
                raise SnapshotError(f"entry {n}: segment_free of {addr:#x}, which is not a live segment")
            end = addr + segs[addr]
            k = bisect.bisect_left(starts, addr)
            if k < len(starts) and starts[k] < end:
                raise SnapshotError(f"entry {n}: segment {addr:#x} freed while block {starts[k]:#x} is live in it")
            reserved -= segs.pop(addr)
            seg_starts.remove(addr)
        elif action == "alloc":
            addr, nbytes = e["addr"], e["size"]
            j = bisect.bisect_right(seg_starts, addr)
            if not j or seg_starts[j - 1] + segs[seg_starts[j - 1]] <= addr:
                raise SnapshotError(f"entry {n}: alloc at {addr:#x} outside every live segment")
            seg_end = seg_starts[j - 1] + segs[seg_starts[j - 1]]
            k = bisect.bisect_right(starts, addr)
            if k and starts[k - 1] + active[starts[k - 1]][0] > addr:
                raise SnapshotError(f"entry {n}: alloc at {addr:#x} overlaps the live block at {starts[k - 1]:#x}")
            gap = (min(starts[k], seg_end) if k < len(starts) else seg_end) - addr
            if round_size(nbytes) > gap:
                raise SnapshotError(f"entry {n}: alloc of {nbytes} B at {addr:#x} does not fit the {gap} B free there")
            size = _block_size(nbytes, gap)
            active[addr] = (size, nbytes)
            starts.insert(k, addr)
            allocated += size
            requested += nbytes
            peak_alloc, peak_req = max(peak_alloc, allocated), max(peak_req, requested)
        elif action == "free_requested":
            if e["addr"] not in active:
                raise SnapshotError(f"entry {n}: free_requested of {e['addr']:#x}, which is not a live block")
            pending.add(e["addr"])
        elif action == "free_completed":
            addr = e["addr"]
            if addr not in pending:
                raise SnapshotError(f"entry {n}: free_completed of {addr:#x} without free_requested")
            pending.discard(addr)
            size, nbytes = active.pop(addr)
            starts.pop(bisect.bisect_left(starts, addr))
            allocated -= size
            requested -= nbytes
        elif action == "oom":
            oom = True
        if series and action in ("alloc", "free_completed", "segment_alloc", "segment_free"):
            points.append((e.get("time_us", n), allocated, reserved))
    return TracePeaks(peak_alloc, peak_res, peak_req, allocated, reserved, len(entries), start_alloc, start_res,
                      oom, points)


def state_totals(snap: dict, device: int = 0) -> tuple[int, int]:
    """(allocated, reserved) bytes of the snapshot's final state (its segments), as torch's segsum sums them."""
    segs = [s for s in snap.get("segments", []) if s.get("device", device) == device]
    return (sum(b["size"] for s in segs for b in s["blocks"] if b["state"] == "active_allocated"),
            sum(s["total_size"] for s in segs))


def check_snapshot(snap: dict, metrics: dict) -> list[str]:
    """Problems found comparing a predicted snapshot with the prediction it came from (empty: consistent).

    The trace's peaks must equal the prediction's peak allocated and reserved bytes (for a configuration
    that runs out of the budget: the snapshot is the budget card's replay, which stops at the OOM, so its
    peaks stay at or below the prediction's and it ends in an `oom` entry), and the trace must end in the
    state the segments describe (torch's own segsum checks each segment's blocks add up).
    """
    from torch.cuda._memory_viz import segsum

    problems = []
    try:
        peaks = trace_peaks(snap)
    except SnapshotError as exc:
        return [f"trace: {exc}"]
    want = (metrics["peak_allocated_bytes"], metrics["peak_reserved_bytes"])
    got = (peaks.peak_allocated_bytes, peaks.peak_reserved_bytes)
    if "oom" in metrics:
        if not peaks.oom:
            problems.append("the prediction runs out of memory but the snapshot's trace has no oom entry")
        if got[0] > want[0] or got[1] > want[1]:
            problems.append(f"trace peaks {got} exceed the prediction's {want}")
    elif got != want:
        problems.append(f"trace peaks (allocated, reserved) {got} != the prediction's {want}")
    if (peaks.final_allocated_bytes, peaks.final_reserved_bytes) != state_totals(snap):
        problems.append(f"the trace ends at {(peaks.final_allocated_bytes, peaks.final_reserved_bytes)} but the "
                        f"segments hold {state_totals(snap)}")
    try:
        segsum(snap)
    except (AssertionError, KeyError, TypeError) as exc:
        problems.append(f"torch's segsum rejects the segments: {exc}")
    return problems


# --- an offline view ----------------------------------------------------------------------------------

@dataclass
class PeakView:
    """What a snapshot holds at its peak of allocated bytes: the live blocks (address, requested bytes, frames)
    and segments (address, size), read from its trace, for a view that needs no viewer."""

    entry: int  # the trace entry at which the peak was reached (its index)
    entries: int
    allocated_bytes: int  # block sizes, as torch.cuda.memory_allocated reads
    reserved_bytes: int
    blocks: list  # (address, requested bytes, frames), largest first
    segments: list  # (address, size), largest first
    before_recording: bool = False  # a GPU recording that began with blocks live: those are not listed


def peak_view(snap: dict, device: int = 0) -> PeakView:
    """The blocks and segments live at the first moment the trace reaches its peak allocated bytes (the point
    trace_peaks finds), by replaying the trace to that entry."""
    peaks = trace_peaks(snap, device, strict=False, series=True)
    entries = (snap.get("device_traces") or [[]])[device] if device < len(snap.get("device_traces") or []) else []
    counted = ("alloc", "free_completed", "segment_alloc", "segment_free")
    target = next((k for k, p in enumerate(peaks.series) if p[1] == peaks.peak_allocated_bytes), None)
    blocks: dict[int, tuple] = {}
    segs: dict[int, int] = {}
    k, at = -1, -1
    for n, e in enumerate(entries if target is not None else []):
        action = e["action"]
        if action == "alloc":
            blocks[e["addr"]] = (e["size"], e.get("frames") or [])
        elif action == "free_completed":
            blocks.pop(e["addr"], None)
        elif action == "segment_alloc":
            segs[e["addr"]] = e["size"]
        elif action == "segment_free":
            segs.pop(e["addr"], None)
        if action in counted:
            k += 1
            if k == target:
                at = n
                break
    return PeakView(at, len(entries), peaks.peak_allocated_bytes,
                    peaks.series[target][2] if target is not None else peaks.peak_reserved_bytes,
                    sorted(((a, size, fr) for a, (size, fr) in blocks.items()), key=lambda b: -b[1]),
                    sorted(segs.items(), key=lambda s: -s[1]), bool(peaks.start_allocated_bytes))


def frame_category(frames: list) -> str | None:
    """The category a predicted snapshot's second frame names ('activations, forward step 1'); None for a GPU
    recording's Python frames."""
    if len(frames) > 1 and frames[1].get("filename") == "memprof (predicted)":
        return frames[1]["name"].split(",")[0]
    return None
