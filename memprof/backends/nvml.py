"""NVML through one guarded door, and a background sampler of this process's and the device's memory.

Every NVML call goes through `_call`, which turns any NVMLError into a "not available" reason; callers
get None and the reason, never an exception, so torch.cuda figures stand where NVML is missing or refuses
(no driver, a container without PID visibility).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple


class Nvml:
    """The NVML device that CUDA device `index` is, or why NVML is not available."""

    def __init__(self, index: int = 0, uuid: str | None = None):
        self.reason: str | None = None
        self._nv = None
        self._handle = None
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
            return
        self._nv = pynvml
        self._call(pynvml.nvmlInit)
        if self.reason:
            return
        handle = None
        if uuid:
            handle = self._call(pynvml.nvmlDeviceGetHandleByUUID, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        if handle is None:
            self.reason = None
            handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
        self._handle = handle

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # NVMLError_* (and ctypes errors without a driver): not available
            self.reason = f"{fn.__name__}: {exc}"
            return None

    def device_used_bytes(self) -> int | None:
        if not self.available:
            return None
        info = self._call(self._nv.nvmlDeviceGetMemoryInfo, self._handle)
        return None if info is None else int(info.used)

    def process_bytes(self, pid: int | None = None) -> int | None:
        """This process's usedGpuMemory, found by PID (other processes on the GPU do not count)."""
        if not self.available:
            return None
        pid = pid or os.getpid()
        procs = self._call(self._nv.nvmlDeviceGetComputeRunningProcesses, self._handle)
        if procs is None:
            return None
        for p in procs:
            if p.pid == pid:
                if p.usedGpuMemory is None:
                    self.reason = "NVML does not report per-process memory here"
                    return None
                self.reason = None
                return int(p.usedGpuMemory)
        self.reason = f"PID {pid} is not among NVML's compute processes (no PID visibility in this container?)"
        return None

    def read(self) -> tuple[int | None, int | None]:
        return self.process_bytes(), self.device_used_bytes()


@dataclass
class SamplerResult:
    process_peak_bytes: int | None
    device_peak_bytes: int | None
    others_peak_bytes: int | None  # device used minus this process, at its largest
    samples: int
    period_ms: float | None  # the period achieved
    series: list = field(default_factory=list)  # [t_ms, process_bytes, device_bytes], at most `keep` rows


class Sampler:
    """Polls `read() -> (process_bytes, device_bytes)` every `period_s` on a daemon thread, keeping peaks
    and a time series thinned to at most `keep` rows; times come from `clock` (seconds)."""

    def __init__(self, read, period_s: float = 0.005, keep: int = 500, clock=time.perf_counter):
        self.read, self.period_s, self.keep, self.clock = read, period_s, keep, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memprof-nvml", daemon=True)
        self._proc = self._dev = self._others = None
        self._samples = 0
        self._series: list = []
        self._t0 = 0.0

    def _run(self) -> None:
        stride = 1
        while not self._stop.is_set():
            proc, dev = self.read()
            self._samples += 1
            if proc is not None:
                self._proc = max(self._proc or 0, proc)
            if dev is not None:
                self._dev = max(self._dev or 0, dev)
            if proc is not None and dev is not None:
                self._others = max(self._others or 0, dev - proc)
            if self._samples % stride == 0:
                self._series.append([round(1000 * (self.clock() - self._t0), 2), proc, dev])
                if len(self._series) >= self.keep:
                    self._series = self._series[1::2]  # keeps samples stride*2, stride*4, ...: evenly spaced
                    stride *= 2
            self._stop.wait(self.period_s)

    def start(self) -> "Sampler":
        self._t0 = self.clock()
        self._thread.start()
        return self

    def stop(self) -> SamplerResult:
        self._stop.set()
        self._thread.join()
        elapsed = self.clock() - self._t0
        return SamplerResult(self._proc, self._dev, self._others, self._samples,
                             round(1000 * elapsed / self._samples, 3) if self._samples else None, self._series)


WANDB_PERIOD_S = 15.0  # the paper's figures: Weights & Biases system metrics, one reading per 15 s


def periodic_reading(series: list, period_s: float = WANDB_PERIOD_S, near: float = 0.05) -> dict | None:
    """What a sampler reading process memory every `period_s` would have recorded, from a finely sampled
    series [[t_ms, process_bytes, device_bytes], ...]: the true peak; the least such a sampler can report
    (an unlucky phase: its highest reading over the run, minimised over where its first reading falls);
    how many readings the run allows; and the share of the run's time spent within `near` of the peak (the
    chance one reading lands there). Samples hold until the next one (step-wise series)."""
    points = [(t / 1000, b) for t, b, _ in series if b is not None]
    if len(points) < 2:
        return None
    t0, t_end = points[0][0], points[-1][0]
    run_s = t_end - t0
    peak = max(b for _, b in points)

    def value_at(t: float) -> int:
        last = points[0][1]
        for ts, b in points:
            if ts > t:
                break
            last = b
        return last

    offsets = [t0 + period_s * k / 200 for k in range(200)]  # where the first reading falls, over one period
    recorded = []
    for first in offsets:
        readings = [value_at(t) for t in _frange(first, t_end, period_s)]
        recorded.append(max(readings) if readings else None)
    seen = [r for r in recorded if r is not None]
    near_s = sum(b_t - a_t for (a_t, a), (b_t, _) in zip(points, points[1:]) if a >= (1 - near) * peak)
    return {"period_s": period_s, "run_s": round(run_s, 3), "readings_at_most": int(run_s // period_s) + 1,
            "peak_bytes": peak, "lowest_recorded_bytes": min(seen) if seen else None,
            "share_of_phases_with_no_reading": round(1 - len(seen) / len(recorded), 3),
            "share_of_time_near_peak": round(near_s / run_s, 4) if run_s > 0 else None}


def _frange(start: float, stop: float, step: float):
    t = start
    while t <= stop:
        yield t
        t += step


class GpuFacts(NamedTuple):
    name: str
    total_bytes: int
    compute_capability: tuple[int, int] | None


def device_facts(index: int | None = None) -> GpuFacts | None:
    """Name, total bytes and compute capability of the GPU CUDA would call device 0, from NVML alone (no CUDA
    context is made), or None where NVML does not answer. CUDA_VISIBLE_DEVICES' first entry (an index or a
    UUID) picks the GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    uuid = visible if visible.startswith(("GPU-", "MIG-")) else None
    if index is None:
        index = int(visible) if visible.isdigit() else 0
    nvml = Nvml(index, uuid)
    if not nvml.available:
        return None
    name = nvml._call(nvml._nv.nvmlDeviceGetName, nvml._handle)
    info = nvml._call(nvml._nv.nvmlDeviceGetMemoryInfo, nvml._handle)
    if name is None or info is None:
        return None
    cc = nvml._call(nvml._nv.nvmlDeviceGetCudaComputeCapability, nvml._handle)
    return GpuFacts(name.decode() if isinstance(name, bytes) else str(name), int(info.total),
                    tuple(cc) if cc else None)


def gpu_present() -> bool:
    """torch.cuda.is_available(), asked only where an NVIDIA driver answers NVML (or a device node exists):
    without one there is no CUDA GPU, and validating a command does not wait seconds for torch to import."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                return False
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver library, no driver, or no nvidia-ml-py: a device node still asks torch
        if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/dxg"):
            return False
    import torch

    return torch.cuda.is_available()
