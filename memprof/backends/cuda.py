"""Backend `cuda`: measured peak memory from torch.cuda and NVML, one configuration per process.

Method, in order: NVML process and device memory are read before CUDA is initialised; CUDA is initialised
with one small tensor and the CUDA context is measured as NVML process memory minus torch's reserved
bytes; a smaller `--budget` than the card caps the caching allocator (set_per_process_memory_fraction)
so that usable memory matches that card after the measured context ("emulated"); the model is built on
the meta device and given storage on the GPU in `Module.to` order (memprof.harness.materialize), then the
optimizer. `reset_peak_memory_stats` follows, and the NVML sampler starts. At every phase boundary
(forward, backward, optimizer step) the device is synchronised, the phase's max_memory_allocated and
max_memory_reserved are read, and the peaks are reset: the overall peak is the largest phase peak, so
per-phase peaks do not clobber it. Step time is the median wall time of the steps after the first, each
bounded by synchronisations. Only torch.OutOfMemoryError is caught: status `oom` with the phase, the
bytes requested and what was allocated and reserved then. `--snapshot DIR` records allocator history and
dumps a snapshot that https://pytorch.org/memory_viz opens (on an OOM too).

A parallel spec (`--parallel ddp|fsdp --world-size 1`) trains under real DDP or FSDP2 on a world-size-1 NCCL
process group (memprof.backends.distributed). `MEMPROF_CUDA_SDPA_DISABLE=cudnn[,flash,efficient,math]` turns
those scaled_dot_product_attention kernels off for the measurement (torch.backends.cuda.enable_*_sdp), e.g. so
that bf16 runs the flash kernel the simulation predicts where torch would prefer cuDNN attention; the record
names the kernels that were enabled.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time

import torch

from memprof.budget import NOMINAL_TOLERANCE, GiB, parse_budget
from memprof.errors import UsageError
from memprof.adapters import model_split
from memprof.harness import apply_precision, load_visual, materialize, prepare, sdpa_kernels, train_steps
from memprof.backends import distributed
from memprof.backends.base import MEASURED, Backend, as_outcome
from memprof.backends.nvml import Nvml, Sampler, gpu_present, periodic_reading
from memprof.optims import build_optimizer
from memprof.spec import RunSpec
from memprof.script.cuda_peaks import PhasePeaks
from memprof.simulation.tracing import floor, peak_to_floor

_REQUEST = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB)")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def requested_bytes(message: str) -> int | None:
    """The size in torch's OOM message ("Tried to allocate 2.00 GiB"), as precise as the message is."""
    m = _REQUEST.search(message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def emulation_fraction(budget_bytes: int, context_bytes: int, device_total_bytes: int) -> float:
    """The allocator cap that leaves a process `budget - context` bytes, as on a card of `budget` bytes (a
    nominal size a few % above this card's counts as this card)."""
    if budget_bytes > device_total_bytes * (1 + NOMINAL_TOLERANCE):
        raise UsageError(f"--budget of {budget_bytes / GiB:.1f} GiB is larger than this GPU "
                         f"({device_total_bytes / GiB:.1f} GiB): pick a smaller budget or `device`")
    return min(1.0, max(0.0, (budget_bytes - context_bytes) / device_total_bytes))


DEFAULT_NVML_PERIOD_MS = 5.0


class CudaBackend(Backend):
    """Measured on this machine's GPU, each configuration in a fresh process, one at a time."""

    name = "cuda"
    source = MEASURED
    isolation = "fresh-process"  # peaks and the CUDA context are per process
    exclusive = True
    default_budget = "device"
    takes = frozenset({"snapshot", "nvml_period_ms"})
    gpus = 1

    def unavailable(self) -> str | None:
        return None if gpu_present() else ("needs a CUDA GPU and none is visible: use --backend simulate "
                                           "(predicts) or --backend cpu (measures on the CPU)")

    def device_name(self) -> str:
        return device_name()

    def describe(self) -> str:
        return f"measuring on {self.device_name()} with torch.cuda and NVML"

    def check(self, opts: dict, notes: list) -> None:
        budget = opts.get("budget")
        if budget not in (None, "device"):
            total = self.device_total_bytes()
            profile = parse_budget(budget)
            if profile.total_bytes > total * (1 + NOMINAL_TOLERANCE):
                raise UsageError(f"--budget {budget} ({profile.total_bytes / GiB:.0f} GiB) is larger than this GPU "
                                 f"({total / GiB:.0f} GiB): pick a smaller budget, or `device`", option="budget")
        world = opts.get("world_size", 1)
        if str(opts.get("parallel", "none")) != "none" and world != 1:
            raise UsageError(f"--world-size {world}: one GPU measures world size 1 (real DDP/FSDP on NCCL): use "
                             f"--world-size 1, or predict rank 0 of {world} with --backend simulate",
                             option="world_size")

    def worker_options(self, opts: dict) -> dict:
        period = opts.get("nvml_period_ms")
        return {"snapshot_dir": opts.get("snapshot"),
                "nvml_period_ms": DEFAULT_NVML_PERIOD_MS if period is None else period}

    def device_total_bytes(self) -> int | None:
        from memprof.backends.nvml import device_facts

        facts = device_facts()
        return facts.total_bytes if facts else torch.cuda.get_device_properties(0).total_memory

    def device(self, budget: str | None = None, *, steps: int | None = None, user_file: str | None = None,
               label: str | None = None, world_size: int | None = None):
        """This machine's GPU, measured (memprof.script.measure.MeasuredCuda)."""
        from memprof.script.measure import MeasuredCuda

        return MeasuredCuda(budget, steps=steps, user_file=user_file, label=label, world_size=world_size)

    def run(self, spec, out_dir: str | None = None, **options):
        return as_outcome(measure(spec, **options))


def device_name() -> str:
    """The GPU's name, from NVML where it answers (the parent of a measurement initialises no CUDA context
    on the card it measures), else from torch."""
    from memprof.backends.nvml import device_facts

    facts = device_facts()
    if facts is not None:
        return facts.name
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"




def measure(spec: RunSpec, snapshot_dir: str | None = None, nvml_period_ms: float = 5.0) -> tuple[str, dict]:
    if not torch.cuda.is_available():
        raise UsageError("--backend cuda needs a CUDA GPU: use --backend simulate (predicts) or cpu")
    props = torch.cuda.get_device_properties(0)
    nvml = Nvml(0, str(getattr(props, "uuid", "")) or None)
    device_before = nvml.device_used_bytes()  # no process entry exists before CUDA is initialised
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    process_after_init = nvml.process_bytes()
    context = None if process_after_init is None else process_after_init - torch.cuda.memory_reserved()
    metrics: dict = {"device_name": props.name, "device_total_bytes": props.total_memory,
                     "compute_capability": f"{props.major}.{props.minor}",
                     "nvml_device_before_init_bytes": device_before, "context_bytes": context,
                     "sdpa_kernels_enabled": sdpa_kernels()}
    if spec.budget != "device":
        budget = parse_budget(spec.budget)
        fraction = emulation_fraction(budget.total_bytes, context or budget.context_bytes, props.total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction)
        metrics.update(budget_device=f"emulated {budget.name} ({budget.total_bytes / GiB:.0f} GiB) on {props.name}",
                       budget_bytes=budget.total_bytes, allocator_fraction=round(fraction, 6))
    else:
        metrics.update(budget_device=props.name, budget_bytes=props.total_memory)
    if snapshot_dir:
        torch.cuda.memory._record_memory_history(max_entries=200_000)

    with torch.device("meta"):
        prepared = prepare(spec, load_weights=False)
        apply_precision(prepared.model, spec)
    peaks = PhasePeaks()  # (memprof.script.cuda_peaks: the one way phase peaks are measured)
    state = {"step": 0, "starts": []}

    def on_phase(phase, step):
        peaks.enter(phase)
        if phase == "done" or (phase == "forward" and step != state.get("timed")):  # a step's first micro-step
            state["timed"] = step
            state["starts"].append(time.perf_counter())
        state["step"] = step

    sampler = Sampler(nvml.read, nvml_period_ms / 1000).start() if nvml.available and nvml_period_ms > 0 else None
    status = "ok"
    world = contextlib.ExitStack()  # a parallel spec's process group, destroyed once the steps end
    try:
        world.enter_context(distributed.world1(spec, "cuda"))
        model = prepared.model
        materialize(model, "cuda")  # setup: an OOM here (a small emulated budget) is a result too
        if prepared.pretrained_state is not None:
            load_visual(model, prepared.pretrained_state)
        model = distributed.wrap(model, spec, "cuda")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(prepared.optim_info, trainable, spec.state_bits, spec.paged, spec.optim_impl,
                                    spec.optim_in_backward)
        torch.cuda.synchronize()
        metrics.update(params_total=sum(p.numel() for p in model.parameters()),
                       params_trainable=sum(p.numel() for p in trainable), frozen_parameter_names=prepared.frozen,
                       setup_allocated_bytes=torch.cuda.memory_allocated(), **model_split(model, trainable))
        peaks.close()
        train_steps(model, optimizer, spec, "cuda", on_phase)
        metrics.update(floor(model, trainable, optimizer))
    except torch.OutOfMemoryError as oom:
        status = "oom"
        metrics["oom"] = {"phase": peaks.current, "step": state["step"],
                          "requested_bytes": requested_bytes(str(oom)),
                          "allocated_bytes": torch.cuda.memory_allocated(),
                          "reserved_bytes": torch.cuda.memory_reserved(),
                          "message": str(oom).splitlines()[0][:300]}
        peaks.close()
    finally:
        sampled = sampler.stop() if sampler else None
        world.close()
    stats = torch.cuda.memory_stats()
    starts = state["starts"]
    step_ms = [1000 * (b - a) for a, b in zip(starts[1:], starts[2:])]
    metrics.update(peaks.metrics())
    metrics.update({
        "peak_to_floor_ratio": peak_to_floor(metrics["peak_allocated_bytes"], metrics.get("floor_bytes")),
        "step_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
        # current values and counters only: the ".peak" ones were reset at every phase boundary
        "allocator_stats": {k: v for k, v in stats.items() if k.endswith(".all.current") or k.startswith("num_")},
        "nvml_available": sampled is not None and sampled.process_peak_bytes is not None,
        "nvml_reason": nvml.reason,
    })
    if sampled is not None:
        metrics.update(nvml_process_peak_bytes=sampled.process_peak_bytes,
                       nvml_device_peak_bytes=sampled.device_peak_bytes,
                       nvml_others_peak_bytes=sampled.others_peak_bytes, nvml_samples=sampled.samples,
                       nvml_period_ms=sampled.period_ms, nvml_series=sampled.series,
                       nvml_15s_sampler=periodic_reading(sampled.series))
    if snapshot_dir:
        metrics["snapshot_file"] = _dump_snapshot(snapshot_dir, spec)
    return status, metrics


def _dump_snapshot(snapshot_dir: str, spec: RunSpec) -> str:
    """The recorded snapshot, named by the record key (`<key>@cuda.pickle`, beside the simulation's
    `<key>@simulate.pickle` for the same configuration); returns its absolute path."""
    from memprof.records import record_key
    from memprof.reports.snapshot import snapshot_name

    os.makedirs(snapshot_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(snapshot_dir, snapshot_name(record_key(spec, "cuda"))))
    torch.cuda.memory._dump_snapshot(path)
    torch.cuda.memory._record_memory_history(enabled=None)
    return path
