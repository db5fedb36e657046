"""`torch.cuda`, `torch.accelerator` and `torch.Generator(device="cuda")` as the simulated device answers them.

The queries describe the budget's card (name, total memory, compute capability, L2 size); the memory figures
(`memory_allocated`, `max_memory_allocated`, `memory_reserved`, `max_memory_reserved`, `memory_stats`,
`memory_summary`, `mem_get_info`) are the simulation's own at that point (the device's `live()` allocator model),
so a script that prints its peak prints the record's. Streams and events are one stream, in order, with no timing.
A CUDA generator is a CPU generator that reports `cuda:0` (the simulated tensors are CPU tensors underneath).
"""

from __future__ import annotations

import contextlib
import types

import torch

from memprof.script.state import ACTIVE, CUDA0, CudaError, cuda_index, is_cuda_device


class Event:
    """torch.cuda.Event: records nothing; elapsed_time is 0 (no timing is simulated)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        if ACTIVE:
            ACTIVE[-1].note("timing", "torch.cuda.Event timings read 0 ms: the simulation predicts memory, not time")

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class Stream:
    """torch.cuda.Stream: one stream; everything runs in order."""

    device = CUDA0
    device_type = 1  # DeviceType.CUDA

    def __init__(self, *args, **kwargs):
        pass

    def is_capturing(self):
        return False

    def synchronize(self):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or Event()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DeviceContext:
    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def generator_class():
    """torch.Generator, accepting `device="cuda"` (a CPU generator underneath, reporting cuda:0)."""
    Original = torch._C.Generator

    class _Meta(type(Original)):
        def __instancecheck__(cls, obj):  # every generator is one, as with torch's own class
            return isinstance(obj, Original)

    class Generator(Original, metaclass=_Meta):
        def __new__(cls, device="cpu"):
            cuda = is_cuda_device(device)
            if cuda and cuda_index(device) not in (0, -1):
                raise CudaError("CUDA error: invalid device ordinal (the simulated machine has one card, cuda:0)")
            g = Original.__new__(cls, "cpu" if cuda else device)
            g._memprof_cuda = cuda
            return g

        def __init__(self, device="cpu"):
            pass

        @property
        def device(self):
            return CUDA0 if self._memprof_cuda else Original.device.__get__(self)

    Generator.__module__, Generator.__qualname__ = "torch", "Generator"
    return Generator


class CudaApi:
    """The replacements of one simulated block `sim` (its `device`, `live()`, `replayer`, `note`, `where`)."""

    def __init__(self, sim):
        self.sim = sim
        self.device = sim.device

    @property
    def name(self) -> str:
        return self.device.label.split(",")[0] if self.device.compute_capability else self.device.label

    def memory_allocated(self, device=None) -> int:
        return self.sim.live().allocated

    def max_memory_allocated(self, device=None) -> int:
        self.sim.live()
        return self.sim.replayer.peak_allocated

    def memory_reserved(self, device=None) -> int:
        return self.sim.live().reserved

    def max_memory_reserved(self, device=None) -> int:
        self.sim.live()
        return self.sim.replayer.peak_reserved

    def reset_peak_memory_stats(self, device=None) -> None:
        self.sim.live()
        self.sim.replayer.reset_peaks()
        self.sim.note("reset", f"torch.cuda.reset_peak_memory_stats() at {self.sim.where()}: the script's own "
                               "max_memory_* figures count from there; the record's peaks are over the whole run")

    def empty_cache(self) -> None:
        self.sim.live().release_cached()
        self.sim.note("empty_cache", f"torch.cuda.empty_cache() at {self.sim.where()}: the script's own reserved "
                                     "figures reflect it; the record's peak_reserved_bytes does not model it (it can "
                                     "only be higher than with it)")

    def memory_stats(self, device=None) -> dict:
        alloc = self.sim.live()
        peak_alloc, peak_reserved = self.sim.replayer.peak_allocated, self.sim.replayer.peak_reserved
        out = {"num_alloc_retries": 0, "num_ooms": 0, "num_device_alloc": alloc._segments}
        for name, cur, peak in (("allocated_bytes", alloc.allocated, peak_alloc),
                                ("reserved_bytes", alloc.reserved, peak_reserved),
                                ("active_bytes", alloc.allocated, peak_alloc)):
            out[f"{name}.all.current"], out[f"{name}.all.peak"] = cur, peak
        out["requested_bytes.all.current"] = self.sim.tracker.live_bytes
        return dict(sorted(out.items()))

    def memory_summary(self, device=None, abbreviated=False) -> str:
        alloc = self.sim.live()
        mib = 1 << 20
        peak_alloc, peak_reserved = self.sim.replayer.peak_allocated, self.sim.replayer.peak_reserved
        return (f"|  memprof simulated CUDA device: {self.name} (predicted, not measured)\n"
                f"|  Allocated memory: {alloc.allocated / mib:10.1f} MiB (peak {peak_alloc / mib:.1f} MiB)\n"
                f"|  Reserved memory:  {alloc.reserved / mib:10.1f} MiB (peak {peak_reserved / mib:.1f} MiB)\n")

    def mem_get_info(self, device=None) -> tuple[int, int]:
        alloc = self.sim.live()
        total = self.device.total_bytes
        return max(0, total - self.device.context_bytes - alloc.reserved), total

    def properties(self, device=None):
        self._check(device)
        cc = self.device.compute_capability or (8, 0)
        return types.SimpleNamespace(name=self.name, total_memory=self.device.total_bytes, major=cc[0], minor=cc[1],
                                     multi_processor_count=108, L2_cache_size=self.device.l2_cache_bytes or 0,
                                     is_integrated=False, is_multi_gpu_board=False, gcnArchName="",
                                     uuid="memprof-simulated")

    def _check(self, device) -> None:
        index = device.index if isinstance(device, torch.device) else device
        if isinstance(index, str):
            index = cuda_index(index)
        if index not in (None, 0, -1):
            raise CudaError("CUDA error: invalid device ordinal (the simulated machine has one card, cuda:0)")

    def cuda_functions(self) -> dict:
        cc = self.device.compute_capability or (8, 0)
        name = self.name

        def set_device(device):
            self._check(device)

        def device_name(device=None):
            self._check(device)
            return name

        return {
            "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
            "set_device": set_device, "get_device_name": device_name,
            "get_device_capability": lambda device=None: cc, "get_device_properties": self.properties,
            "is_bf16_supported": lambda including_emulation=True: True,
            "is_current_stream_capturing": lambda: False, "synchronize": lambda device=None: None,
            "empty_cache": self.empty_cache,
            "memory_allocated": self.memory_allocated, "max_memory_allocated": self.max_memory_allocated,
            "memory_reserved": self.memory_reserved, "max_memory_reserved": self.max_memory_reserved,
            "memory_cached": self.memory_reserved, "max_memory_cached": self.max_memory_reserved,
            "reset_peak_memory_stats": self.reset_peak_memory_stats,
            "reset_max_memory_allocated": self.reset_peak_memory_stats,
            "reset_max_memory_cached": self.reset_peak_memory_stats,
            "memory_stats": self.memory_stats, "memory_summary": self.memory_summary, "mem_get_info": self.mem_get_info,
            "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda new_state, device="cuda": None,
            "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)],
            "set_rng_state_all": lambda new_states: None,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None, "seed": lambda: None,
            "seed_all": lambda: None, "initial_seed": lambda: 0, "device": _DeviceContext, "device_of": _DeviceContext,
            "get_arch_list": lambda: [f"sm_{cc[0]}{cc[1]}"],
            "current_stream": lambda device=None: Stream(), "default_stream": lambda device=None: Stream(),
            "Stream": Stream, "Event": Event, "stream": lambda stream=None: contextlib.nullcontext(),
            "is_tf32_supported": lambda: cc >= (8, 0), "init": lambda: None, "is_initialized": lambda: True,
            "_lazy_init": lambda: None,
        }

    def accelerator_functions(self) -> dict:
        """torch.accelerator (and torch.accelerator.memory) as the simulated CUDA device answers them."""
        return {
            "is_available": lambda: True, "device_count": lambda: 1,
            "current_accelerator": lambda check_available=False: torch.device("cuda"),
            "current_device_index": lambda: 0, "current_device_idx": lambda: 0,
            "set_device_index": lambda device: self._check(device), "set_device_idx": lambda device: self._check(device),
            "current_stream": lambda device=None: Stream(), "synchronize": lambda device=None: None,
            "empty_cache": self.empty_cache, "memory_stats": self.memory_stats,
            "memory_allocated": self.memory_allocated, "max_memory_allocated": self.max_memory_allocated,
            "memory_reserved": self.memory_reserved, "max_memory_reserved": self.max_memory_reserved,
            "reset_peak_memory_stats": self.reset_peak_memory_stats,
        }

    def install(self, patches) -> None:
        import importlib
        import sys

        # torch.cuda and its submodules (torch.cuda.memory, torch.cuda.random, ...): each holds its own references
        cuda_mods = [m for n, m in list(sys.modules.items()) if (n == "torch.cuda" or n.startswith("torch.cuda."))
                     and m is not None]
        for fname, fn in self.cuda_functions().items():
            for mod in cuda_mods:
                if fname in vars(mod) and callable(vars(mod)[fname]):
                    patches.set(mod, fname, fn)
        for mod in (importlib.import_module("torch.accelerator"), sys.modules.get("torch.accelerator.memory")):
            for fname, fn in self.accelerator_functions().items():
                if mod is not None and fname in vars(mod):
                    patches.set(mod, fname, fn)
        queued = list(torch.cuda._queued_calls)
        patches.callback(lambda: torch.cuda._queued_calls.__setitem__(slice(None), queued))
        patches.set(torch, "Generator", generator_class())
