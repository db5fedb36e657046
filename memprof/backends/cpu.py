"""Backend `cpu`: the training steps on real CPU tensors, measured with the simulation's own tracker.

Measured: peak live tensor bytes (the sum of every live storage's size, op by op, through the same
StorageTracker the simulation uses, with no CUDA rules), per phase, with its breakdown; the median step
time (steps after the first); the process's peak resident memory. A budget (`--budget`) caps live tensor
bytes at the card's usable memory: going over is recorded as `oom` (emulated on the host).
"""

from __future__ import annotations

import platform
import resource

import torch

from memprof.backends.base import MEASURED, Backend, as_outcome
from memprof.budget import parse_budget
from memprof.errors import UsageError
from memprof.spec import RunSpec
from memprof.simulation.events import phase_at
from memprof.simulation.tracing import common_metrics, live_peak, median_ms, peak_to_floor, trace


class CpuBackend(Backend):
    """Measured on real CPU tensors, in one worker process, one configuration at a time."""

    name = "cpu"
    source = MEASURED
    isolation = "pooled"
    exclusive = True
    default_budget = "device"
    fit_refusal = ("fit probes with the simulation (predicts) or the cuda backend (measures): use --backend "
                   "simulate or cuda")

    def device_name(self) -> str:
        return device_name()

    def describe(self) -> str:
        return "measuring live tensor bytes on the CPU"

    def check(self, opts: dict, notes: list) -> None:
        if str(opts.get("parallel", "none")) != "none":
            raise UsageError(f"--parallel {opts['parallel']}: the cpu backend has no parallel runs: predict with "
                             f"--backend simulate (rank 0 on a fake process group), or measure world size 1 with "
                             f"--backend cuda", option="parallel")
        budget = opts.get("budget")
        if budget not in (None, "device"):
            notes.append(f"memprof: note: on the cpu backend --budget {budget} caps live tensor bytes at the card's "
                         f"usable memory (emulated on the host, no allocator model)")

    def run(self, spec, out_dir: str | None = None, **options):
        return as_outcome(measure(spec, **options))

    def device(self, budget: str | None = None, **kwargs):
        raise UsageError("the cpu backend measures steps given as functions (memprof.measure_step, the pytest "
                         "plugin), not a script: a script's CUDA calls need --backend simulate (predicts) or cuda "
                         "(measures on a GPU)")

    def run_step(self, build, step, batch, *, budget: str | None, steps: int, label: str | None,
                 rules: str = "cuda"):
        """A user's own step on real CPU tensors: peak live tensor bytes (memprof.script.steps.cpu_rules_step); no
        script runs here (its CUDA calls need a device: simulate or cuda)."""
        from memprof.script.steps import cpu_rules_step

        return cpu_rules_step(build, step, batch, steps=steps, budget=budget, label=label, fake=False)


def device_name() -> str:
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def measure(spec: RunSpec, **_) -> tuple[str, dict]:
    budget = None if spec.budget == "device" else parse_budget(spec.budget)
    limit = budget.usable_bytes if budget else None
    base = {"budget_device": budget.label if budget else "host memory (no cap)",
            "budget_bytes": budget.total_bytes if budget else None}
    try:
        t = trace(spec, rules=(), fake=False, limit_bytes=limit)
    except torch.OutOfMemoryError as oom:
        return "oom", {**base, "oom": {"phase": getattr(oom, "phase", None), "step": getattr(oom, "step", None),
                                       "requested_bytes": getattr(oom, "requested_bytes", None),
                                       "live_bytes": getattr(oom, "live_bytes", None), "usable_bytes": limit,
                                       "message": str(oom).splitlines()[0]}}
    peak = live_peak(t)
    phase, step = phase_at(t.events, peak.peak_index)
    return "ok", {
        "peak_live_bytes": peak.peak_bytes,
        "peak_to_floor_ratio": peak_to_floor(peak.peak_bytes, t.extra.get("floor_bytes")),
        "phase_peak_live_bytes": peak.phase_peaks,
        "peak_phase": phase,
        "peak_step": step,
        "peak_op": t.events[peak.peak_index].op,
        "breakdown_at_peak_bytes": peak.breakdown,
        **common_metrics(t),
        "step_ms_median": median_ms(t.step_ms),
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **base,
    }
