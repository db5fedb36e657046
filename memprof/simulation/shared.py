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

More shortcuts, each exact and checked: math-path attention is replayed from recordings
(memprof.simulation.math_attention, in `trace_forward`, traced again op by op if the replay breaks); a deep
ViT's forward is traced with four of its blocks (memprof.simulation.repeated_blocks, in `trace_forward`);
within `scaling_in_batch` (fit's probes) the forward at a new batch comes from a line through two traced
batches (memprof.simulation.batch_scaling), and an optimizer's windows, once two traces of them agree, are
reused at other batches (`_with_windows`).

Traced whole instead (`shareable`): optimizer-in-backward (its steps run inside backward), fp16-amp (the
GradScaler steps the optimizer), data-parallel and sharded runs, `py:` models (the user's factory), gradients
cleared before the backward (the optimizer's gradients live through the next forward), gradient accumulation
(the gradients live through the next micro-step, summed in place), and real tensors (the cpu backend).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          FakeTensorMode, unset_fake_temporarily)

from memprof.harness import apply_precision, prepare
from memprof.models import rebuilds_alike
from memprof.optims import REGISTRY as OPTIMS, build_optimizer
from memprof.simulation.attribution import ModuleAttribution
from memprof.simulation.distributed import local
from memprof.simulation.fake_compat import fake_storage, register_meta_kernels
from memprof.simulation.memo import FORWARD_ENTRIES, MEMO, Memo
from memprof.simulation.rule import declared
from memprof.simulation.tracker import StorageTracker
from memprof.spec import OPTIMIZER_FIELDS, RunSpec, forward_group



def shareable(spec: RunSpec) -> bool:
    """Whether `spec`'s forward can come from the cache: not for the setups above, nor for a `py:` model,
    whose factory is the user's code and may build something else on the next call."""
    return (spec.parallel == "none" and not spec.optim_in_backward and spec.precision != "fp16-amp"
            and rebuilds_alike(spec.model) and spec.clear_grads == "after-step" and spec.grad_accum == 1)


def forward_key(spec: RunSpec, rules) -> tuple:
    """What a forward trace depends on besides its spec and rules: the SDPA kernel switches the rules read."""
    switches = tuple(f() for f in (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
                                   torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled))
    return forward_group(spec), tuple(type(r).__name__ for r in rules), switches


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


def trace_forward(spec: RunSpec, rules, repeat_blocks: bool = True, replay_attention: bool = True,
                  memo: Memo = MEMO) -> Forward:
    """The steps of `spec` with the stand-in optimizer, on fake tensors, under `rules`. A deep ViT is traced with
    four of its blocks and the rest synthesized (memprof.simulation.repeated_blocks), unless `repeat_blocks`
    is False or the traced blocks do not repeat exactly; math-path attention is replayed
    (memprof.simulation.math_attention) unless `replay_attention` is False or the replay breaks."""
    from memprof.simulation import math_attention, repeated_blocks, tracing
    from memprof.simulation.tracing import _untraceable, to_device_order

    with torch.device("meta"):
        prepared = prepare(spec, load_weights=False)
    register_meta_kernels()
    model, mode = prepared.model, FakeTensorMode()
    stack_of = repeated_blocks.block_stack(model) if repeat_blocks else None
    if stack_of is not None and len({tuple(p.requires_grad for p in b.parameters()) for b in stack_of[3]}) > 1:
        stack_of = None  # --train last:N: blocks that train and blocks that do not are no repeating stack
    if stack_of is not None and any(isinstance(getattr(m, "base_layer", None), torch.nn.MultiheadAttention)
                                    for m in model.modules()):
        stack_of = None  # peft's MultiheadAttention LoRA re-registers its weights in each forward: traced whole
    initial = [r.state() for r in rules]  # to trace afresh if the blocks do not repeat
    with tracing.no_gc(), mode, contextlib.ExitStack() as stack:
        fake_storage(model)
        apply_precision(model, spec)
        full_order, full_trainable = list(to_device_order(model)), [p for p in model.parameters() if p.requires_grad]
        if stack_of is not None:  # trace the first blocks only; the full stack comes back on the way out
            parent, attr, path, blocks = stack_of
            setattr(parent, attr, torch.nn.ModuleList(list(blocks)[:repeated_blocks.TRACED]))
            stack.callback(setattr, parent, attr, blocks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        order = list(to_device_order(model))
        tracker = stack.enter_context(StorageTracker(rules, front=memo.front))
        for rule_mode in [r.mode() for r in rules if hasattr(r, "mode")]:
            stack.enter_context(rule_mode)
        params = {tracker.register(local(t), "Module.to (parameters and buffers)") for t in order}
        attribution = stack.enter_context(ModuleAttribution(model, tracker))
        if stack_of is not None:
            marks = repeated_blocks.BlockMarks(tracker, getattr(parent, attr), rules)
            stack.callback(marks.remove)
        stand_in = _StandIn(tracker, trainable)
        try:
            with math_attention.replaying(tracker, memo) if replay_attention else contextlib.nullcontext():
                tracing.train_steps(model, stand_in, spec, "cpu", tracker.set_phase)  # looked up there: one place to patch
        except (DataDependentOutputException, DynamicOutputShapeException) as exc:
            raise _untraceable(exc, model) from None
        broken = math_attention.broken(tracker)
        traced = Forward(mode, model, prepared.frozen, trainable, [tracker.storage_id(local(t)) for t in order],
                         list(tracker.events), dict(tracker.origin), attribution.result(), params, stand_in.windows,
                         [r.state() for r in rules], tracker.next_id)
    if broken:
        _reset(rules, initial)
        return trace_forward(spec, rules, repeat_blocks, replay_attention=False, memo=memo)
    if stack_of is None:
        return traced
    try:
        return repeated_blocks.expand(traced, marks, blocks, path, [declared(r) for r in rules], order,
                                      trainable, full_order, full_trainable)
    except repeated_blocks.NotPeriodic:
        _reset(rules, initial)
        return trace_forward(spec, rules, repeat_blocks=False, replay_attention=replay_attention, memo=memo)


def _reset(rules, states) -> None:
    for rule, state in zip(rules, states):
        rule.load_state(state)


@dataclass
class Windows:
    """What one optimizer adds to a shared forward: its events in each step's window and what they made."""
    events: list  # per step
    origin: dict
    module: dict
    grads: set
    states: set
    state: dict  # tracing.state_summary of the optimizer after the last step
    floor: dict
    rule_state: list  # each rule's attributes after the optimizer's steps


def trace_windows(fwd: Forward, spec: RunSpec, rules, memo: Memo = MEMO) -> Windows:
    """`spec`'s optimizer traced into each window of `fwd`, under `rules` (given `fwd`'s state first)."""
    from memprof.simulation.tracing import floor, no_gc, state_summary, to_device_order

    for rule, state in zip(rules, fwd.rule_state):
        rule.load_state(state)
    model, trainable = fwd.model, fwd.trainable
    with no_gc(), fwd.mode, contextlib.ExitStack() as stack:
        with unset_fake_temporarily():
            optimizer = build_optimizer(OPTIMS[spec.optim], trainable, spec.state_bits, spec.paged, spec.optim_impl)
        # every step's gradients, made before the tracker sees them (the shared stream has their allocations)
        made = [[(i, sid, torch.empty_strided(size, stride, dtype=dtype)) for i, sid, size, stride, dtype in grads]
                for _, _, grads in fwd.windows]
        tracker = stack.enter_context(StorageTracker(rules, front=memo.front))
        tracker.continue_ids(fwd.next_id)
        for rule_mode in [r.mode() for r in rules if hasattr(r, "mode") and not r.forward_only]:
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
            windows.append(tracker.events[start:])
        hook.remove()
        states = {tracker.storage_id(local(t)) for s in optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor)}
        result = Windows(windows, dict(tracker.origin), attribution.result(), grads, states,
                         state_summary(optimizer), floor(model, trainable, optimizer), [])
        del optimizer
    result.rule_state = [r.state() for r in rules]
    return result


def splice(fwd: Forward, opt: Windows, rules):
    """The full trace: `fwd`'s stream with `opt`'s events in place of the stand-in's windows; `rules` as they
    are after the optimizer's steps."""
    from memprof.adapters import model_split
    from memprof.simulation.tracing import Trace, _categorize, common_rule_metrics

    events, at = [], 0
    for (first, end, _), window in zip(fwd.windows, opt.events):
        events += fwd.events[at:first]
        events += window
        at = end
    events += fwd.events[at:]
    model = fwd.model
    result = Trace(events, {}, {**fwd.origin, **opt.origin},
                   params_total=sum(p.numel() for p in model.parameters()),
                   params_trainable=sum(p.numel() for p in fwd.trainable), frozen=fwd.frozen,
                   state=opt.state, rules=[r.describe() for r in rules], module={**fwd.module, **opt.module},
                   extra={**common_rule_metrics(rules), **opt.floor, **model_split(model, fwd.trainable)})
    result.category = _categorize(result.events, fwd.params, opt.grads, opt.states, result.origin)
    return result


def trace_optimizer(fwd: Forward, spec: RunSpec, rules, memo: Memo = MEMO):
    """The full trace of `spec`: `fwd`'s stream with `spec`'s optimizer traced into each window."""
    return splice(fwd, trace_windows(fwd, spec, rules, memo), rules)


def clear() -> None:
    """Forget every forward trace of the process's memo, its attention recordings kept (benchmarks time a
    prediction from scratch with MEMO.clear(), which forgets those too)."""
    MEMO.clear(attention=False)


def scaling_in_batch():
    """The process's memo's batch lines on, within (memprof.simulation.memo.Memo.scaling_in_batch)."""
    return MEMO.scaling_in_batch()


def _family_key(spec: RunSpec, rules) -> tuple:
    return forward_key(replace(spec, batch_size=0), rules)


def _from_line(spec: RunSpec, rules, memo: Memo):
    """The forward of `spec` from its family's verified batch line, or None."""
    family = memo.lines.get(_family_key(spec, rules))
    if family is None or not family["verified"]:
        return None
    return family["line"].at(spec.batch_size)


def _with_windows(fwd: Forward, spec: RunSpec, rules, memo: Memo):
    """The trace of `spec` on `fwd`. An optimizer's windows do not depend on the batch (its gradients do not),
    so once they are traced at two batches whose forwards made the same gradients (same storages, same
    windows) and the second matches what the first gives there, they are reused instead of traced; the
    rules' state is then `fwd`'s with what the optimizer changed."""
    from memprof.simulation.batch_scaling import same_state, same_value

    key = (_family_key(spec, rules), *(getattr(spec, f) for f in OPTIMIZER_FIELDS))
    made_by = (fwd.windows, fwd.resident_ids, fwd.next_id)  # the gradients and storages the windows refer to
    seen = memo.windows.get(key)  # [Windows, rule attributes the optimizer changed, made_by, verified]
    if seen is not None and seen[2] != made_by:  # e.g. batch 1's forward, whose other paths make other storages
        if seen[3]:
            return trace_optimizer(fwd, spec, rules, memo)
        seen = None  # the newer forward is more like the ones to come
    if seen is not None and seen[3]:
        for rule, before, changed in zip(rules, fwd.rule_state, seen[1]):
            rule.load_state({**before, **changed})
        return splice(fwd, seen[0], rules)
    opt = trace_windows(fwd, spec, rules, memo)
    traced = splice(fwd, opt, rules)
    if seen is None:
        changed = [{k: v for k, v in after.items() if k not in before or not same_value(before[k], v)}
                   for before, after in zip(fwd.rule_state, opt.rule_state)]
        memo.windows[key] = [opt, changed, made_by, None]
    elif seen[3] is None:
        reused_state = [{**before, **changed} for before, changed in zip(fwd.rule_state, seen[1])]
        twins = [copy.copy(r) for r in rules]
        for twin, state in zip(twins, reused_state):
            twin.load_state(state)
        seen[3] = same_state(reused_state, opt.rule_state) and splice(fwd, seen[0], twins) == traced
    return traced


def _learn(spec: RunSpec, rules, fwd: Forward, memo: Memo) -> None:
    """Add a traced forward to its family: the first two (batch 2 or more) make the line, the third checks it."""
    from memprof.simulation.batch_scaling import BatchLine, NotAffine

    if spec.batch_size < 2:  # batch 1 often takes other paths (views already contiguous)
        return
    family = memo.lines.setdefault(forward_key(replace(spec, batch_size=0), rules),
                               {"traced": {}, "line": None, "verified": None})
    if family["verified"] is not None:
        return
    if family["line"] is not None:
        family["verified"] = family["line"].verify(fwd, spec.batch_size)
        family["traced"].clear()
        return
    family["traced"][spec.batch_size] = fwd
    if len(family["traced"]) == 2:
        (b1, f1), (b2, f2) = sorted(family["traced"].items())
        try:
            family["line"] = BatchLine(f1, b1, f2, b2)
        except NotAffine:
            family["verified"] = False
            family["traced"].clear()


def trace_shared(spec: RunSpec, rules, memo: Memo = MEMO):
    """The trace of `spec` under `rules`, its forward and backward taken from `memo` when an earlier spec with
    the same forward key traced them (and put there when not)."""
    key = forward_key(spec, rules)
    fwd = memo.forwards.get(key)
    if fwd is not None:
        memo.forwards.move_to_end(key)
    elif memo.scaling:
        fwd = _from_line(spec, rules, memo)  # not kept: made again in an instant
    if fwd is None:
        fwd = trace_forward(spec, rules, memo=memo)
        if memo.scaling:
            _learn(spec, rules, fwd, memo)
        memo.forwards[key] = fwd
        while len(memo.forwards) > FORWARD_ENTRIES:
            memo.forwards.popitem(last=False)
    try:
        return _with_windows(fwd, spec, rules, memo) if memo.scaling else trace_optimizer(fwd, spec, rules, memo)
    except BaseException:  # a failed step may leave gradients on the shared parameters: trace afresh next time
        memo.forwards.pop(key, None)
        memo.lines.pop(_family_key(spec, rules), None)
        memo.windows.pop((_family_key(spec, rules), *(getattr(spec, f) for f in OPTIMIZER_FIELDS)), None)
        raise
