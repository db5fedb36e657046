"""Backend `simulate`: the engine's prediction (memprof.simulation.simulate) of what torch.cuda would report,
with the files a prediction leaves beside a run: its timeline (memprof.reports.timeline) and, asked for, its
predicted allocator snapshot (memprof.reports.snapshot), both made from the Prediction. Every figure is a
prediction."""

from __future__ import annotations

import os

from memprof.backends.base import PREDICTED, Backend, Outcome
from memprof.errors import UsageError


class SimulateBackend(Backend):
    name = "simulate"
    source = PREDICTED
    isolation = "pooled"  # a worker keeps its forward traces for the next optimizer (memprof.simulation.shared)
    exclusive = False
    default_budget = "titan-x"
    takes = frozenset({"snapshot"})

    def device_name(self) -> str:
        return "cpu-simulated"

    def describe(self) -> str:
        return "every figure is predicted, not measured"

    def check(self, opts: dict, notes: list) -> None:
        if opts.get("budget") == "device":
            raise UsageError("--budget device: the simulation predicts for a named card; give one, e.g. titan-x",
                             option="budget")

    def check_model(self, name: str) -> None:
        from memprof.models import check_simulatable

        check_simulatable(name)

    def worker_options(self, opts: dict) -> dict:
        return {"snapshot_dir": opts["snapshot"]} if opts.get("snapshot") else {}

    def affinity(self, spec):
        from memprof.spec import forward_group

        return forward_group(spec)

    def run(self, spec, out_dir: str | None = None, snapshot_dir: str | None = None, **_) -> Outcome:
        """The prediction of `spec`; with `out_dir` its timeline goes to out_dir/timelines/, with `snapshot_dir`
        its predicted snapshot of the budget card's replay goes there, named by the record key."""
        from memprof.simulation.simulate import prediction

        switches = _sdpa_switches()
        p = prediction(spec, history=out_dir is not None, capped_history=snapshot_dir is not None)
        return Outcome(p.status, {**p.metrics, **switches}, write_artifacts(spec, p, out_dir, snapshot_dir))

    def probe(self, spec, **options):
        """Probes by prediction in this process; once three batch sizes (2 or more) of the configuration's
        forward group are traced and agree on a line, the forward at other batches is synthesized from it
        (memprof.simulation.batch_scaling), exactly as a trace would give it."""
        from dataclasses import replace

        from memprof.simulation.memo import MEMO
        from memprof.simulation.simulate import prediction

        _sdpa_switches()

        def probe(batch: int) -> Outcome:
            with MEMO.scaling_in_batch():
                p = prediction(replace(spec, batch_size=batch), memo=MEMO)
            return Outcome(p.status, p.metrics)

        return probe


def _sdpa_switches() -> dict:
    """The attention kernels MEMPROF_CUDA_SDPA_DISABLE turns off, off here too (the cuda backend measures with the
    same switch: memprof.harness.sdpa_kernels); the record names them only when one is off."""
    from memprof.harness import sdpa_kernels

    enabled = sdpa_kernels()
    return {} if all(enabled.values()) else {"sdpa_kernels_enabled": enabled}


def write_artifacts(spec, p, out_dir: str | None, snapshot_dir: str | None) -> dict:
    """The timeline JSON (out_dir) and the predicted snapshot (snapshot_dir) of Prediction `p`; returns the
    metrics naming them."""
    from memprof.results import record_key

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
