"""What to run: a frozen, hashable run spec and the grid a command line expands into.

Specs say what is run; results (memprof.results) say what was found. A combination that cannot run is
kept in the grid with the reason it is skipped, so nothing is dropped silently.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, astuple, dataclass, fields, replace

from memprof.budget import DEFAULT_BUDGET
from memprof.errors import UsageError
from memprof.model_sources.base import ModelInfo
from memprof.optims import OptimInfo

MIN_STEPS = 2  # the optimizer creates its state in step 1; step 2 runs with that state present

# fp32: everything fp32. *-amp: forward and loss under autocast, fp32 master weights (fp16 with a GradScaler).
# bf16: the model itself in bfloat16 (weights, gradients, optimizer state).
PRECISIONS = ("fp32", "bf16-amp", "fp16-amp", "bf16")
AMP_DTYPES = {"bf16-amp": "bfloat16", "fp16-amp": "float16"}
MODEL_DTYPES = {"bf16": "bfloat16"}
OPTIM_IMPLS = ("foreach", "fused", "forloop")
CLEAR_GRADS = ("after-step", "before-backward")  # when a step's zero_grad(set_to_none=True) runs
MAX_GRAD_ACCUM = 1024  # micro-steps per optimizer step: each is traced (or run); past the first two they repeat
TRAIN_WHOLE, TRAIN_HEAD, TRAIN_LAST = "all", "head", "last:"  # --train: the whole model, the head, the last N blocks
PEFT_OFF, PEFT_METHODS, LORA_RANK, LORA_ALPHA = "off", ("lora", "dora"), 8, 16  # memprof.adapters
RESIDENTS = ("tower", "clip")  # clip: CLIP's text tower and logit scale also on the device, frozen and unused
DEFAULT_OPTIM_IMPL = "foreach"
PURE_FP16 = ("fp16 (the whole model in float16) is not supported: fp16 has too little range for gradients and "
             "optimizer state without loss scaling and fp32 master weights, so no recipe trains that way; use "
             "--precision fp16-amp (autocast with a GradScaler) or bf16")


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
    optim_impl: str = DEFAULT_OPTIM_IMPL  # foreach | fused | forloop (torch's implementations of the update)
    optim_in_backward: bool = False  # one optimizer per parameter, stepped from its post-accumulate-grad hook
    resident: str = "tower"  # what is on the device: the image tower (+ head), or the whole CLIP model ("clip")
    freeze: str | None = None  # --freeze GLOB[,GLOB]: the embedding freeze-embed freezes, overriding the model's
    input_shape: str | None = None  # --input-shape CxHxW, for a model that cannot say
    parallel: str = "none"  # none | ddp | fsdp: rank 0 of `world_size` on a fake process group (memprof.simulation.distributed)
    world_size: int = 1
    bucket_cap_mb: float | None = None  # DDP's bucket_cap_mb (None: its default, 25 MiB with a 1 MiB first bucket)
    grad_as_bucket_view: bool = False  # DDP's gradient_as_bucket_view
    reshard_after_forward: bool = True  # FSDP2's reshard_after_forward
    clear_grads: str = "after-step"  # after-step | before-backward (the previous step's gradients live through the forward)
    grad_accum: int = 1  # micro-steps (forward + backward) per optimizer step, gradients accumulating between them
    train: str = TRAIN_WHOLE  # what trains: all, head, last:N (blocks + final norm + head) or module-name globs
    peft: str = PEFT_OFF  # off | lora | dora: peft's adapters on the frozen base weights (memprof.adapters)
    lora_rank: int = 8  # LoraConfig's r, lora_alpha, lora_dropout; targets: module-name globs (None: the family's)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str | None = None
    objective: str = "classify"  # classify | contrastive (both CLIP towers, open_clip's loss: memprof.contrastive)
    lock_image: bool = False  # contrastive: open_clip's lock_image_tower
    lock_text: bool = False  # contrastive: open_clip's lock_text_tower

    @property
    def training(self) -> str:
        """Precision, then the optimizer implementation and in-backward only where they differ from the
        defaults: `fp32` for today's default, `bf16-amp+fused+in-backward` for a changed one."""
        parts = [self.precision]
        if self.optim_impl != DEFAULT_OPTIM_IMPL:
            parts.append(self.optim_impl)
        if self.optim_in_backward:
            parts.append("in-backward")
        if self.resident != "tower":
            parts.append(f"{self.resident}-resident")
        if self.clear_grads != "after-step":
            parts.append(f"clear-{self.clear_grads}")
        if self.grad_accum != 1:
            parts.append(f"accum{self.grad_accum}")
        parts += [p for p, on in ((self.objective, self.objective != "classify"), ("lock-image", self.lock_image),
                                  ("lock-text", self.lock_text)) if on]
        return "+".join(parts)

    @property
    def key(self) -> str:
        """A stable, readable identity (used to resume and to compare runs). Its segments keep their
        positions whatever the axes: the sixth says how it trains (`training`), so default keys read as
        they always did. Built from the fields; nothing reads a key back by position (`config` is on the spec)."""
        return "/".join([*self._what, f"steps{self.steps}", self.budget, *self._variant])

    @property
    def config(self) -> str:
        """The configuration, whatever card it ran on and however many steps: the key less its steps and budget
        segments (`vit-b-16/adamw/ckpt-off/32bit/bs1/fp32`, `.../fp32/ddp8`, `.../freeze-0`). Every report pairs
        and labels records by it: a measurement with the prediction for its card (`memprof fidelity`), an accuracy
        verdict with the memory records of its configuration, a timeline's predicted and measured curves."""
        return "/".join([*self._what, *self._variant])

    @property
    def _what(self) -> list[str]:
        bits = f"{self.state_bits}bit" + ("-paged" if self.paged else "")
        return [self.model, self.optim, f"ckpt-{'on' if self.grad_ckpt else 'off'}", bits, f"bs{self.batch_size}",
                self.training]

    @property
    def _variant(self) -> list[str]:
        return ([] if self.parallel == "none" else [self.parallelism]) + (
            [f"freeze-{self.freeze}"] if self.freeze else []) + (
            [f"train-{self.train.replace(':', '')}"] if self.train != TRAIN_WHOLE else []) + (
            [self.adapters] if self.peft != PEFT_OFF else []) + (
            [f"input-{self.input_shape}"] if self.input_shape else [])

    @property
    def adapters(self) -> str:
        """`lora8` (the method and rank), with `-a32` (alpha), `-d0.1` (dropout) and `-t<globs>` (targets) where
        they differ from the defaults; `off` without peft (whose key has no such segment)."""
        if self.peft == PEFT_OFF:
            return PEFT_OFF
        parts = [f"{self.peft}{self.lora_rank}"]
        if self.lora_alpha != LORA_ALPHA:
            parts.append(f"a{self.lora_alpha:g}")
        if self.lora_dropout:
            parts.append(f"d{self.lora_dropout:g}")
        if self.lora_targets:
            parts.append(f"t{self.lora_targets}")
        return "-".join(parts)

    @property
    def parallelism(self) -> str:
        """`ddp8`, `fsdp64`, with `+cap10`, `+view` (DDP) or `+keep` (FSDP without resharding) where they differ
        from the defaults; `none` for a single-process run (whose key has no ninth segment)."""
        if self.parallel == "none":
            return "none"
        parts = [f"{self.parallel}{self.world_size}"]
        if self.parallel == "ddp" and self.bucket_cap_mb is not None:
            parts.append(f"cap{self.bucket_cap_mb:g}")
        if self.parallel == "ddp" and self.grad_as_bucket_view:
            parts.append("view")
        if self.parallel == "fsdp" and not self.reshard_after_forward:
            parts.append("keep")
        return "+".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields_: dict) -> "RunSpec":
        """A spec from a record's `spec` object: the fields this version knows (a field an older memprof did not
        write takes its default; one it does not know is left to the record, which keeps it)."""
        known = _field_names()
        return cls(**{k: v for k, v in fields_.items() if k in known})

    def __getitem__(self, name: str):
        """A field by name, as the record's JSON object reads (`result.spec["grad_ckpt"]`)."""
        if name not in _field_names():
            raise KeyError(name)
        return getattr(self, name)


@functools.cache
def _field_names() -> frozenset:
    return frozenset(f.name for f in fields(RunSpec))


OPTIMIZER_FIELDS = ("optim", "state_bits", "paged", "optim_impl")
PARALLEL = ("none", "ddp", "fsdp")  # memprof.simulation.distributed
MAX_WORLD_SIZE = 1024  # fake process groups cost nothing per rank; past this the shards are a few elements


def forward_group(spec: RunSpec) -> tuple:
    """What a configuration's forward and backward depend on: every field but the optimizer's, and whether the
    optimizer freezes the embedding (memprof.simulation.shared traces them once per group)."""
    from memprof.optims import REGISTRY

    info = REGISTRY.get(spec.optim)
    return astuple(replace(spec, **dict.fromkeys(OPTIMIZER_FIELDS))), info is not None and info.freeze_embed


@dataclass(frozen=True)
class GridEntry:
    spec: RunSpec
    skip_reason: str | None = None


def parse_names(text: str, flag: str, choices: tuple, kind: str) -> list[str]:
    """A comma list of names from `choices` (`all` expands), each once; close matches for a typo."""
    from memprof.errors import unknown_name

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{flag} is empty: give one of {', '.join(choices)} (or all)")
    out: list[str] = []
    for n in names:
        if flag == "--precision" and n in ("fp16", "float16", "half"):
            raise UsageError(f"--precision {n}: {PURE_FP16}")
        for name in choices if n == "all" else (n,):
            if name not in choices:
                raise unknown_name(kind, name, list(choices) + ["all"], "memprof run --help")
            if name not in out:
                out.append(name)
    return out


# --- the option table's parsers (memprof.options.Option.parse): a value as the command line gives it (text), as a
# suite's TOML or the Python API gives it (a number, a bool, a list), each to its typed list, with `flag` in errors

def _text(value, flag: str) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v, flag) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, str)):
        return str(value)
    raise UsageError(f"{flag} {value!r}: give text as the command line does, e.g. {flag} 1,2")


def switches(value, flag: str) -> list[bool]:
    """off, on, off,on; True / False; a list of them."""
    if not isinstance(value, (str, bool, list, tuple)):
        raise UsageError(f"{flag} {value!r}: give True/False or 'on'/'off' (a comma list: off,on)")
    text = _text(value, flag)
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("off", "on") for w in words):
        raise UsageError(f"{flag} '{text}': use off, on or off,on")
    return [w == "on" for w in dict.fromkeys(words)]


def positive_ints(value, flag: str) -> list[int]:
    """Whole numbers of at least 1, comma-separated (--batch-size, --state-bits)."""
    text = _text(value, flag)
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} '{text}': give whole numbers separated by commas, e.g. {flag} 1,32") from None
    if not values:
        raise UsageError(f"{flag} is empty: give at least one value, e.g. {flag} 1")
    if min(values) < 1:
        raise UsageError(f"{flag} {min(values)}: must be at least 1")
    return values


def precisions(value, flag: str) -> list[str]:
    return parse_names(_text(value, flag), flag, PRECISIONS, "precision")


def optim_impls(value, flag: str) -> list[str]:
    return parse_names(_text(value, flag), flag, OPTIM_IMPLS, "optimizer implementation")


def clear_grads(value, flag: str) -> list[str]:
    return parse_names(_text(value, flag), flag, CLEAR_GRADS, "--clear-grads value")


def grad_accums(value, flag: str) -> list[int]:
    """Micro-steps per optimizer step: whole numbers of at least 1, at most MAX_GRAD_ACCUM, comma-separated."""
    values = positive_ints(value, flag)
    if max(values) > MAX_GRAD_ACCUM:
        raise UsageError(f"{flag} {max(values)}: at most {MAX_GRAD_ACCUM} micro-steps per optimizer step (each is "
                         f"traced; past the second they repeat the same peak)")
    return values


def train(value, flag: str) -> str:
    """all, head, last:N (N >= 1) or module-name globs (a comma list, as --freeze takes); checked against the model
    when it is built (memprof.models.trained_parameters)."""
    if not isinstance(value, str):
        raise UsageError(f"{flag} {value!r}: give all, head, last:N or module-name globs, e.g. {flag} head")
    text = ",".join(g.strip() for g in value.split(",") if g.strip())
    if not text:
        raise UsageError(f"{flag} is empty: give all, head, last:N or module-name globs, e.g. {flag} head")
    if text.startswith(TRAIN_LAST) or text == "last":
        n = text[len(TRAIN_LAST):]
        if not n.isdigit() or int(n) < 1:
            raise UsageError(f"{flag} '{text}': give the number of last blocks that train, e.g. {flag} last:2")
        return f"{TRAIN_LAST}{int(n)}"
    if "/" in text:
        raise UsageError(f"{flag} '{text}': module names hold no '/': give globs such as {flag} 'head,blocks.11.*'")
    return text


def pefts(value, flag: str) -> list[str]:
    """off, lora, dora or a comma list of them (a grid axis)."""
    return parse_names(_text(value, flag), flag, (PEFT_OFF, *PEFT_METHODS), "--peft method")


def _whole(value, flag: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise UsageError(f"{flag} {value!r}: give a whole number of at least 1, e.g. {flag} {example}")
    return int(value)


def lora_rank(value, flag: str) -> int:
    """LoraConfig's r: the adapters' inner width, a whole number of at least 1."""
    rank = _whole(value, flag, LORA_RANK)
    if rank < 1:
        raise UsageError(f"{flag} {rank}: a LoRA rank must be at least 1 (it is the adapters' inner width)")
    return rank


def lora_alpha(value, flag: str) -> int:
    """LoraConfig's lora_alpha (the adapters' output is scaled by alpha / rank): a whole number of at least 1."""
    alpha = _whole(value, flag, LORA_ALPHA)
    if alpha < 1:
        raise UsageError(f"{flag} {alpha}: must be at least 1 (the adapters' output is scaled by alpha / rank)")
    return alpha


def lora_dropout(value, flag: str) -> float:
    try:
        p = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        p = None
    if p is None or not 0 <= p < 1:
        raise UsageError(f"{flag} {value}: give a probability from 0 up to (not including) 1, e.g. {flag} 0.1")
    return p


def lora_targets(value, flag: str) -> str:
    """Module-name globs relative to the network, a comma list (checked against the model when it is built,
    memprof.adapters.target_modules)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = ",".join(g.strip() for g in str(value).split(",") if g.strip()) if isinstance(value, str) else ""
    if not text:
        raise UsageError(f"{flag} is empty: give module-name globs, e.g. {flag} 'blocks.*.attn.qkv,blocks.*.mlp.fc1'")
    if "/" in text:
        raise UsageError(f"{flag} '{text}': module names hold no '/': give globs such as {flag} 'blocks.*.attn.qkv'")
    return text


def residents(value, flag: str) -> list[str]:
    return parse_names(_text(value, flag), flag, RESIDENTS, "resident")


def world_size(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} {value}: use a whole number of at least 1")
    return value


def parallelisms(value, flag: str) -> list[str]:
    return parse_names(_text(value, flag), flag, PARALLEL, "parallelism")


def skip_reason(model: ModelInfo, optim: OptimInfo, state_bits: int, paged: bool = False,
                grad_ckpt: bool = False, precision: str = "fp32", optim_impl: str = DEFAULT_OPTIM_IMPL,
                in_backward: bool = False, parallel: str = "none", clear_grads: str = "after-step",
                grad_accum: int = 1, peft: str = PEFT_OFF) -> str | None:
    if peft != PEFT_OFF and optim.freeze_embed:
        return (f"--peft {peft} freezes every base weight, the embedding included, so {optim.name} has nothing left "
                f"to freeze (it is {optim.name.rsplit('-', 1)[0]} under LoRA)")
    if peft != PEFT_OFF and parallel == "fsdp":
        return f"--peft {peft} under FSDP is not modelled (peft's adapters on sharded DTensor weights)"
    if in_backward and grad_accum > 1:
        return ("optimizer-in-backward steps each parameter inside backward, so no gradient is left to accumulate: "
                f"--grad-accum {grad_accum} needs --optim-in-backward off")
    if in_backward and clear_grads != "after-step":
        return ("optimizer-in-backward frees each gradient inside backward: there is no gradient for "
                f"--clear-grads {clear_grads} to keep")
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
    if state_bits == 8 and optim_impl != DEFAULT_OPTIM_IMPL:
        return (f"bitsandbytes' 8-bit {optim.name} has one implementation (its own update kernel): "
                f"--optim-impl {optim_impl} does not apply")
    if state_bits == 32 and optim_impl not in optim.impls:
        return f"{optim.factory} has no {optim_impl} implementation (it offers {', '.join(optim.impls)})"
    if in_backward and state_bits == 8:
        return "optimizer-in-backward with bitsandbytes' 8-bit states is not modelled (one 8-bit optimizer per parameter)"
    if in_backward and precision == "fp16-amp":
        return ("optimizer-in-backward cannot honour fp16-amp: GradScaler must see every gradient (to skip the whole "
                "step on inf/nan) before any parameter is updated")
    if parallel != "none" and in_backward:
        return f"optimizer-in-backward under {parallel} is not modelled (its hooks and the wrapper's would interleave)"
    if parallel == "fsdp" and state_bits == 8:
        return "bitsandbytes' 8-bit optimizers cannot step FSDP's sharded (DTensor) parameters: use --state-bits 32"
    if in_backward and optim.global_step:
        return (f"{optim.name} {optim.global_step}: stepping one parameter at a time inside backward would change "
                f"its update, so optimizer-in-backward cannot run it")
    return None


def expand_grid(models: list[ModelInfo], optims: list[OptimInfo], grad_ckpt: list[bool],
                state_bits: list[int], batch_sizes: list[int], paged: bool = False,
                precisions: list[str] = ("fp32",), optim_impls: list[str] = (DEFAULT_OPTIM_IMPL,),
                in_backward: list[bool] = (False,), parallel: list[dict] = ({},),
                clear_grads: list[str] = ("after-step",), grad_accums: list[int] = (1,), pefts: list[str] = (PEFT_OFF,),
                lora: dict | None = None, **common) -> list[GridEntry]:
    """The product of the axes, in the order given, each entry with its skip reason (or None). `lora`: the
    LoRA options (rank, alpha, dropout, targets) of the entries whose --peft is not off."""
    for bits in state_bits:
        if bits not in (32, 8):
            raise UsageError(f"--state-bits {bits}: use 32, 8 or 32,8")
    entries = []
    freeze = common.pop("freeze", None)  # what a freeze-embed optimizer freezes: in its keys only
    for par, clr, prec, impl, inb, m, pe, o, ck, bits, acc, bs in itertools.product(
            parallel, clear_grads, precisions, optim_impls, in_backward, models, pefts, optims, grad_ckpt, state_bits,
            grad_accums, batch_sizes):
        spec = RunSpec(model=m.name, optim=o.name, grad_ckpt=ck, state_bits=bits, batch_size=bs,
                       paged=paged and bits == 8, precision=prec, optim_impl=impl, optim_in_backward=inb,
                       clear_grads=clr, grad_accum=acc, freeze=freeze if o.freeze_embed else None, peft=pe,
                       **((lora or {}) if pe != PEFT_OFF else {}), **par, **common)
        entries.append(GridEntry(spec, skip_reason(m, o, bits, spec.paged, ck, prec, impl, inb, spec.parallel, clr,
                                                   acc, pe)))
    return entries

