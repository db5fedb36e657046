"""The files a prediction can leave beside its record: its memory timeline (reports/timeline) and its predicted
allocator snapshot (reports/snapshot), written for the grid's simulate backend and a script's simulated run alike."""

from __future__ import annotations

import os


def write_artifacts(spec, p, out_dir: str | None, snapshot_dir: str | None) -> dict:
    """The timeline JSON (out_dir) and the predicted snapshot (snapshot_dir) of Prediction `p`; returns the
    metrics naming them."""
    from memprof.records import record_key

    key = record_key(spec, "simulate")
    out, metrics, device = {}, p.metrics, p.device
    if out_dir is not None:
        from memprof.reports.timeline import TIMELINE_DIR, predicted_series, timeline_name, write_timeline

        series = predicted_series(p.full.allocator.history, p.trace.events, p.trace.category)
        series.update(source="predicted", key=key, budget={
            "device": device.name, "total_bytes": device.total_bytes, "usable_bytes": device.usable_bytes,
            "context_bytes": device.context_bytes},
            peak={"x": p.full.peak_index, "allocated_bytes": metrics["peak_allocated_bytes"],
                  "reserved_bytes": metrics["peak_reserved_bytes"], "phase": metrics["peak_phase"],
                  "step": metrics["peak_step"], "op": metrics["peak_op"],
                  "top_modules": metrics["top_modules_at_peak"][:5]},
            oom={"x": p.oom_index} if p.oom_index is not None else None)
        rel = os.path.join(TIMELINE_DIR, timeline_name(key))
        write_timeline(series, os.path.join(out_dir, rel))
        out["timeline_file"] = rel
    if snapshot_dir is not None:
        from memprof.reports.snapshot import build_snapshot, snapshot_name, write_snapshot

        meta = {"source": "predicted", "key": key, "budget_device": device.label,
                "budget_usable_bytes": device.usable_bytes,
                "time_us": "index of the event in memprof's tracker stream (a logical clock, not microseconds)",
                "replay": "the budget card's allocator (its usable bytes as the device's limit)"}
        snap = build_snapshot(p.capped, p.trace.events, p.trace.category, p.trace.module, meta)
        out["snapshot_file"] = os.path.abspath(write_snapshot(snap, os.path.join(snapshot_dir, snapshot_name(key))))
    return out
