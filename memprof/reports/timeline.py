"""Memory over one configuration's events: a compact series per configuration (JSON) and its plot (PNG).

Predicted series: the allocator model's history (memprof.simulation.allocator, `record=True`) summed per category
(block sizes, so the top of the stack is what torch.cuda.memory_allocated would read) and reserved bytes,
after every event of the tracker's stream; x is the event's index. Long series are thinned to at most
MAX_POINTS points, keeping the highest and lowest point of each stretch (the peak always survives).
Measured series come from a GPU snapshot's trace (memprof.reports.snapshot.trace_peaks): allocated and reserved
only (a recording carries no categories), placed on the predicted x axis by allocation count. A measured
record without a snapshot has only its peaks: they are drawn as horizontal marks, and the figure says so.
"""

from __future__ import annotations

import json
import os

from memprof.reports.palette import BUDGET_COLOR, CATEGORY_COLORS, category_label
from memprof.simulation import CATEGORIES
from memprof.vocabulary import STEP_PHASES, Phase

MAX_POINTS = 1600
TIMELINE_DIR = "timelines"
PHASE_COLORS = {Phase.SETUP: "#ffffff", Phase.FORWARD: "#eef4fb", Phase.BACKWARD: "#fdf1e6",
                Phase.OPTIMIZER: "#fbeaea", Phase.DONE: "#ffffff"}


def timeline_name(key: str) -> str:
    return key.replace("/", "_") + ".json"


def _thin(points: list, peak_at: int) -> list:
    """At most MAX_POINTS of `points` (x, total, ...): each stretch's lowest and highest, in order."""
    if len(points) <= MAX_POINTS:
        return points
    keep = {0, len(points) - 1, peak_at}
    stretch = -(-len(points) // (MAX_POINTS // 2))
    for start in range(0, len(points), stretch):
        chunk = range(start, min(start + stretch, len(points)))
        keep.add(max(chunk, key=lambda i: points[i][1]))
        keep.add(min(chunk, key=lambda i: points[i][1]))
    return [points[i] for i in sorted(keep)]


def predicted_series(history: list, events: list, category: dict) -> dict:
    """x, bytes per category and reserved bytes after each event, phase bands, and each ALLOC's x."""
    from memprof.simulation.events import ALLOC, PHASE

    totals = dict.fromkeys(CATEGORIES, 0)
    reserved, points, peak_at, peak = 0, [], 0, -1
    for entry in history:
        action = entry[0]
        if action == "alloc":
            totals[category.get(entry[1], "temporaries")] += entry[4]
        elif action == "free":
            totals[category.get(entry[1], "temporaries")] -= entry[4]
        elif action == "segment_alloc":
            reserved += entry[2]
        elif action == "segment_free":
            reserved -= entry[2]
        else:
            continue
        point = (entry[-1], sum(totals.values()), reserved, *totals.values())
        if points and points[-1][0] == point[0]:
            points[-1] = point
        else:
            points.append(point)
        if point[1] > peak:
            peak, peak_at = point[1], len(points) - 1
    points = _thin(points, peak_at)
    phases = [[i, ev.name, ev.step] for i, ev in enumerate(events) if ev.kind is PHASE]
    return {"x": [p[0] for p in points], "reserved_bytes": [p[2] for p in points],
            "categories_bytes": {c: [p[3 + k] for p in points] for k, c in enumerate(CATEGORIES)},
            "phases": phases, "n_events": len(events),
            "alloc_x": [i for i, ev in enumerate(events) if ev.kind is ALLOC]}


def write_timeline(series: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(series, fh, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def load_timeline(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def measured_series(snap: dict, alloc_x: list | None) -> dict:
    """Allocated and reserved bytes over a recorded (GPU) snapshot's trace; x on the predicted axis by
    allocation count when `alloc_x` (each predicted ALLOC's x) is given, else the trace's entry number."""
    from memprof.reports.snapshot import trace_peaks

    entries = (snap.get("device_traces") or [[]])[0]
    peaks = trace_peaks(snap, strict=False, series=True)
    xs, n_alloc, k = [], 0, 0
    for e in entries:
        if e["action"] == "alloc":
            n_alloc += 1
        if e["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free"):
            if alloc_x:
                xs.append(alloc_x[min(max(n_alloc - 1, 0), len(alloc_x) - 1)])
            else:
                xs.append(k)
            k += 1
    return {"x": xs, "allocated_bytes": [p[1] for p in peaks.series], "reserved_bytes": [p[2] for p in peaks.series],
            "peak_allocated_bytes": peaks.peak_allocated_bytes, "peak_reserved_bytes": peaks.peak_reserved_bytes,
            "by_allocation_count": bool(alloc_x)}


def _unit(top: float) -> tuple[float, str]:
    return ((1 << 30), "GiB") if top >= (1 << 30) else ((1 << 20), "MiB")


BUDGET_SHOWN_UP_TO = 3.0  # the budget line is drawn when it is at most this many times the highest figure


def plot_timeline(path, title: str, predicted: dict | None = None, measured: dict | None = None,
                  measured_peaks: dict | None = None, dpi: int = 80) -> str:
    """One PNG: the predicted stack by category with reserved, phase bands, peak and budget; a measured
    series (from a snapshot) or measured peaks (horizontal marks) on the same axes when given. `path`: a file
    name or a binary file object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    highest = max([0] + (predicted["reserved_bytes"] if predicted else [])
                  + (measured["reserved_bytes"] if measured else [])
                  + [v for k, v in (measured_peaks or {}).items() if k in ("peak_allocated_bytes", "peak_reserved_bytes")
                     and v is not None])
    div, unit = _unit(highest)
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=dpi)
    notes, top = [], highest
    if predicted is not None:
        xs = predicted["x"]
        bands = _bands(predicted)
        for (x0, name, step), x1 in zip(bands, [b[0] for b in bands[1:]] + [predicted["n_events"]]):
            if name in STEP_PHASES:
                ax.axvspan(x0, x1, color=PHASE_COLORS[name], zorder=0)
                label = name if x1 - x0 > predicted["n_events"] / 12 else name[:3]
                ax.text((x0 + x1) / 2, 1.0, f"{label} {step}", transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=7, color="#555")
        stacks = [[v / div for v in predicted["categories_bytes"][c]] for c in CATEGORIES]
        ax.stackplot(xs, *stacks, step="post", colors=[CATEGORY_COLORS[c] for c in CATEGORIES],
                     labels=[category_label(c) for c in CATEGORIES], linewidth=0)
        ax.step(xs, [v / div for v in predicted["reserved_bytes"]], where="post", color="black", lw=1.1,
                label="reserved")
        peak = predicted.get("peak")
        if peak:
            px, py = peak["x"], peak["allocated_bytes"] / div
            ax.plot([px], [py], marker="v", color="crimson", ms=8, zorder=5, ls="none")
            ax.annotate(f"predicted peak {py:.2f} {unit} allocated, {peak['reserved_bytes'] / div:.2f} {unit} reserved\n"
                        f"{peak['phase']} step {peak['step']}: {peak['op'][:48]}", (px, py), xytext=(-8, 12),
                        textcoords="offset points", ha="right" if px > predicted["n_events"] / 3 else "left",
                        va="bottom", fontsize=7.5, color="crimson")
        budget = predicted.get("budget")
        if budget:
            usable = budget["usable_bytes"]
            if usable <= BUDGET_SHOWN_UP_TO * max(highest, 1):
                ax.axhline(usable / div, color=BUDGET_COLOR, ls="--", lw=1,
                           label=f"{budget['device']}: {usable / div:.2f} {unit} usable")
                top = max(top, usable)
            else:
                notes.append(f"budget {budget['device']}: {usable / (1 << 30):.2f} GiB usable, far above this plot")
        oom = predicted.get("oom")
        if oom and oom.get("x") is not None:
            ax.axvline(oom["x"], color="crimson", lw=1.2, ls=":",
                       label=f"predicted OOM on {budget['device'] if budget else 'the budget card'}")
    if measured is not None:
        ax.step(measured["x"], [v / div for v in measured["allocated_bytes"]], where="post", color="#222",
                lw=0.9, ls="--", label="allocated (measured)")
        ax.step(measured["x"], [v / div for v in measured["reserved_bytes"]], where="post", color="#777", lw=0.9,
                ls="-.", label="reserved (measured)")
        notes.append("measured: from the GPU snapshot's trace"
                     + (", placed on the predicted axis by allocation count" if measured.get("by_allocation_count") else ""))
    elif measured_peaks is not None:
        for field, style, name in (("peak_allocated_bytes", "--", "allocated"), ("peak_reserved_bytes", "-.", "reserved")):
            if measured_peaks.get(field) is not None:
                ax.axhline(measured_peaks[field] / div, color="#222", ls=style, lw=0.9,
                           label=f"measured peak {name} {measured_peaks[field] / div:.2f} {unit}")
        notes.append("measured: peaks only, as horizontal marks (no per-event series; the cuda backend records one "
                     "with --snapshot)")
    ax.set_xlabel("event (allocation or release) in the training steps' stream" if predicted is not None
                  else "trace entry")
    ax.set_ylabel(unit)
    ax.set_ylim(0, max(top, 1) / div * 1.22)
    ax.margins(x=0)
    ax.set_title(title, fontsize=9.5, pad=14)
    if ax.get_legend_handles_labels()[0]:  # e.g. a cpu measurement has no series to name
        ax.legend(fontsize=7, loc="upper left", ncol=3, framealpha=0.85)
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7, color="#444")
    fig.subplots_adjust(left=0.055, right=0.99, top=0.86, bottom=0.16 if notes else 0.13)  # fixed: no extra layout pass
    if isinstance(path, str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _bands(series: dict) -> list:
    return [tuple(p) for p in series["phases"]]
