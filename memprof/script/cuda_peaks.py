"""torch.cuda's peaks per phase: the one way memprof measures them (the cuda backend's grid configurations,
memprof.backends.cuda, and user code on the measured device, memprof.script.measure).

At every phase boundary the device is synchronised, the phase that ends gets torch.cuda.max_memory_allocated (less
`base`, what the process held before the measured code) and max_memory_reserved, and the peaks are reset: the
overall peak is the largest phase peak.
"""

from __future__ import annotations

import torch

from memprof.vocabulary import STEP_PHASES as PHASES


class PhasePeaks:
    def __init__(self, base_bytes: int = 0):
        self.base_bytes = base_bytes
        self.allocated: dict = {}
        self.reserved: dict = {}
        self.current = "setup"

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def close(self) -> None:
        """The phase now running ends: its peaks are read and reset."""
        torch.cuda.synchronize()
        ph = self.current
        self.allocated[ph] = max(self.allocated.get(ph, 0), torch.cuda.max_memory_allocated() - self.base_bytes)
        self.reserved[ph] = max(self.reserved.get(ph, 0), torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def enter(self, name: str) -> None:
        self.close()
        self.current = name

    def metrics(self) -> dict:
        """The record's peak fields (measured)."""
        allocated, reserved = self.allocated, self.reserved
        return {"peak_allocated_bytes": max(allocated.values()) if allocated else 0,
                "peak_reserved_bytes": max(reserved.values()) if reserved else 0,
                "peak_phase": max(allocated, key=allocated.get) if allocated else None,
                "phase_peak_allocated_bytes": {p: allocated.get(p, 0) for p in PHASES},
                "phase_peak_reserved_bytes": {p: reserved.get(p, 0) for p in PHASES}}
