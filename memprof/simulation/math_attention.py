"""The math-path attention as one autograd node that makes the composite's requests: recorded, then replayed.

Below sm80, CUDA runs bf16 scaled_dot_product_attention on the math path (memprof.simulation.rules.
HalfPrecisionAttention): `_scaled_dot_product_attention_math`, an ATen composite of about 15 ops forward and
25 backward (fp32 copies of q, k and v, scaled scores, softmax, two batched matmuls, casts back). Traced op by
op on fake tensors it costs more than the rest of a transformer block. Its requests depend only on the
inputs' layout (shape, strides, offset, dtype, storage) and on the incoming gradient's, so:

- recorded: the first time a layout is seen, the composite runs on fresh fake tensors of that layout, in
  isolation: its events go to a scratch list, and the tracker's ids and the rules' state are left as they
  were. The backward is recorded the first time a gradient layout reaches it (forward and backward again).
  A recording is refused, and the composite runs op by op from then on, when it changes a rule's state,
  frees a storage it did not make (other than the incoming gradient), or leaves one alive other than the
  output, what backward needs and the gradients;
- replayed: each call is one autograd Function. Its forward makes the recorded forward requests, the output
  a fake tensor made at its place in the stream under the composite's op name; its backward makes the
  recorded backward requests, releases the incoming gradient where the composite releases it, and returns
  gradients of the recorded layouts, made at their places;
- checked: the incoming gradient's storage must die as soon as the node returns, as it does after the
  composite's first backward op. Anything that keeps it longer, or a backward that cannot be recorded once
  the forward was replayed, marks the tracker `broken`; memprof.simulation.shared then traces again with
  the composite op by op.

Used only inside `replaying()` (the shared forward trace), with gradients on, no mask, no dropout and no
saved-tensor hooks (checkpointing keeps nothing and recomputes). Recordings are kept for the process, by
layout and by the rules' state where the trace first attends: a trace under rules that stand as an earlier
one's (the same card and precision, e.g. the next optimizer on the same model) replays that trace's recordings.
Within a trace the first recording of a layout serves every call (a recording that would change the rules'
state is refused). tests/test_math_attention.py compares replayed traces with op-by-op ones.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from memprof.simulation.events import ALLOC, FREE, first_allocation
from memprof.simulation.fast_dispatch import extent_bytes
from memprof.simulation.rule import snapshot
from memprof.simulation.memo import ATTENTION_ENTRIES
from memprof.simulation.rules import math_composite
from memprof.simulation.tracker import StorageTracker, current_tracker

aten = torch.ops.aten
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_REFUSED = object()


@dataclass
class Template:
    """One layout's requests. Entries: ("a", local, nbytes, op) a request; ("o", local, nbytes, op) the
    output's (fwd) or ("g", i, nbytes, op) gradient i's (bwd); ("f", local) a release; ("go",) the
    incoming gradient's release. Forward locals alive after the forward are `saved`."""
    fwd: list
    saved: tuple
    out: tuple  # (shape, stride, offset, dtype, storage bytes)
    bwd: dict = field(default_factory=dict)  # incoming gradient's layout -> (entries, gradients' layouts) or _REFUSED



@dataclass
class _TraceState:
    """One trace's replays: the memo holding its recordings (memprof.simulation.memo.Memo), the rules' state
    where it first attends (its recordings' key), why it broke, the released gradients watched."""
    memo: object = None
    rules: tuple | None = None
    broken: str | None = None
    watches: list = field(default_factory=list)


def _rules_key(tracker) -> tuple:
    """The tracker's rules and their state (memprof.simulation.rule.snapshot), hashable."""
    return tuple((type(r).__qualname__, *((k, frozenset(v.items()) if isinstance(v, dict) else v)
                                          for k, v in snapshot(r).items())) for r in tracker.rules)


def _state(tracker) -> _TraceState:
    return tracker.attention_state


@contextlib.contextmanager
def replaying(tracker: StorageTracker, memo):
    """Within, math-path attention under `tracker` is replayed where it can be, from `memo`'s recordings."""
    saved = tracker.math_attention
    tracker.math_attention = attention
    if tracker.attention_state is None:
        tracker.attention_state = _TraceState(memo)
    try:
        yield
    finally:
        tracker.math_attention = saved


def _layout(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, st.nbytes(), st._cdata


def _inputs_key(tensors) -> tuple | None:
    """The layouts of q, k, v, with which of them share a storage (by first index), or None."""
    rows, first = [], {}
    for i, t in enumerate(tensors):
        shape, stride, offset, dtype, nbytes, cdata = _layout(t)
        group = first.setdefault(cdata, i)
        if tensors[group].dtype != dtype:
            return None
        rows.append((shape, stride, offset, dtype, nbytes, group))
    return tuple(rows)


def _base(dtype, nbytes: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.empty((nbytes // dtype.itemsize,), dtype=dtype, requires_grad=requires_grad)


def _make(shape, stride, offset, dtype, nbytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner of the new storage, the tensor of this layout on it): one tensor unless the layout needs a view."""
    if offset == 0 and nbytes == extent_bytes(shape, stride, dtype.itemsize):
        t = torch.empty_strided(shape, stride, dtype=dtype)
        return t, t
    base = _base(dtype, nbytes)
    return base, base.as_strided(shape, stride, offset)


def _fresh_inputs(key: tuple) -> list:
    bases, out = {}, []
    for shape, stride, offset, dtype, nbytes, group in key:
        if group not in bases:
            bases[group] = _base(dtype, nbytes, requires_grad=True)
        out.append(bases[group].as_strided(shape, stride, offset))
    return out


def _composite(q, k, v, is_causal, scale):
    with torch.enable_grad(), torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
        return aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, is_causal, scale=scale)[0]


@contextlib.contextmanager
def _isolated(tracker: StorageTracker, result: dict):
    """Events go to a scratch list (result["events"], StorageTracker.scratch); afterwards the tracker's ids and
    the rules' state are as before. result["clean"] says whether the rules' state was untouched and nothing made
    inside is alive."""
    states = [r.state() for r in tracker.rules]
    snapshots = [snapshot(r) for r in tracker.rules]
    with tracker.scratch() as scratch:
        result["events"] = scratch.events
        try:
            yield
        finally:
            changed = [snapshot(r) for r in tracker.rules] != snapshots
            if changed:
                for rule, state in zip(tracker.rules, states):
                    rule.load_state(state)
    result["clean"] = not changed and not scratch.alive


def _entries(window, special: dict, known: dict) -> tuple[list, dict] | None:
    """Template entries of `window` (events): `special` storage id -> ("o"/"g", index) or "go"; `known` storage
    id -> local of storages made before (the forward's). Returns (entries, locals made) or None."""
    entries, made = [], {}
    for ev in window:
        if ev.kind is ALLOC:
            local = len(known) + len(made)
            made[ev.sid] = local
            tag = special.get(ev.sid)
            if tag is None:
                entries.append(("a", local, ev.nbytes, ev.op))
            elif tag[0] == "o":
                entries.append(("o", local, ev.nbytes, ev.op))
            else:
                entries.append(("g", tag[1], ev.nbytes, ev.op))
        elif ev.kind is FREE:
            if ev.sid in made:
                entries.append(("f", made[ev.sid]))
            elif ev.sid in known:
                entries.append(("f", known[ev.sid]))
            elif special.get(ev.sid) == "go":
                entries.append(("go",))
            else:
                return None
        else:
            return None
    return entries, made


def _record_forward(tracker, key, is_causal, scale):
    result = {}
    with _isolated(tracker, result):
        q, k, v = _fresh_inputs(key)
        start = len(result["events"])
        out = _composite(q, k, v, is_causal, scale)
        end = len(result["events"])
        out_layout = _layout(out)[:5]
        out_sid = tracker.storage_id(out)
        window = result["events"][start:end]
        del q, k, v, out
    if not result["clean"]:
        return _REFUSED
    recorded = _entries(window, {out_sid: ("o", 0)}, {})
    if recorded is None or not any(e[0] == "o" for e in recorded[0]):
        return _REFUSED
    entries, made = recorded
    alive = set(made.values())
    for e in entries:
        if e[0] == "f":
            alive.discard(e[1])
    alive.discard(made[out_sid])
    return Template(entries, tuple(sorted(alive)), out_layout)


class _Seed(torch.autograd.Function):
    """Feeds the composite's backward a gradient of `layout` that only the autograd engine holds, as in a
    model; `mark` receives its storage id."""

    @staticmethod
    def forward(ctx, x, layout, tracker, mark):
        ctx.layout, ctx.tracker, ctx.mark = layout, tracker, mark
        return torch.empty((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, _g):
        grad = _make(*ctx.layout)[1]
        ctx.mark.append(ctx.tracker.storage_id(grad))
        return grad, None, None, None


def _record_backward(tracker, key, is_causal, scale, template: Template, grad_layout: tuple):
    result, mark = {}, []
    with _isolated(tracker, result), torch.enable_grad():
        q, k, v = _fresh_inputs(key)
        start = len(result["events"])
        out = _composite(q, k, v, is_causal, scale)
        fwd_window, out_sid = result["events"][start:], tracker.storage_id(out)
        seed = _Seed.apply(out, grad_layout, tracker, mark)
        one = torch.empty((), dtype=seed.dtype)  # held until the window is read: its release is not the composite's
        del out
        grads = torch.autograd.grad(seed, (q, k, v), one)
        events = list(result["events"])
        grad_layouts = [_layout(g)[:5] for g in grads]
        grad_sids = [tracker.storage_id(g) for g in grads]
        del q, k, v, seed, grads, one
    if not result["clean"] or len(mark) != 1 or len(set(grad_sids)) != 3 or None in grad_sids:
        return _REFUSED
    fwd = _entries(fwd_window, {out_sid: ("o", 0)}, {})
    if fwd is None or fwd[0] != template.fwd:
        return _REFUSED
    fwd_made = fwd[1]
    go_sid = mark[0]
    seeded = first_allocation(events, go_sid)
    if seeded is None:
        return _REFUSED
    special = {go_sid: "go", **{sid: ("g", i) for i, sid in enumerate(grad_sids)}}
    recorded = _entries(events[seeded + 1:], special, fwd_made)
    if recorded is None:
        return _REFUSED
    entries = recorded[0]
    freed = {e[1] for e in entries if e[0] == "f"}
    made_here = {e[1] for e in entries if e[0] == "a"}
    if freed != set(template.saved) | made_here or sum(e[0] == "go" for e in entries) != 1 \
            or sorted(e[1] for e in entries if e[0] == "g") != [0, 1, 2]:
        return _REFUSED
    return entries, grad_layouts


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tracker, template, key, is_causal, scale):
        ctx.set_materialize_grads(False)
        _state(tracker).memo.attention_replayed += 1
        ctx.tracker, ctx.template, ctx.key, ctx.is_causal, ctx.scale = tracker, template, key, is_causal, scale
        local, out = {}, None
        for e in template.fwd:
            if e[0] == "a":
                local[e[1]] = tracker.synthetic_alloc(e[2], e[3])
            elif e[0] == "o":
                out = _made(tracker, template.out, e[3])
            else:
                tracker.free_synthetic(local.pop(e[1]))
        ctx.saved_sids = local  # exactly the template's saved locals
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tracker, template = ctx.tracker, ctx.template
        layout = _layout(grad_out)[:5]
        recorded = template.bwd.get(layout)
        if recorded is None:
            recorded = template.bwd[layout] = _record_backward(tracker, ctx.key, ctx.is_causal, ctx.scale,
                                                               template, layout)
        local = dict(ctx.saved_sids)
        ctx.saved_sids = {}
        if recorded is _REFUSED:
            _state(tracker).broken = "a replayed attention's backward could not be recorded"
            for sid in local.values():
                tracker.free_synthetic(sid)
            grads = [torch.empty(shape, dtype=dtype) for shape, _st, _off, dtype, _n, _g in ctx.key]
            return (*grads, None, None, None, None, None)
        entries, grad_layouts = recorded
        grads, watches = [None, None, None], []
        for e in entries:
            if e[0] == "a":
                local[e[1]] = tracker.synthetic_alloc(e[2], e[3])
            elif e[0] == "g":
                grads[e[1]] = _made(tracker, grad_layouts[e[1]], e[3])
            elif e[0] == "f":
                tracker.free_synthetic(local.pop(e[1]))
            else:
                watches.append(_release_now(tracker, grad_out))
        for watch in watches:
            watch["events"] = len(tracker.events)
        return (*grads, None, None, None, None, None)


def _made(tracker, layout, op: str) -> torch.Tensor:
    """A fake tensor of `layout` on a storage of its own, its request logged under `op`."""
    base, view = _make(*layout)
    tracker.relabel(tracker.storage_id(base), op)
    return view


def _release_now(tracker, tensor: torch.Tensor) -> dict:
    """Log the release of `tensor`'s storage now (the composite releases it here; the replay's node holds it
    until it returns). Returns the watch whose "events" the caller sets when the node returns: the storage's
    actual death must come then, with no event in between, else the tracker is marked broken."""
    tracker.release(tensor)  # logged now; the storage's own death will log nothing
    state, events, watch = _state(tracker), tracker.events, {"events": None}  # (no reference back to the tracker)

    def died(_ref):
        if len(events) != watch["events"]:
            state.broken = "an incoming gradient outlived the replayed attention's backward"

    watch["ref"] = weakref.ref(tensor.untyped_storage(), died)
    state.watches.append(watch)
    return watch


def broken(tracker) -> str | None:
    """Why `tracker`'s stream is not the composite's (see the module docstring), or None."""
    state = getattr(tracker, "attention_state", None)
    if state is None:
        return None
    if state.broken:
        return state.broken
    if any(w["ref"]() is not None for w in state.watches):
        return "an incoming gradient outlived the trace"
    return None


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """The math path's output for bf16/fp16 `query`, `key`, `value` under the current tracker, which `replaying`
    set up: replayed (see the module docstring) or the composite op by op."""
    tracker = current_tracker()
    replayable = (attn_mask is None and dropout_p == 0.0 and torch.is_grad_enabled()
                  and all(t.requires_grad for t in (query, key, value))
                  and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)
    key_ = _inputs_key((query, key, value)) if replayable else None
    template = _REFUSED
    if key_ is not None:
        state = _state(tracker)
        if state.rules is None:
            state.rules = _rules_key(tracker)
        signature = (state.rules, key_, is_causal, scale)
        recordings = state.memo.attention
        if signature not in recordings:
            if len(recordings) >= ATTENTION_ENTRIES:
                recordings.clear()
            recordings[signature] = _record_forward(tracker, key_, is_causal, scale)
        template = recordings[signature]
    if template is _REFUSED:
        return math_composite(query, key, value, attn_mask, dropout_p, is_causal, scale)
    return _Replay.apply(query, key, value, tracker, template, key_, is_causal, scale)
