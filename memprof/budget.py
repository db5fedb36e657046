"""Device budgets: how much memory a target card has, and the per-card facts the simulation needs.

The CUDA context is not visible to torch.cuda but takes device memory; its size here is an estimate
(PyTorch PR 86509 measured 287 MB with lazy module loading, the default since torch 1.13; cuBLAS and cuDNN
handles add more). The `cuda` backend measures it; the simulation only uses it to decide whether a
configuration fits.

Each card carries the facts that change what CUDA allocates: its compute capability (the cuBLAS workspace
size, the attention backward's workspace) and its L2 cache size (timm's foreach optimizers chunk their
update when it is at least 64 MiB), with where each figure comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprof.errors import UsageError, unknown_name

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# No GPU has more memory than this (the largest today, B300 / MI355X, have 288 GB): a larger budget is a typo.
MAX_CARD_BYTES = 512 * GiB
CONTEXT_ESTIMATE_BYTES = 400 * MiB
NOMINAL_TOLERANCE = 0.03  # card names carry nominal sizes; real cards report up to a few % less
CC_MAJORS = range(3, 13)  # Kepler (3.x) to Blackwell (12.x): the compute capabilities NVIDIA has shipped
SUPPORTED_ARCHS = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"  # torch.cuda.get_arch_list() of the torch 2.14 cu130 wheel


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    label: str
    total_bytes: int
    compute_capability: tuple[int, int] | None  # None: unknown (a bare size); pre-Hopper rules apply
    context_bytes: int = CONTEXT_ESTIMATE_BYTES
    l2_cache_bytes: int | None = None  # cudaDeviceProp.l2CacheSize; None: unknown (a bare size)
    source: str = ""  # where the size, compute capability and L2 figures come from

    @property
    def usable_bytes(self) -> int:
        """What the caching allocator can reserve: the card minus the CUDA context."""
        return self.total_bytes - self.context_bytes


_AMPERE = "NVIDIA Ampere GPU Architecture Tuning Guide 1.4.2.2 (A100: 40 MB L2)"
_HOPPER = "NVIDIA Hopper Tuning Guide 1.4.2.2 / NVIDIA H100 architecture blog (H100: 50 MB L2, 1.25x A100's 40 MB)"

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("titan-x", "12 GiB card today's PyTorch supports, modelled as sm_75 (the size of the paper's "
                  "GTX TITAN X, sm_52, which current wheels cannot run)",
                  12 * GiB, (7, 5), l2_cache_bytes=3 * MiB,
                  source="12 GiB: the paper's GTX TITAN X (GM200, 3 MB L2, sm_52); sm_75 because torch 2.14 wheels ship "
                         f"{SUPPORTED_ARCHS}; any Turing (sm_75) card has at most 6 MB of L2, far below timm's 64 MiB "
                         "chunking threshold, so the L2 figure changes nothing"),
    DeviceProfile("v100-16g", "NVIDIA Tesla V100, 16 GiB (sm_70: not run by today's torch wheels)", 16 * GiB, (7, 0),
                  l2_cache_bytes=6 * MiB, source="NVIDIA Tesla V100 GPU Architecture whitepaper (6144 KB L2)"),
    DeviceProfile("a100-40g", "NVIDIA A100, 40 GiB", 40 * GiB, (8, 0), l2_cache_bytes=40 * MiB, source=_AMPERE),
    DeviceProfile("a100-80g", "NVIDIA A100, 80 GiB", 80 * GiB, (8, 0), l2_cache_bytes=40 * MiB, source=_AMPERE),
    DeviceProfile("rtx4090", "NVIDIA GeForce RTX 4090, 24 GiB", 24 * GiB, (8, 9), l2_cache_bytes=72 * MiB,
                  source="NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090 spec table (72 MB L2 of AD102's 96 MB)"),
    DeviceProfile("h100-80g", "NVIDIA H100 SXM, 80 GiB", 80 * GiB, (9, 0), l2_cache_bytes=50 * MiB, source=_HOPPER),
    DeviceProfile("h200", "NVIDIA H200, 141 GB", 143771 * MiB, (9, 0), l2_cache_bytes=50 * MiB,
                  source=_HOPPER + "; H200 is the same GH100 die with more HBM3e"),
    DeviceProfile("rtx5090", "NVIDIA GeForce RTX 5090, 32 GiB", 32 * GiB, (12, 0), l2_cache_bytes=96 * MiB,
                  source="NVIDIA RTX Blackwell GPU Architecture whitepaper, GeForce RTX 5090 spec table (96 MB L2)"),
)}

DEFAULT_BUDGET = "titan-x"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(TiB|GiB|MiB)(?:@(\d+)\.(\d+))?\s*$")
_UNITS = {"TiB": TiB, "GiB": GiB, "MiB": MiB}


def format_size(nbytes: float | None) -> str:
    """Bytes as a person reads them: GiB from 0.1 GiB, MiB from 0.05 MiB, then KiB, then B (a small size
    never prints as 0.0 MiB)."""
    if nbytes is None:
        return "-"
    if abs(nbytes) >= GiB // 10:
        return f"{nbytes / GiB:.2f} GiB"
    if abs(nbytes) >= 0.05 * MiB:
        return f"{nbytes / MiB:.1f} MiB"
    if abs(nbytes) >= KiB:
        return f"{nbytes / KiB:.1f} KiB"
    return f"{nbytes:.0f} B"


def gib_figure(nbytes: float | None) -> str:
    """Bytes in GiB with two decimals, n/a for None (a report table's GiB column)."""
    return "n/a" if nbytes is None else f"{nbytes / GiB:.2f}"


def card_label(budget: str, total_bytes: int) -> str:
    """A budget as a person reads it: the card's name with its size (`titan-x (12 GiB)`), a bare size as a
    card of that size, `device` as the whole device."""
    size = f"{total_bytes / GiB:.0f} GiB" if total_bytes % GiB == 0 else format_size(total_bytes)
    if budget == "device":
        return f"the whole device ({size})"
    if _SIZE.match(budget):
        return f"a {size} card"
    return f"{budget} ({size})"


_LOOKS_LIKE_SIZE = re.compile(r"^\s*\d")
SIZE_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB,
              "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}
_PLAIN_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(" + "|".join(SIZE_UNITS) + r")\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(text: str, flag: str) -> int:
    """Bytes from a positive size such as `2GiB`, `2 GiB`, `512MiB`, `8 GB` or `100B` (binary units as every
    figure memprof prints, or decimal ones as card vendors write); the one size syntax of the package (flags,
    the pytest plugin's limits). Anything else is a one-line UsageError naming `flag`."""
    m = _PLAIN_SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{flag} {text!r}: give a size such as \"6 GiB\" or \"512 MiB\" "
                         f"(units: {', '.join(SIZE_UNITS)})")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def parse_headroom(text: str, usable_bytes: int, flag: str = "--headroom") -> int:
    """The bytes to keep free of `usable_bytes`: a share of it (`5%`) or a size (`1GiB`); at most half of it."""
    m = _PERCENT.match(str(text))
    if m and float(m.group(1)) == 0:
        return 0
    if not m and not _PLAIN_SIZE.match(str(text)):
        raise UsageError(f"{flag} '{text}': give a share of the card's usable memory (5%) or a size (1GiB)")
    held = round(usable_bytes * float(m.group(1)) / 100) if m else parse_size(text, flag)
    if held > usable_bytes // 2:
        raise UsageError(f"{flag} {text}: at most half the card's usable memory ({format_size(usable_bytes // 2)}), "
                         f"e.g. {flag} 5%")
    return held


def parse_budget(text: str) -> DeviceProfile:
    """A card name from PROFILES, or a size such as `12GiB` or `11264MiB`, optionally with the card's compute
    capability (`143771MiB@9.0`), which decides e.g. the cuBLAS workspace size. A bare size has no known L2
    cache size, so timm's L2-sized chunking is not applied (the prediction errs high for cards >= 64 MiB L2)."""
    if text in PROFILES:
        return PROFILES[text]
    m = _SIZE.match(text)
    if not m:
        if text.strip().startswith("-") and _LOOKS_LIKE_SIZE.match(text.strip()[1:]):
            raise UsageError(f"--budget {text}: a size must be positive, e.g. 12GiB")
        if not _LOOKS_LIKE_SIZE.match(text):
            raise unknown_name("budget", text, PROFILES, "memprof list budgets")
        raise UsageError(f"malformed --budget '{text}': use a card ({', '.join(PROFILES)}) or a size in GiB, MiB or "
                         f"TiB like 12GiB (optionally @<compute capability>, e.g. 80GiB@9.0)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size > MAX_CARD_BYTES:
        shown = "" if m.group(2) == "GiB" else f" ({size / GiB:,.0f} GiB)"
        raise UsageError(f"--budget {text}{shown} is larger than any card (the largest GPUs, B300 and MI355X, have "
                         f"288 GB; budgets go up to {MAX_CARD_BYTES // GiB} GiB): give the card's size, e.g. 80GiB")
    if size <= CONTEXT_ESTIMATE_BYTES:
        raise UsageError(f"--budget {text} is smaller than the CUDA context alone (~{CONTEXT_ESTIMATE_BYTES // MiB} MiB): "
                         f"give a larger size")
    cc = (int(m.group(3)), int(m.group(4))) if m.group(3) else None
    if cc is not None and (cc[0] not in CC_MAJORS or len(m.group(4)) != 1):
        raise UsageError(f"--budget {text}: no GPU has compute capability {m.group(3)}.{m.group(4)}; valid ones have a "
                         f"major of {CC_MAJORS.start} to {CC_MAJORS.stop - 1} and one minor digit, e.g. 7.5, 8.0, 8.6, "
                         f"8.9, 9.0, 10.0, 12.0")
    return DeviceProfile(text, f"{text} device" + ("" if cc else " (compute capability unknown)"), size, cc,
                         source="given on the command line")
