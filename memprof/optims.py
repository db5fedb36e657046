"""Optimizer registry: one frozen spec per entry, with the seed paper's defaults (PyTorch's, Appendix A).

By default every optimizer is built with `foreach=True`, the multi-tensor implementation that torch
(`torch.optim.optimizer._default_to_fused_or_foreach`) and timm (`_resolve_foreach`) pick by default for
CUDA parameters, so a CPU run executes the same code, and allocates the same temporaries, as a GPU run.
`impl` picks another: `fused=True` (one kernel per dtype group, no temporaries) or the for-loop
(`foreach=False`: one parameter at a time). Optimizer-in-backward (`InBackward`) builds one optimizer per
parameter and steps it from the parameter's post-accumulate-grad hook, freeing the gradient at once.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from memprof.errors import UsageError, unknown_name


@dataclass(frozen=True)
class OptimInfo:
    name: str
    label: str  # as the paper's tables name it
    description: str
    factory: str  # dotted path of the optimizer class, imported only when built
    lr: float  # inside the paper's sweep range; memory does not depend on it
    kwargs: tuple = ()  # (name, value) pairs passed to the class
    freeze_embed: bool = False
    state_tensors_per_param: int = 0  # fp32 state tensors shaped like each trainable parameter
    paper: bool = False  # one of Table 4's four methods
    bnb_8bit: str | None = None  # bitsandbytes class with block-wise 8-bit states
    bnb_paged: str | None = None  # its paged variant (states in CUDA managed memory), if bitsandbytes has one
    impls: tuple = ("foreach", "fused", "forloop")  # the implementations its class offers (torch: all three)
    global_step: str = ""  # why its update needs every gradient at once (then optimizer-in-backward cannot run it)


ADAMW = (("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.01))
SGD_MOMENTUM = (("momentum", 0.9), ("weight_decay", 0.0), ("dampening", 0.0))
SGD_PLAIN = (("momentum", 0.0), ("weight_decay", 0.0))
BNB_ADAMW, BNB_PAGED_ADAMW = "bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"
BNB_SGD = "bitsandbytes.optim.SGD8bit"
BNB_INSTALL = "pip install bitsandbytes (or pip install -e '.[8bit]')"

REGISTRY: dict[str, OptimInfo] = {o.name: o for o in (
    OptimInfo("adamw", "AdamW", "torch AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.01",
              "torch.optim.AdamW", 1e-5, ADAMW, state_tensors_per_param=2, paper=True, bnb_8bit=BNB_ADAMW,
              bnb_paged=BNB_PAGED_ADAMW),
    OptimInfo("sgd", "SGD", "torch SGD, momentum 0.9, weight decay 0",
              "torch.optim.SGD", 1e-3, SGD_MOMENTUM, state_tensors_per_param=1, paper=True, bnb_8bit=BNB_SGD),
    OptimInfo("sgd-fe", "SGD (freeze-embed)", "SGD with momentum 0.9, embedding layer frozen",
              "torch.optim.SGD", 1e-3, SGD_MOMENTUM, freeze_embed=True, state_tensors_per_param=1, paper=True,
              bnb_8bit=BNB_SGD),
    OptimInfo("sgd-fe-nomom", "SGD (freeze-embed, no momentum)", "SGD without momentum, embedding layer frozen",
              "torch.optim.SGD", 1e-3, SGD_PLAIN, freeze_embed=True, paper=True),
    OptimInfo("sgd-nomom", "SGD (no momentum)", "SGD without momentum",
              "torch.optim.SGD", 1e-3, SGD_PLAIN),
    OptimInfo("adamw-fe", "AdamW (freeze-embed)", "AdamW with the embedding layer frozen (paper Appendix D)",
              "torch.optim.AdamW", 1e-5, ADAMW, freeze_embed=True, state_tensors_per_param=2, bnb_8bit=BNB_ADAMW,
              bnb_paged=BNB_PAGED_ADAMW),
    OptimInfo("lars", "LARS", "timm LARS, momentum 0.9 (paper Table 5)",
              "timm.optim.Lars", 1e-3, (("momentum", 0.9),), state_tensors_per_param=1,
              bnb_8bit="bitsandbytes.optim.LARS8bit", impls=("foreach", "forloop")),
    OptimInfo("lamb", "LAMB", "timm LAMB, betas (0.9, 0.999), weight decay 0.01 (paper Table 5)",
              "timm.optim.Lamb", 1e-3, (("betas", (0.9, 0.999)), ("weight_decay", 0.01)),
              state_tensors_per_param=2, bnb_8bit="bitsandbytes.optim.LAMB8bit", impls=("foreach", "forloop"),
              global_step="clips by the gradient norm over all parameters (max_grad_norm 1.0)"),
    OptimInfo("adam", "Adam", "torch Adam, betas (0.9, 0.999), eps 1e-8, weight decay 0",
              "torch.optim.Adam", 1e-5, (("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0)),
              state_tensors_per_param=2),
)}

PAPER_OPTIMS = tuple(o.name for o in REGISTRY.values() if o.paper)


def parse_optims(text: str) -> list[OptimInfo]:
    """A comma-separated list; `all` expands to the whole registry, `paper` to Table 4's four."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--optims is empty: give optimizer names, e.g. --optims adamw,sgd-fe or --optims all")
    out: list[OptimInfo] = []
    for n in names:
        group = tuple(REGISTRY) if n == "all" else PAPER_OPTIMS if n == "paper" else (n,)
        for name in group:
            if name not in REGISTRY:
                raise unknown_name("optimizer", name, list(REGISTRY) + ["all", "paper"], "memprof list optims")
            if REGISTRY[name] not in out:
                out.append(REGISTRY[name])
    return out


def optimizer_class(info: OptimInfo, state_bits: int = 32, paged: bool = False) -> str:
    """Dotted path of the class for these settings (bitsandbytes for 8-bit states)."""
    if state_bits == 8:
        return (info.bnb_paged if paged else info.bnb_8bit) or ""
    return info.factory


def require_bitsandbytes(load: bool = True) -> None:
    """bitsandbytes must be installed for 8-bit states. `load`: import it (where an optimizer is built);
    else only find it (validation: importing it costs seconds, and a worker imports it anyway)."""
    import importlib.util

    if not load:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"--state-bits 8 needs bitsandbytes, which is not installed: {BNB_INSTALL}")
        return
    # its CPU backend logs a warning at import about an optional 4-bit kernel memprof never uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401  (only whether it imports)
    except ImportError:
        raise UsageError(f"--state-bits 8 needs bitsandbytes, which is not installed: {BNB_INSTALL}") from None


IMPL_KWARGS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "forloop": {"foreach": False}}


def build_optimizer(info: OptimInfo, params, state_bits: int = 32, paged: bool = False, impl: str = "foreach",
                    in_backward: bool = False):
    """The optimizer over `params` (only trainable ones should be passed): torch/timm in implementation
    `impl` for 32-bit states, bitsandbytes for 8-bit ones; with `in_backward`, an InBackward over them."""
    path = optimizer_class(info, state_bits, paged)
    if not path:
        raise ValueError(f"{info.name} has no {'paged ' if paged else ''}{state_bits}-bit implementation")
    if state_bits == 8:
        require_bitsandbytes()
    module, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    if state_bits == 32 and impl not in info.impls:
        raise ValueError(f"{info.name} has no {impl} implementation")
    extra = IMPL_KWARGS[impl] if state_bits == 32 else {}

    def make(ps):
        return cls(ps, lr=info.lr, **extra, **dict(info.kwargs))

    return InBackward(list(params), make) if in_backward else make(params)


def step(optimizer, scaler=None) -> None:
    """optimizer.step(), through the GradScaler where there is one (its unscale and inf check, then its update)."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


class InBackward:
    """Optimizer-in-backward: one optimizer per parameter, stepped by the parameter's post-accumulate-grad hook
    the moment its gradient is complete, then `zero_grad(set_to_none=True)` frees that gradient (PyTorch
    tutorial "How to save memory by fusing the optimizer step into the backward pass"). Full gradients never
    coexist, and no optimizer phase follows backward. `on_grad(p)`, if set, is called before each step (a
    tracer records the gradient's storage there). `state` merges the per-parameter states."""

    def __init__(self, params: list, make):
        self.optimizers = {p: make([p]) for p in params}
        self.on_grad = None
        self.steps = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p) -> None:
        if self.on_grad is not None:
            self.on_grad(p)
        opt = self.optimizers[p]
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.steps += 1

    @property
    def state(self) -> dict:
        return {p: st for opt in self.optimizers.values() for p, st in opt.state.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
