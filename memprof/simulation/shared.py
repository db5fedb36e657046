"""One forward/backward trace shared by every optimizer of a configuration: what makes a grid, `fit` and
`advise` fast, since a prediction's forward and backward do not depend on the optimizer, only on which
parameters train.

How: the training steps run once per forward key (the spec without its optimizer fields, with whether the
embedding is frozen) under a stand-in optimizer that steps nothing and frees the gradients as
zero_grad(set_to_none=True) does; each step's optimizer window (step() to the end of zero_grad) is marked in
the stream. Each optimizer is then traced alone on the same fake parameters, with gradients made like the
shared trace's, under a tracker that adopts their storage ids; its window replaces the stand-in's. The
stream is the one `tracing.trace_step` gives, storage ids aside (tests/test_shared_trace.py compares every
metric). The rules' state after the shared part is copied into each optimizer's rule instances, so their
metrics and stream rewrites see both parts.

Traced whole instead (`shareable`): optimizer-in-backward (its steps run inside backward), fp16-amp (the
GradScaler steps the optimizer), data-parallel and sharded runs, `py:` models (the user's factory), and real
tensors (the cpu backend).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          FakeTensorMode, unset_fake_temporarily)

from memprof.harness import apply_precision, prepare
from memprof.optims import REGISTRY as OPTIMS, build_optimizer
from memprof.simulation.attribution import ModuleAttribution
from memprof.simulation.distributed import local
from memprof.simulation.fake_compat import fake_storage
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec, forward_group

CACHE_ENTRIES = 8  # forward traces kept per process (e.g. frozen or not x checkpointing off or on x 2 batch sizes)


def shareable(spec: RunSpec) -> bool:
    """Whether `spec`'s forward can come from the cache: not for the setups above, nor for a `py:` model,
    whose factory is the user's code and may build something else on the next call."""
    return (spec.parallel == "none" and not spec.optim_in_backward and spec.precision != "fp16-amp"
            and not spec.model.startswith("py:"))


def forward_key(spec: RunSpec, rules) -> tuple:
    return forward_group(spec), tuple(type(r).__name__ for r in rules)


@dataclass
class Forward:
    """The shared part: the fake model and the stream of its steps, with the stand-in's windows."""
    mode: FakeTensorMode
    model: torch.nn.Module
    frozen: list
    trainable: list
    resident_ids: list  # storage id of each tensor in tracing.to_device_order(model)
    events: list
    origin: dict
    module: dict
    params: set
    windows: list  # per step: [first event, end event, [(trainable index, id, size, stride, dtype) per gradient]]
    rule_state: list  # each rule's attributes after the shared part
    next_id: int


class _StandIn:
    """Steps nothing; zero_grad frees the gradients as zero_grad(set_to_none=True) does; marks the window."""

    def __init__(self, tracker: StorageTracker, trainable: list):
        self.tracker, self.trainable, self.windows = tracker, trainable, []

    def step(self) -> None:
        grads = [(i, self.tracker.storage_id(local(p.grad)), p.grad.size(), p.grad.stride(), p.grad.dtype)
                 for i, p in enumerate(self.trainable) if p.grad is not None]
        self.windows.append([len(self.tracker.events), None, grads])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.trainable:
            p.grad = None
        self.windows[-1][1] = len(self.tracker.events)


def _copy_state(state: dict) -> dict:
    return {k: type(v)(v) if isinstance(v, (dict, list, set)) else v for k, v in state.items()}


def trace_forward(spec: RunSpec, rules) -> Forward:
    """The steps of `spec` with the stand-in optimizer, on fake tensors, under `rules`."""
    from memprof.simulation import tracing
    from memprof.simulation.tracing import _untraceable, to_device_order

    with torch.device("meta"):
        prepared = prepare(spec, load_weights=False)
    model, mode = prepared.model, FakeTensorMode()
    with tracing.no_gc(), mode, contextlib.ExitStack() as stack:
        fake_storage(model)
        apply_precision(model, spec)
        trainable = [p for p in model.parameters() if p.requires_grad]
        tracker = stack.enter_context(StorageTracker(rules))
        for rule_mode in [r.mode() for r in rules if hasattr(r, "mode")]:
            stack.enter_context(rule_mode)
        params = {tracker.register(local(t), "Module.to (parameters and buffers)") for t in to_device_order(model)}
        attribution = stack.enter_context(ModuleAttribution(model, tracker))
        stand_in = _StandIn(tracker, trainable)
        try:
            tracing.train_steps(model, stand_in, spec, "cpu", tracker.set_phase)  # looked up there: one place to patch
        except (DataDependentOutputException, DynamicOutputShapeException) as exc:
            raise _untraceable(exc, model) from None
        return Forward(mode, model, prepared.frozen, trainable,
                       [tracker.storage_id(local(t)) for t in to_device_order(model)], list(tracker.events),
                       dict(tracker.origin), attribution.result(), params, stand_in.windows,
                       [_copy_state(vars(r)) for r in rules], tracker._next_id)


def trace_optimizer(fwd: Forward, spec: RunSpec, rules):
    """The full trace of `spec`: `fwd`'s stream with `spec`'s optimizer traced into each window."""
    from memprof.simulation.tracing import Trace, _categorize, common_rule_metrics, floor, no_gc, state_summary, \
        to_device_order

    for rule, state in zip(rules, fwd.rule_state):
        vars(rule).update(_copy_state(state))
    model, trainable = fwd.model, fwd.trainable
    with no_gc(), fwd.mode, contextlib.ExitStack() as stack:
        with unset_fake_temporarily():
            optimizer = build_optimizer(OPTIMS[spec.optim], trainable, spec.state_bits, spec.paged, spec.optim_impl)
        # every step's gradients, made before the tracker sees them (the shared stream has their allocations)
        made = [[(i, sid, torch.empty_strided(size, stride, dtype=dtype)) for i, sid, size, stride, dtype in grads]
                for _, _, grads in fwd.windows]
        tracker = stack.enter_context(StorageTracker(rules))
        tracker._next_id = fwd.next_id
        for rule_mode in [r.mode() for r in rules if hasattr(r, "mode")]:
            stack.enter_context(rule_mode)
        for t, sid in zip(to_device_order(model), fwd.resident_ids):
            if sid is not None:
                tracker.adopt(local(t), sid, log_release=False)
        for rule in rules:
            rule.attach(tracker, optimizer)
        attribution = stack.enter_context(ModuleAttribution(model, tracker, optimizer))
        step_now, grads, windows = [0], set(), []
        hook = optimizer.register_step_pre_hook(lambda *_: tracker.set_phase("optimizer", step_now[0]))
        for step in range(len(made)):
            step_now[0] = step
            while made[step]:
                i, sid, grad = made[step].pop(0)
                trainable[i].grad = grad
                tracker.adopt(grad, sid)
                grads.add(sid)
                del grad
            start = len(tracker.events)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            windows.append((start, len(tracker.events)))
        hook.remove()
        events, at = [], 0
        for (first, end, _), (b_first, b_end) in zip(fwd.windows, windows):
            events += fwd.events[at:first]
            events += tracker.events[b_first:b_end]
            at = end
        events += fwd.events[at:]
        states = {tracker.storage_id(local(t)) for s in optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor)}
        result = Trace(events, {}, {**fwd.origin, **tracker.origin},
                       params_total=sum(p.numel() for p in model.parameters()),
                       params_trainable=sum(p.numel() for p in trainable), frozen=fwd.frozen,
                       state=state_summary(optimizer), rules=[r.describe() for r in rules],
                       module={**fwd.module, **attribution.result()},
                       extra={**common_rule_metrics(rules), **floor(model, trainable, optimizer)})
        del optimizer
    result.category = _categorize(result.events, fwd.params, grads, states, result.origin)
    return result


_CACHE: OrderedDict = OrderedDict()


def clear() -> None:
    """Forget every forward trace (benchmarks time a prediction from scratch this way)."""
    _CACHE.clear()


def trace_shared(spec: RunSpec, rules):
    """The trace of `spec` under `rules`, its forward and backward taken from this process's cache when an
    earlier spec with the same forward key traced them."""
    key = forward_key(spec, rules)
    fwd = _CACHE.get(key)
    if fwd is None:
        fwd = trace_forward(spec, rules)
        _CACHE[key] = fwd
        while len(_CACHE) > CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    try:
        return trace_optimizer(fwd, spec, rules)
    except BaseException:  # a failed step may leave gradients on the shared parameters: trace afresh next time
        _CACHE.pop(key, None)
        raise
