"""The NVML door and sampler, with injected fake NVML sources (no GPU needed)."""

import sys
import time
import types

from memprof.nvml import Nvml, Sampler


def test_sampler_keeps_peaks_and_other_processes():
    readings = iter([(100, 300), (250, 400), (200, 900), (150, 350)])
    last = [(150, 350)]

    def read():
        try:
            last[0] = next(readings)
        except StopIteration:
            pass
        return last[0]

    s = Sampler(read, period_s=0.001).start()
    time.sleep(0.05)
    r = s.stop()
    assert (r.process_peak_bytes, r.device_peak_bytes, r.others_peak_bytes) == (250, 900, 700)
    assert r.samples >= 4 and r.period_ms is not None and r.period_ms < 50


def test_sampler_thins_its_series():
    s = Sampler(lambda: (1, 2), period_s=0.0, keep=16).start()
    time.sleep(0.05)
    r = s.stop()
    assert r.samples > 16 and len(r.series) <= 16


def test_sampler_without_process_figures():
    r = Sampler(lambda: (None, 500), period_s=0.001).start()
    time.sleep(0.01)
    res = r.stop()
    assert res.process_peak_bytes is None and res.device_peak_bytes == 500 and res.others_peak_bytes is None


def test_nvml_missing_is_a_reason_not_an_error():
    nv = Nvml(0)  # no driver on this machine (or no bindings): never raises
    if not nv.available:
        assert nv.reason
        assert nv.read() == (None, None)


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
