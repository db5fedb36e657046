"""Whose failure an exception raised under the simulated device is, and how it reads.

- **the simulation's** (a call it cannot simulate): memprof's UnsupportedCall, FakeTensorMode's refusals (an op
  without a shape function, one that needs the data: DataDependentOutputException, DynamicOutputShapeException),
  and anything raised inside memprof's own code or fake-tensor machinery. It reads as one line naming the call and
  the user's file:line (UnsupportedCall, a UsageError: exit 2).
- **the script's own**: everything else: its own `raise`, a check torch makes on CUDA too (`topk(5)` over 4
  classes, a second backward through a freed graph, a negative size), CUDA's own refusals (memprof.script.state
  CudaError: an invalid device ordinal), `input()` at the end of input. It reads as Python prints it: the
  traceback, without memprof's frames, and the exit code `python train.py` would give (1).
"""

from __future__ import annotations

import os
import traceback

from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          UnsupportedOperatorException)

from memprof.errors import UsageError
from memprof.script.state import MEMPROF_DIR, TORCH_DIR, CudaError

_FAKE_DIR = os.path.join(TORCH_DIR, "_subclasses", "")
_STDLIB = os.path.dirname(os.__file__)
_SIMULATION = (UnsupportedOperatorException, DataDependentOutputException, DynamicOutputShapeException)


class UnsupportedCall(UsageError):
    """A call the simulated device cannot honour; the message names the call and the user's file:line."""


def user_frame(tb=None, user_file: str | None = None):
    """(file, line, text) of the innermost frame of the user's code: in `user_file` when given, else outside
    torch, memprof and the standard library. From a traceback, or from the current stack."""
    frames = traceback.extract_tb(tb) if tb is not None else traceback.extract_stack()[:-1]
    for fr in reversed(frames):
        path = os.path.abspath(fr.filename)
        if user_file is not None:
            if path == os.path.abspath(user_file):
                return fr.filename, fr.lineno, (fr.line or "").strip()
            continue
        if path.startswith((TORCH_DIR, MEMPROF_DIR, _STDLIB)) or "site-packages" in path or fr.filename.startswith("<"):
            continue
        return fr.filename, fr.lineno, (fr.line or "").strip()
    if user_file is not None:
        return user_frame(tb, None)
    return None


def where(user_file: str | None = None) -> str:
    fr = user_frame(None, user_file)
    return f"{fr[0]}:{fr[1]}" if fr else "(unknown place)"


def _innermost(exc: BaseException) -> str:
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return os.path.abspath(last.tb_frame.f_code.co_filename) if last is not None else ""


def is_simulations(exc: BaseException) -> bool:
    """Whether `exc` is the simulation's failure, not the script's (see the module docstring)."""
    if isinstance(exc, CudaError):
        return False
    if isinstance(exc, (UnsupportedCall, *_SIMULATION)):
        return True
    return _innermost(exc).startswith((MEMPROF_DIR, _FAKE_DIR))


def explain(exc: BaseException, user_file: str | None = None) -> UnsupportedCall:
    """One line for the simulation's failure: the call and the user's file:line."""
    if isinstance(exc, UnsupportedCall):
        return exc
    fr = user_frame(exc.__traceback__, user_file)
    place = f"{fr[0]}:{fr[1]}" if fr else "(unknown place)"
    call = f" `{fr[2]}`" if fr and fr[2] else ""
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException)):
        op = getattr(exc, "func", None) or type(exc).__name__
        return UnsupportedCall(f"{place}:{call} needs tensor data ({op}), which the simulated device does not have: "
                               f"predict without it or measure on a GPU (--backend cuda)")
    if isinstance(exc, UnsupportedOperatorException):
        return UnsupportedCall(f"{place}:{call} runs {first}, which the simulation cannot run (no shape function)")
    return UnsupportedCall(f"{place}:{call} cannot be simulated: {type(exc).__name__}: {first} (memprof's failure, "
                           f"not the script's: MEMPROF_DEBUG=1 shows where)")


# frames that exist only because the op ran under the simulation's modes (dispatch, fake tensors, meta kernels)
_DISPATCH_FRAMES = tuple(os.path.join(TORCH_DIR, p) for p in (
    "_compile.py", "_dynamo" + os.sep, "_ops.py", "utils" + os.sep + "_stats.py", "_subclasses" + os.sep,
    "utils" + os.sep + "_python_dispatch.py", "overrides.py", "_meta_registrations.py", "_prims", "_refs",
    "_decomp" + os.sep, "__init__.py"))


def script_traceback(exc: BaseException) -> str:
    """The traceback Python prints for the script's own error, without memprof's and runpy's frames, nor the
    dispatch and fake-tensor frames the simulation adds between the script's call and torch's check."""
    frames = [fr for fr in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(fr.filename).startswith((MEMPROF_DIR, *_DISPATCH_FRAMES))
              and fr.filename != "<frozen runpy>" and not fr.filename.endswith(os.sep + "runpy.py")]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(type(exc), exc)]
    return "".join(lines)


class ScriptError(Exception):
    """The script's own error, raised again by the runner after the record is made: `error` is the original,
    `exit_code` what `python FILE` would exit with."""

    def __init__(self, error: BaseException, text: str, exit_code: int = 1):
        super().__init__(text)
        self.error, self.text, self.exit_code = error, text, exit_code
