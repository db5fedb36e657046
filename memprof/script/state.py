"""Which simulated device is in force, and whether code runs inside it (shared by the modules of memprof.script).

Device tensors are fake CPU tensors (memprof.script.device). Outside dispatch they report `cuda:0` to the user's
code (`Tensor.device`, `is_cuda`); inside `internal()` blocks (dispatch, the rules, torch code that computes with
them) they report their real (CPU) device.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch
from torch._subclasses.fake_tensor import FakeTensor

CUDA0 = torch.device("cuda", 0)
META = torch.device("meta")
TORCH_DIR = os.path.dirname(torch.__file__)
MEMPROF_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULE_APPLY = torch.nn.Module._apply.__code__


class _Internal(threading.local):
    depth = 0


INTERNAL = _Internal()
ACTIVE: list = []  # the SimulatedCuda in force (one at a time)


@contextlib.contextmanager
def internal():
    """Within, fake tensors report their real (CPU) device: code that computes them (dispatch, rules) runs."""
    INTERNAL.depth += 1
    try:
        yield
    finally:
        INTERNAL.depth -= 1


def is_sim(t) -> bool:
    """Whether `t` is a tensor on the simulated device."""
    return type(t) is FakeTensor and bool(ACTIVE) and t.fake_mode is ACTIVE[-1].fake_mode


def cuda_index(dev):
    """The CUDA device index `dev` names (0 for `cuda`), or None when it names no CUDA device."""
    if isinstance(dev, torch.device):
        return (dev.index or 0) if dev.type == "cuda" else None
    if isinstance(dev, str):
        kind, _, index = dev.partition(":")
        if kind.strip() != "cuda":
            return None
        return int(index) if index.strip().isdigit() else 0
    if isinstance(dev, int) and not isinstance(dev, bool):
        return dev
    return None


def is_cuda_device(dev) -> bool:
    return cuda_index(dev) is not None


def is_cpu_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cpu"
    return isinstance(dev, str) and dev.split(":")[0].strip() == "cpu"


def under_module_apply(depth: int = 2) -> bool:
    """Whether the caller runs inside torch.nn.Module._apply (Module.to / cuda / cpu / to_empty / half ...)."""
    f = sys._getframe(depth)
    while f is not None:
        if f.f_code is _MODULE_APPLY:
            return True
        f = f.f_back
    return False


def from_torch(depth: int = 3) -> bool:
    """Whether the Tensor method being handled was called from torch's own Python code (`depth` frames up: the
    handler, then __torch_function__, then the caller)."""
    return sys._getframe(depth).f_code.co_filename.startswith(TORCH_DIR)


class CudaError(RuntimeError):
    """What CUDA itself raises for a call (an invalid device ordinal, ...): the script's own error, as on a card."""


def check_ordinal(device) -> None:
    """CUDA's refusal of a device the simulated machine does not have (one card: cuda:0)."""
    index = cuda_index(device)
    if index not in (None, 0, -1):
        raise CudaError("CUDA error: invalid device ordinal (the simulated machine has one card, cuda:0)")
