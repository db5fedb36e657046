"""Device budgets: how much memory a target card has, and the per-card facts the simulation needs.

The CUDA context is not visible to torch.cuda but takes device memory; its size here is an estimate
(PyTorch PR 86509 measured 287 MB with lazy module loading, the default since torch 1.13; cuBLAS and cuDNN
handles add more). The `cuda` backend measures it; the simulation only uses it to decide whether a
configuration fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprof.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30
CONTEXT_ESTIMATE_BYTES = 400 * MiB
NOMINAL_TOLERANCE = 0.03  # card names carry nominal sizes; real cards report up to a few % less


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    label: str
    total_bytes: int
    compute_capability: tuple[int, int] | None  # None: unknown (a bare size); pre-Hopper rules apply
    context_bytes: int = CONTEXT_ESTIMATE_BYTES

    @property
    def usable_bytes(self) -> int:
        """What the caching allocator can reserve: the card minus the CUDA context."""
        return self.total_bytes - self.context_bytes


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("titan-x", "NVIDIA GeForce GTX TITAN X, 12 GiB (the paper's card)", 12 * GiB, (5, 2)),
    DeviceProfile("v100-16g", "NVIDIA Tesla V100, 16 GiB", 16 * GiB, (7, 0)),
    DeviceProfile("a100-40g", "NVIDIA A100, 40 GiB", 40 * GiB, (8, 0)),
    DeviceProfile("a100-80g", "NVIDIA A100, 80 GiB", 80 * GiB, (8, 0)),
    DeviceProfile("rtx4090", "NVIDIA GeForce RTX 4090, 24 GiB", 24 * GiB, (8, 9)),
    DeviceProfile("h100-80g", "NVIDIA H100, 80 GiB", 80 * GiB, (9, 0)),
    DeviceProfile("h200", "NVIDIA H200, 141 GB", 143771 * MiB, (9, 0)),
)}

DEFAULT_BUDGET = "titan-x"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB)(?:@(\d+)\.(\d+))?\s*$")


def parse_budget(text: str) -> DeviceProfile:
    """A card name from PROFILES, or a size such as `12GiB` or `11264MiB`, optionally with the card's compute
    capability (`143771MiB@9.0`), which decides e.g. the cuBLAS workspace size."""
    if text in PROFILES:
        return PROFILES[text]
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"malformed --budget '{text}': use a card ({', '.join(PROFILES)}) or a size like 12GiB "
                         f"(optionally @<compute capability>, e.g. 80GiB@9.0)")
    size = int(float(m.group(1)) * (GiB if m.group(2) == "GiB" else MiB))
    if size <= CONTEXT_ESTIMATE_BYTES:
        raise UsageError(f"--budget {text} is smaller than the CUDA context alone (~400 MiB): give a larger size")
    cc = (int(m.group(3)), int(m.group(4))) if m.group(3) else None
    return DeviceProfile(text, f"{text} device" + ("" if cc else " (compute capability unknown)"), size, cc)
