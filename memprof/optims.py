"""Optimizer registry: one frozen spec per entry, with the seed paper's defaults (PyTorch's, Appendix A).

Every optimizer is built with `foreach=True`, the multi-tensor implementation that torch
(`torch.optim.optimizer._default_to_fused_or_foreach`) and timm (`_resolve_foreach`) pick by default for
CUDA parameters, so a CPU run executes the same code, and allocates the same temporaries, as a GPU run.
"""

from __future__ import annotations

import importlib
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


ADAMW = (("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.01))
SGD_MOMENTUM = (("momentum", 0.9), ("weight_decay", 0.0), ("dampening", 0.0))
SGD_PLAIN = (("momentum", 0.0), ("weight_decay", 0.0))

REGISTRY: dict[str, OptimInfo] = {o.name: o for o in (
    OptimInfo("adamw", "AdamW", "torch AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.01",
              "torch.optim.AdamW", 1e-5, ADAMW, state_tensors_per_param=2, paper=True),
    OptimInfo("sgd", "SGD", "torch SGD, momentum 0.9, weight decay 0",
              "torch.optim.SGD", 1e-3, SGD_MOMENTUM, state_tensors_per_param=1, paper=True),
    OptimInfo("sgd-fe", "SGD (freeze-embed)", "SGD with momentum 0.9, embedding layer frozen",
              "torch.optim.SGD", 1e-3, SGD_MOMENTUM, freeze_embed=True, state_tensors_per_param=1, paper=True),
    OptimInfo("sgd-fe-nomom", "SGD (freeze-embed, no momentum)", "SGD without momentum, embedding layer frozen",
              "torch.optim.SGD", 1e-3, SGD_PLAIN, freeze_embed=True, paper=True),
    OptimInfo("sgd-nomom", "SGD (no momentum)", "SGD without momentum",
              "torch.optim.SGD", 1e-3, SGD_PLAIN),
    OptimInfo("adamw-fe", "AdamW (freeze-embed)", "AdamW with the embedding layer frozen (paper Appendix D)",
              "torch.optim.AdamW", 1e-5, ADAMW, freeze_embed=True, state_tensors_per_param=2),
    OptimInfo("lars", "LARS", "timm LARS, momentum 0.9 (paper Table 5)",
              "timm.optim.Lars", 1e-3, (("momentum", 0.9),), state_tensors_per_param=1),
    OptimInfo("lamb", "LAMB", "timm LAMB, betas (0.9, 0.999), weight decay 0.01 (paper Table 5)",
              "timm.optim.Lamb", 1e-3, (("betas", (0.9, 0.999)), ("weight_decay", 0.01)),
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


def build_optimizer(info: OptimInfo, params):
    """The optimizer over `params` (only trainable ones should be passed), in its foreach implementation."""
    module, _, cls_name = info.factory.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls(params, lr=info.lr, foreach=True, **dict(info.kwargs))
