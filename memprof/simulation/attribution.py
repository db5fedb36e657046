"""Which module each storage belongs to: the dotted module path (e.g. `visual.transformer.resblocks.11.mlp`).

How: while the harness runs, global module hooks (forward) and tensor hooks (backward) say which modules
are running (`_ModuleStack`, modelled on torch.utils.module_tracker.ModuleTracker but holding no tensor, so
the memory it watches is the memory without it); the one entered last is the innermost, the module an
allocation is made in, forward or backward (a gradient or a backward temporary belongs to the module whose
backward makes it).
Parameters, their gradients and the optimizer's state are then attributed statically to the module that
owns the parameter (they are made outside any forward: `Module.to`, AccumulateGrad, the optimizer step).
An allocation outside every module is labelled by its phase, e.g. "(optimizer step)".
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_flatten

OUTSIDE = {"setup": "(setup)", "forward": "(forward, outside modules)", "backward": "(backward, outside modules)",
           "optimizer": "(optimizer step)", "done": "(after the step)"}
WORKSPACE = "(cuBLAS workspace)"


class _ModuleStack:
    """Which modules are running, forward and backward, without holding any tensor.

    Like torch.utils.module_tracker.ModuleTracker (global forward pre/post hooks), but backward entry and
    exit come from plain tensor hooks (`Tensor.register_hook` on a module's outputs: its backward begins
    when their gradient is ready; on its inputs: it ends when theirs is), not register_multi_grad_hook,
    which buffers every gradient it sees until its hook is removed and so would change the memory measured.
    A module whose output is its input (nn.Identity) sees its backward exit before its entry; that entry is
    dropped. Whatever is still open when the backward ends is closed then (an engine callback).
    """

    def __init__(self, root: torch.nn.Module):
        self.names = {m: n for n, m in root.named_modules()}
        self.running: dict[str, int] = {}  # module path -> when it was entered (the latest is the innermost)
        self._exited_early: set[str] = set()
        self._clock = itertools.count()
        self._callback_queued = False
        self._handles = []

    def _enter(self, name: str, backward: bool) -> None:
        if backward:
            if name in self._exited_early:
                self._exited_early.discard(name)
                return
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
                self._callback_queued = True
        self.running[name] = next(self._clock)

    def _exit(self, name: str, backward: bool) -> None:
        if name in self.running:
            del self.running[name]
        elif backward:
            self._exited_early.add(name)

    def _backward_done(self) -> None:
        self.running.clear()
        self._exited_early.clear()
        self._callback_queued = False

    @staticmethod
    def _grad_tensors(value) -> list:
        flat, _ = tree_flatten(value)
        return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None]

    def _pre(self, module, args) -> None:
        name = self.names.get(module)
        if not name:  # not the model's (or the model itself: "outside modules")
            return
        self._enter(name, False)
        for t in self._grad_tensors(args):
            t.register_hook(lambda _g, name=name: self._exit(name, True))

    def _post(self, module, args, output) -> None:
        name = self.names.get(module)
        if not name:
            return
        self._exit(name, False)
        for t in self._grad_tensors(output):
            t.register_hook(lambda _g, name=name: self._enter(name, True))

    def innermost(self) -> str:
        return max(self.running, key=self.running.get) if self.running else ""

    def __enter__(self):
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self.names = [], {}
        return False


class ModuleAttribution:
    """Context manager: sets `tracker.where` to the innermost running module; `owners(...)` fixes parameters,
    gradients and optimizer state to their parameter's module."""

    def __init__(self, model: torch.nn.Module, tracker, optimizer=None, weak: bool = False):
        self.tracker = tracker
        self.modules = _ModuleStack(model)
        self._param_module = {}  # id(parameter) -> module path
        for name, p in model.named_parameters():
            self._param_module[id(p)] = name.rpartition(".")[0]
        if weak:  # (a user's script may drop its model: hold neither it nor a weak reference to a tensor, which
            # would refuse the swap that moves a parameter off the device)
            root = weakref.ref(model)
            self._params = _WeakParams(root)
            self.modules.names = weakref.WeakKeyDictionary(self.modules.names)
        else:
            self._params = [p for p in model.parameters()]
        self._buffers = [(b, name.rpartition(".")[0]) for name, b in model.named_buffers()]
        self.owner: dict[int, str] = {}  # storage id -> module path (static attribution)
        self._hooks = []
        # each optimizer that steps: the one given, or each per-parameter one of optims.InBackward
        per_param = getattr(optimizer, "optimizers", None)  # {parameter: optimizer}
        for opt in per_param.values() if per_param else ([optimizer] if optimizer is not None else []):
            self._hooks.append(opt.register_step_pre_hook(lambda o, *_: self._grads()))
            self._hooks.append(opt.register_step_post_hook(lambda o, *_: self._states(o)))

    def where(self) -> str:
        return self.modules.innermost()

    def _own(self, tensor, module: str) -> None:
        sid = self.tracker.storage_id(tensor)
        if sid is not None:
            self.owner[sid] = module

    def _grads(self) -> None:
        for p in self._params:
            if p.grad is not None:
                self._own(p.grad, self._param_module.get(id(p), ""))

    def _states(self, optimizer) -> None:
        for p, state in optimizer.state.items():
            module = self._param_module.get(id(p))
            if module is None:
                continue
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    self._own(t, module)

    def __enter__(self):
        for p in self._params:
            self._own(p, self._param_module[id(p)])
        for b, module in self._buffers:
            self._own(b, module)
        self._buffers = [] if isinstance(self._params, _WeakParams) else self._buffers
        self.modules.__enter__()
        self.tracker.where = self.where
        return self

    def __exit__(self, *exc):
        self.tracker.where = None
        self.modules.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._params, self._buffers = [], []  # the model's storages die with the model, not with this object
        return False

    def result(self) -> dict[int, str]:
        """storage id -> module path, static attribution first, then where it was made ("" outside modules)."""
        return {**self.tracker.module, **self.owner}


class _WeakParams:
    """A model's parameters, read from the model while it lives (nothing once it is gone)."""

    def __init__(self, root):
        self._root = root

    def __iter__(self):
        model = self._root()
        return iter(() if model is None else list(model.parameters()))


def holder(module: str, category: str, phase: str) -> str:
    """What a report names as a storage's holder: its module, or what made it outside modules."""
    if category == "workspace":
        return WORKSPACE
    return module or OUTSIDE.get(phase, f"({phase})")
