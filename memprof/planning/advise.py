"""`memprof advise`: from one configuration, every single change memprof can model and the pairs of them,
predicted and ranked, with what each costs and whether it fits the budget.

A change is data (`Change`): what it does to a RunSpec, the axis it moves (two changes combine only across
axes), its cost rank and what it costs in words. Changes an axis does not support in this version are
listed as not modelled, never dropped. The cheapest change that fits (lowest cost rank, then lowest peak)
is the first line of the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

from memprof.errors import UsageError

GIB = 1 << 30


@dataclass(frozen=True)
class Change:
    name: str
    axis: str
    cost_rank: int  # 0: free; higher: costs more (accuracy risk, speed, a different optimizer)
    cost: str
    apply: Callable  # RunSpec -> RunSpec | None (None: does not apply to this configuration)
    modelled: Callable = lambda: True  # whether this version can predict it
    not_modelled_why: str = ""
    words: Callable | None = None  # (base spec, changed spec) -> its cost in this candidate's figures

    def label(self, base, spec) -> str:
        """The change's name, with the figures it sets where it sets some (the micro-batch and accumulation)."""
        if self.apply is _accumulate:
            return f"micro-batch {spec.batch_size} x {spec.grad_accum} gradient accumulation"
        return self.name

    def cost_of(self, base, spec) -> str:
        return self.words(base, spec) if self.words else self.cost


def _optim(target: str):
    def apply(spec):
        return None if spec.optim == target else dataclasses.replace(spec, optim=target)
    return apply


def _freeze_embed(spec):
    from memprof.optims import REGISTRY

    target = f"{spec.optim}-fe" if not spec.optim.endswith("-fe") else None
    return dataclasses.replace(spec, optim=target) if target in REGISTRY else None


def _no_momentum(spec):
    target = {"sgd": "sgd-nomom", "sgd-fe": "sgd-fe-nomom"}.get(spec.optim)
    return dataclasses.replace(spec, optim=target) if target else None


def _field(name: str, value):
    def apply(spec):
        if not hasattr(spec, name) or getattr(spec, name) == value:
            return None
        return dataclasses.replace(spec, **{name: value})
    return apply


def _has_field(name: str):
    from memprof.spec import RunSpec

    return lambda: name in {f.name for f in dataclasses.fields(RunSpec)}


def _precision_modelled(value: str):
    def modelled():
        from memprof import spec

        return value in getattr(spec, "PRECISIONS", ("fp32",))
    return modelled


def _bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _accumulate(spec):
    """The micro-batch divided by its smallest prime factor p and the accumulation multiplied by p: the same
    effective batch (micro-batch x accumulation) in p times the micro-steps (batch 8 -> 4 x 2, 9 -> 3 x 3);
    None at micro-batch 1, or with optimizer-in-backward (nothing accumulates)."""
    if spec.batch_size < 2 or spec.optim_in_backward:
        return None
    p = next(d for d in range(2, spec.batch_size + 1) if spec.batch_size % d == 0)
    return dataclasses.replace(spec, batch_size=spec.batch_size // p, grad_accum=spec.grad_accum * p)


def _accumulation_words(base, spec) -> str:
    """What an accumulation change does besides memory, in the candidate's figures."""
    k = spec.grad_accum // base.grad_accum
    return (f"effective batch unchanged: {spec.batch_size} x {spec.grad_accum} accumulation = "
            f"{spec.batch_size * spec.grad_accum} samples per optimizer step, in {k}x the micro-steps (slower: "
            "smaller kernels, one forward and backward per micro-batch); batch-norm statistics see the micro-batch "
            "(batch-norm-free ViTs train the same)")


def _lora(rank: int):
    """LoRA at `rank` (peft's adapters on the family's attention and MLP layers; the head trains whole): None where
    the configuration already uses peft or trains part of the model (--train)."""
    def apply(spec):
        if getattr(spec, "peft", "off") != "off" or spec.train != "all":
            return None
        return dataclasses.replace(spec, peft="lora", lora_rank=rank)
    return apply


@functools.cache
def trainable_parameters(spec) -> int:
    """Parameters that train in `spec`'s model, counted on the meta device (no memory, no tracing)."""
    import torch

    from memprof.harness import prepare

    with torch.device("meta"):
        return sum(p.numel() for p in prepare(spec, load_weights=False).model.parameters() if p.requires_grad)


def _lora_words(base, spec) -> str:
    """What LoRA changes besides memory, in this model's figures."""
    before, after = trainable_parameters(base), trainable_parameters(spec)
    return (f"a different method: {after:,} trainable parameters (rank-{spec.lora_rank} adapters and the head) "
            f"instead of {before:,} ({100 * after / before:.1f}%); the base weights stay frozen, so what the model "
            "can learn is limited to the adapters' rank")


def _linear_probe(spec):
    """Only the head trains (`--train head`): None where the configuration already trains part of the model, uses
    peft or another objective, or where the model does not say where its head is."""
    if spec.train != "all" or getattr(spec, "peft", "off") != "off" or getattr(spec, "objective", "classify") != \
            "classify":
        return None
    probe = dataclasses.replace(spec, train="head")
    try:
        trainable_parameters(probe)
    except UsageError:  # no declared head (a py: factory's network)
        return None
    return probe


def _linear_probe_words(base, spec) -> str:
    """What a linear probe changes besides memory, in this model's figures."""
    before, after = trainable_parameters(base), trainable_parameters(spec)
    return (f"a different method: only the head's {after:,} parameters train instead of {before:,} "
            f"({100 * after / before:.2f}%); the backbone keeps its pretrained features, which usually costs "
            "accuracy against fine-tuning it")


def _peft_installed() -> bool:
    from memprof.adapters import peft_available

    return peft_available()


CHANGES = (
    Change("freeze-embed", "optimizer", 1, "the patch embedding stops training (~0.7% of a ViT's parameters); the "
           "paper finds no accuracy loss", _freeze_embed),
    Change("SGD (freeze-embed)", "optimizer", 3, "a different optimizer: SGD with momentum, embedding frozen; the "
           "paper finds it matches AdamW when fine-tuning", _optim("sgd-fe")),
    Change("SGD (freeze-embed, no momentum)", "optimizer", 4, "SGD without momentum, embedding frozen: the "
           "paper's leanest method, slightly less accurate in its Table 5", _optim("sgd-fe-nomom")),
    Change("no momentum", "optimizer", 4, "drops SGD's momentum buffer (can train slower)", _no_momentum),
    Change("8-bit optimizer states", "state_bits", 2, "block-wise 8-bit states (bitsandbytes): quantization "
           "noise in the update", _field("state_bits", 8), _bitsandbytes_installed,
           "bitsandbytes is not installed (pip install bitsandbytes)"),
    Change("gradient checkpointing", "grad_ckpt", 2, "recompute: about one extra forward pass per step "
           "(~20-30% slower)", _field("grad_ckpt", True)),
    Change("smaller micro-batch, more gradient accumulation", "batch_size", 2, "the same effective batch (micro-batch "
           "x accumulation) in more micro-steps (slower; batch-norm-free ViTs train the same)", _accumulate,
           words=_accumulation_words),
    Change("fused optimizer", "optim_impl", 0, "none: the same update in one kernel per step", _field("optim_impl", "fused"),
           _has_field("optim_impl"), "this version has no --optim-impl axis"),
    Change("for-loop optimizer", "optim_impl", 1, "none in results; a slower step (one kernel per tensor)",
           _field("optim_impl", "forloop"), _has_field("optim_impl"), "this version has no --optim-impl axis"),
    Change("optimizer in backward", "optim_in_backward", 1, "steps each parameter as its gradient is ready: no "
           "gradient clipping over all parameters, no gradient accumulation", _field("optim_in_backward", True),
           _has_field("optim_in_backward"), "this version has no --optim-in-backward axis"),
    Change("clear gradients after the step", "clear_grads", 0, "none: zero_grad(set_to_none=True) after "
           "optimizer.step() instead of before backward, so the last step's gradients are gone before the next "
           "forward", _field("clear_grads", "after-step"), _has_field("clear_grads"),
           "this version has no --clear-grads axis"),
    Change("linear probe", "train", 4, "a different method: only the head trains", _linear_probe,
           words=_linear_probe_words),
    Change("LoRA r=8", "peft", 3, "a different method: low-rank adapters train, the base weights stay frozen",
           _lora(8), _peft_installed, "peft is not installed (pip install peft)", words=_lora_words),
    Change("LoRA r=16", "peft", 3, "a different method: low-rank adapters train, the base weights stay frozen",
           _lora(16), _peft_installed, "peft is not installed (pip install peft)", words=_lora_words),
    Change("bf16 autocast", "precision", 2, "forward and backward in bfloat16 with fp32 master weights: lower "
           "numeric precision in activations", _field("precision", "bf16-amp"), _precision_modelled("bf16-amp"),
           "this version predicts fp32 only"),
)


@dataclass
class Candidate:
    changes: tuple[Change, ...]
    spec: object  # RunSpec
    base: object = None  # the configuration as given (RunSpec)

    @property
    def label(self) -> str:
        return " + ".join(c.label(self.base, self.spec) for c in self.changes) or "(as given)"

    @property
    def cost(self) -> str:
        return "; ".join(c.cost_of(self.base, self.spec) for c in self.changes) or "none"

    @property
    def cost_rank(self) -> int:
        return sum(c.cost_rank for c in self.changes)


def candidates(base, changes=CHANGES) -> tuple[list[Candidate], list[Change], list[tuple[str, str]]]:
    """(the base and every single change and cross-axis pair that applies, the changes not modelled, the
    combinations that do not apply with their reason)."""
    from memprof.models import resolve_model
    from memprof.optims import REGISTRY
    from memprof.spec import skip_reason

    modelled = [c for c in changes if c.modelled()]
    out, not_applicable = [Candidate((), base, base)], []
    singles = [(c, c.apply(base)) for c in modelled]
    singles = [(c, s) for c, s in singles if s is not None]
    combos = [((c,), s) for c, s in singles]
    for (c1, _), (c2, _) in itertools.combinations(singles, 2):
        if c1.axis == c2.axis:
            continue
        spec = c1.apply(base)
        spec = spec and c2.apply(spec)
        if spec is not None:
            combos.append(((c1, c2), spec))
    for chs, spec in combos:
        why = skip_reason(resolve_model(spec.model), REGISTRY[spec.optim], spec.state_bits, spec.paged, spec.grad_ckpt,
                          spec.precision, spec.optim_impl, spec.optim_in_backward, spec.parallel, spec.clear_grads,
                          spec.grad_accum, spec.peft)
        if why:
            not_applicable.append((" + ".join(c.label(base, spec) for c in chs), why))
        else:
            out.append(Candidate(chs, spec, base))
    return out, [c for c in changes if not c.modelled()], not_applicable


@dataclass
class Advice:
    rows: list[dict]
    not_modelled: list[Change]
    not_applicable: list[tuple[str, str]]
    budget_label: str
    usable_bytes: int
    source: str

    total_bytes: int = 0  # the card's size

    @property
    def card(self) -> str:
        """The card named with its usable memory and size, where a verdict is given."""
        return f"{_gib(self.usable_bytes)} GiB usable on {self.budget_label} ({_gib(self.total_bytes)} GiB card)"

    @property
    def answer(self) -> str:
        """Two lines: the answer (with where its figures come from), then its figures and its cost."""
        base = next(r for r in self.rows if not r["changes"])
        kind = self.source.split(",")[0]
        if base["fits"]:
            return (f"the configuration already fits {self.budget_label} ({kind})\n"
                    f"{_gib(base['peak_reserved_bytes'])} GiB reserved of {self.card}, "
                    f"{_gib(base['headroom_bytes'])} GiB headroom ({self.source})")
        fitting = sorted((r for r in self.rows if r["fits"] and r["changes"]),
                         key=lambda r: (r["cost_rank"], r["peak_reserved_bytes"]))
        if not fitting:
            closest = min((r for r in self.rows if r["peak_reserved_bytes"] is not None),
                          key=lambda r: r["peak_reserved_bytes"])
            return (f"no single change or pair fits {self.budget_label} ({kind})\n"
                    f"the closest: {closest['change']}, {_gib(closest['peak_reserved_bytes'])} GiB reserved of "
                    f"{self.card} ({self.source})")
        best = fitting[0]
        return (f"cheapest change that fits: {best['change']} ({kind})\n"
                f"{_gib(best['peak_reserved_bytes'])} GiB reserved of {self.card}, {_gib(best['headroom_bytes'])} "
                f"GiB headroom; cost: {best['cost']} ({self.source})")


def _gib(v) -> str:
    return "n/a" if v is None else f"{v / GIB:.2f}"


def advice(candidates_: list[Candidate], records: dict, not_modelled, not_applicable, verdicts: dict) -> Advice:
    """Rank the candidates by predicted peak; `records` maps a spec's key to its record."""
    from memprof.budget import parse_budget

    budget = parse_budget(candidates_[0].spec.budget)
    rows = []
    for cand in candidates_:
        rec = records[cand.spec.key]
        m = rec["metrics"]
        reserved = m.get("peak_reserved_bytes")
        rows.append({
            "change": cand.label, "changes": [c.name for c in cand.changes], "key": rec["key"],
            "status": rec["status"], "fits": rec["status"] == "ok", "may_not_fit": m.get("fits") == "may not fit",
            "peak_reserved_bytes": reserved, "peak_allocated_bytes": m.get("peak_allocated_bytes"),
            "headroom_bytes": None if reserved is None else budget.usable_bytes - reserved,
            "cost_rank": cand.cost_rank, "cost": cand.cost,
            "accuracy": _verdict(verdicts, cand.spec), "error": rec.get("error"),
        })
    rows.sort(key=lambda r: (r["peak_reserved_bytes"] is None, r["peak_reserved_bytes"] or 0))
    source = f"{records[candidates_[0].spec.key]['source']}, {records[candidates_[0].spec.key]['environment'].get('device')}"
    return Advice(rows, not_modelled, not_applicable, budget.name, budget.usable_bytes, source, budget.total_bytes)


def _verdict(verdicts: dict, spec) -> str:
    """Accuracy mode's verdict for this setting (optimizer, checkpointing, state bits), from any model; the
    model is named when it is not this one."""
    for v in verdicts.values():
        s = v.get("spec", {})
        if (s.get("optim"), s.get("grad_ckpt"), s.get("state_bits")) == (spec.optim, spec.grad_ckpt, spec.state_bits):
            return v["verdict"] + ("" if s.get("model") == spec.model else f" ({s.get('model')})")
    return ""


SHOWN = 5  # candidates the terminal lists after the answer; advise.md has them all


def render_advice(a: Advice) -> str:
    """The answer, then every candidate ranked by peak, what is not modelled and what does not apply
    (markdown, advise.md)."""
    from tabulate import tabulate

    table = [[r["change"], _gib(r["peak_reserved_bytes"]), _gib(r["headroom_bytes"]), _fits(r), r["cost"],
              r["accuracy"]] for r in a.rows]
    out = [a.answer, "", f"# What fits {a.budget_label}", "",
           f"Every figure is {a.source}; ranked by peak reserved. Headroom: the card's usable memory "
           f"({_gib(a.usable_bytes)} GiB, after the CUDA context) minus peak reserved. 'may not': fits, but the "
           "prediction's uncertainty band reaches past the budget. Accuracy: accuracy mode's verdict for that "
           "setting, where one was given (`--accuracy-from`).", "",
           tabulate(table, headers=["change", "peak reserved GiB", "headroom GiB", "fits", "cost", "accuracy"],
                    tablefmt="github")]
    if a.not_modelled:
        out += ["", "Not modelled in this version (no prediction): " + "; ".join(
            f"{c.name} ({c.not_modelled_why})" for c in a.not_modelled) + "."]
    if a.not_applicable:
        out += ["", "Not applicable here: " + "; ".join(f"{name} ({why})" for name, why in a.not_applicable) + "."]
    return "\n".join(out) + "\n"


def render_advice_terminal(a: Advice, width: int, full_path: str) -> str:
    """For a terminal `width` columns wide: the answer, the configuration as given, and the SHOWN cheapest
    changes that fit (cost rank, then peak: the answer's order), then where the rest is."""
    import textwrap

    from memprof.reports.terminal import fit_table

    base = next(r for r in a.rows if not r["changes"])
    fitting = sorted((r for r in a.rows if r["fits"] and r["changes"]),
                     key=lambda r: (r["cost_rank"], r["peak_reserved_bytes"]))
    shown = [base, *fitting[:SHOWN]]
    table = [[r["change"], _gib(r["peak_reserved_bytes"]), _gib(r["headroom_bytes"]), _fits(r)] for r in shown]
    rest = len(a.rows) - len(shown)
    lines = [*(textwrap.fill(line, width) for line in a.answer.splitlines()), "",
             textwrap.fill(f"The configuration as given and the {len(shown) - 1} cheapest changes that fit "
                           f"{a.budget_label} ({_gib(a.usable_bytes)} GiB usable), cheapest first:", width), "",
             fit_table(table, ["change", "reserved GiB", "headroom GiB", "fits"], width), "",
             textwrap.fill(f"{rest} more candidates, what each costs, and what is not modelled or does not apply: "
                           f"{full_path}", width, break_long_words=False, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def _fits(r: dict) -> str:
    if r["fits"]:
        return "may not" if r["may_not_fit"] else "yes"
    return "no" if r["status"] == "oom" else r["status"]
