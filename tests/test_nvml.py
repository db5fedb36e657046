"""The NVML door and sampler, with injected fake NVML sources and an injected clock (no GPU, no sleeps);
the real NVML is checked on whichever side of "present" this machine is."""

import sys
import threading
import types

import pytest

from memprof.backends.nvml import Nvml, Sampler

TICK_S = 0.005  # the fake clock advances this much per reading, and only then


class FakeSource:
    """read() -> (process, device) from a list (the last one repeats); advances the fake clock by TICK_S per
    reading and sets `enough` once `n` readings were taken."""

    def __init__(self, readings, n):
        self.readings, self.n, self.calls, self.now = list(readings), n, 0, 0.0
        self.enough = threading.Event()

    def read(self):
        value = self.readings[min(self.calls, len(self.readings) - 1)]
        self.calls += 1
        self.now += TICK_S
        if self.calls >= self.n:
            self.enough.set()
        return value

    def clock(self):
        return self.now


def sample(source: FakeSource, **kwargs):
    s = Sampler(source.read, period_s=0.0005, clock=source.clock, **kwargs).start()
    assert source.enough.wait(timeout=60), "the sampler thread never took its readings"
    return s.stop()


def test_sampler_keeps_peaks_and_other_processes():
    src = FakeSource([(100, 300), (250, 400), (200, 900), (150, 350)], n=4)
    r = sample(src)
    assert (r.process_peak_bytes, r.device_peak_bytes, r.others_peak_bytes) == (250, 900, 700)
    assert r.samples == src.calls >= 4
    assert r.period_ms == 1000 * TICK_S  # the clock advanced one tick per reading
    assert [row[1:] for row in r.series[:4]] == [[100, 300], [250, 400], [200, 900], [150, 350]]
    assert [row[0] for row in r.series[:4]] == [5.0, 10.0, 15.0, 20.0]


def test_sampler_peaks_fail_on_other_readings():
    """Negative control: the same check on readings whose peaks differ does not pass."""
    r = sample(FakeSource([(100, 300), (260, 400), (200, 950), (150, 350)], n=4))
    assert (r.process_peak_bytes, r.device_peak_bytes, r.others_peak_bytes) != (250, 900, 700)


def test_sampler_thins_its_series_evenly():
    src = FakeSource([(1, 2)], n=200)
    r = sample(src, keep=16)
    assert r.samples == src.calls >= 200
    assert 8 <= len(r.series) < 16
    times = [row[0] for row in r.series]
    gaps = {round(b - a, 2) for a, b in zip(times, times[1:])}
    assert len(gaps) == 1 and gaps.pop() >= 1000 * TICK_S * 16  # one spacing: every 16th reading or sparser


def test_sampler_without_process_figures():
    res = sample(FakeSource([(None, 500)], n=3))
    assert res.process_peak_bytes is None and res.device_peak_bytes == 500 and res.others_peak_bytes is None
    assert res.samples >= 3


def _real_nvml():
    return Nvml(0)


@pytest.mark.skipif(_real_nvml().available, reason="NVML works on this machine (checked by the next test)")
def test_without_nvml_is_a_reason_not_an_error():
    nv = Nvml(0)  # no driver here (or no bindings): never raises
    assert not nv.available and nv.reason
    assert nv.read() == (None, None) and nv.device_used_bytes() is None


@pytest.mark.skipif(not _real_nvml().available, reason="no NVML on this machine (checked by the previous test)")
def test_with_nvml_device_and_process_memory():
    import torch

    nv = Nvml(0)
    assert nv.reason is None and nv.device_used_bytes() > 0
    if not torch.cuda.is_available():
        return
    torch.cuda.init()
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # 256 MiB on top of the CUDA context
    torch.cuda.synchronize()
    proc, dev = nv.read()
    if proc is None:  # a container without PID visibility: it must say so
        assert "PID" in nv.reason or "per-process" in nv.reason
    else:
        assert proc >= x.numel() and dev >= proc
    del x


def _fake_pynvml(procs, used=1000):
    class NVMLError(Exception):
        pass

    mod = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetHandleByUUID=lambda u: (_ for _ in ()).throw(NVMLError("not found")),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used),
        nvmlDeviceGetComputeRunningProcesses=lambda h: procs,
    )
    return mod


def test_process_memory_is_attributed_by_pid(monkeypatch):
    import os

    procs = [types.SimpleNamespace(pid=1, usedGpuMemory=5000),
             types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=700)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(procs))
    nv = Nvml(0, uuid="abc")
    assert nv.available
    assert nv.read() == (700, 1000)  # the other process's 5000 B is not ours


def test_no_pid_visibility_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([types.SimpleNamespace(pid=1, usedGpuMemory=5)]))
    nv = Nvml(0)
    assert nv.process_bytes() is None and "PID" in nv.reason


def test_init_failure_is_a_reason(monkeypatch):
    fake = _fake_pynvml([])
    fake.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nv = Nvml(0)
    assert not nv.available and "Driver Not Loaded" in nv.reason
