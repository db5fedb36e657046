"""What to run: a frozen, hashable run spec and the grid a command line expands into.

Specs say what is run; results (memprof.results) say what was found. A combination that cannot run is
kept in the grid with the reason it is skipped, so nothing is dropped silently.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from memprof.budget import DEFAULT_BUDGET
from memprof.errors import UsageError
from memprof.models import ModelInfo
from memprof.optims import OptimInfo

MIN_STEPS = 2  # the optimizer creates its state in step 1; step 2 runs with that state present


@dataclass(frozen=True)
class RunSpec:
    model: str
    optim: str
    grad_ckpt: bool = False
    state_bits: int = 32
    batch_size: int = 1
    precision: str = "fp32"
    steps: int = MIN_STEPS
    budget: str = DEFAULT_BUDGET
    num_classes: int = 10
    pretrained: str | None = None
    paged: bool = False  # 8-bit states in CUDA managed memory (bitsandbytes' paged optimizers)
    freeze: str | None = None  # --freeze GLOB[,GLOB]: the embedding freeze-embed freezes, overriding the model's
    input_shape: str | None = None  # --input-shape CxHxW, for a model that cannot say

    @property
    def key(self) -> str:
        """A stable, readable identity (used to resume and to compare runs)."""
        bits = f"{self.state_bits}bit" + ("-paged" if self.paged else "")
        return (f"{self.model}/{self.optim}/ckpt-{'on' if self.grad_ckpt else 'off'}/{bits}/"
                f"bs{self.batch_size}/{self.precision}/steps{self.steps}/{self.budget}"
                + (f"/freeze-{self.freeze}" if self.freeze else "")
                + (f"/input-{self.input_shape}" if self.input_shape else ""))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GridEntry:
    spec: RunSpec
    skip_reason: str | None = None


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} '{text}': give whole numbers separated by commas, e.g. {flag} 1,32") from None
    if not values:
        raise UsageError(f"{flag} is empty: give at least one value, e.g. {flag} 1")
    if min(values) < minimum:
        raise UsageError(f"{flag} {min(values)}: must be at least {minimum}")
    return values


def parse_switch(text: str, flag: str) -> list[bool]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("off", "on") for w in words):
        raise UsageError(f"{flag} '{text}': use off, on or off,on")
    return [w == "on" for w in dict.fromkeys(words)]


def skip_reason(model: ModelInfo, optim: OptimInfo, state_bits: int, paged: bool = False,
                grad_ckpt: bool = False) -> str | None:
    if grad_ckpt and model.grad_ckpt_reason:
        return model.grad_ckpt_reason
    if optim.freeze_embed and not model.embedding_modules:
        return f"{model.name} declares no embedding layer, so {optim.name} has nothing to freeze"
    if state_bits == 8 and optim.state_tensors_per_param == 0:
        return f"{optim.name} keeps no optimizer state, so 8-bit states change nothing"
    if state_bits == 8 and not optim.bnb_8bit:
        return f"bitsandbytes has no 8-bit version of {optim.name}"
    if paged and not optim.bnb_paged:
        return f"bitsandbytes has no paged version of {optim.name}"
    return None


def expand_grid(models: list[ModelInfo], optims: list[OptimInfo], grad_ckpt: list[bool],
                state_bits: list[int], batch_sizes: list[int], paged: bool = False, **common) -> list[GridEntry]:
    """The product of the axes, in the order given, each entry with its skip reason (or None)."""
    for bits in state_bits:
        if bits not in (32, 8):
            raise UsageError(f"--state-bits {bits}: use 32, 8 or 32,8")
    entries = []
    for m, o, ck, bits, bs in itertools.product(models, optims, grad_ckpt, state_bits, batch_sizes):
        spec = RunSpec(model=m.name, optim=o.name, grad_ckpt=ck, state_bits=bits, batch_size=bs,
                       paged=paged and bits == 8, **common)
        entries.append(GridEntry(spec, skip_reason(m, o, bits, spec.paged, ck)))
    return entries

