"""A front cache for fake-tensor dispatch: what an op returns, by a key that is cheap to build.

Why: a traced step dispatches thousands of ops to FakeTensorMode, and most are repeats (the same op on
tensors of the same shape). FakeTensorMode caches each op's output metadata too, but builds its key through
generic Python over fifteen fields per tensor: about 170 of an op's 220 microseconds here. This cache keys an
op by the op, each tensor argument's shape, strides, dtype, storage offset and requires_grad, and every other
argument by its type and value, plus the default dtype and inference mode (what FakeTensorMode's key adds).
On a hit it builds the outputs as FakeTensorMode builds them from its own cache entry (an empty meta tensor
of the recorded shape, strides and dtype, set onto the input's storage for an output that aliases one).

An in-place op (add_, lerp_, the in-place foreach ops of an optimizer's step) returns the arguments it writes
into: its entry says which, and a repeat returns them without asking FakeTensorMode (whose meta kernel would
only check the layouts the key already holds); its numbers are keyed by their type alone (an optimizer's step
size, its bias corrections, change every step). What it will not cache goes to FakeTensorMode unchanged, every
time: ops that change their argument's metadata (inplace_view), in-place ops returning anything else, ops whose
outputs depend on data or have data-dependent shapes, arguments it cannot key (a real tensor, a fake constant,
a symbolic size, an object), outputs that are not plain fake tensors (None inside a tuple aside), a fresh
output whose storage is not exactly its own extent or is shared with another output, and anything dispatched while another dispatch mode sits
between the tracker and FakeTensorMode. tests/test_fast_dispatch.py compares its outputs with FakeTensorMode's.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConfig, in_kernel_invocation_manager

_MISS = object()
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_UNCACHEABLE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.inplace_view)
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift.default, torch.ops.aten.lift_fresh_copy.default)


class _Unkeyable(Exception):
    pass


def _arg_key(a):
    if type(a) is FakeTensor:
        if a.constant is not None:
            raise _Unkeyable
        return (a.shape, a.stride(), a.dtype, a.storage_offset(), a.requires_grad)
    if isinstance(a, _PLAIN):
        return (type(a), a)
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(_arg_key(x) for x in a))
    raise _Unkeyable


def _in_place_arg_key(a):
    if isinstance(a, (int, float)):  # (bool too)
        return type(a)
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(_in_place_arg_key(x) for x in a))
    return _arg_key(a)


def extent_bytes(shape, stride, itemsize: int) -> int:
    """Bytes of the smallest storage holding a tensor of this shape and these strides at offset 0."""
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * itemsize


class FrontCache:
    """Per key: each output's (shape, stride, dtype, requires_grad, device, index of the argument whose storage it
    views or None, storage offset) and the sequence type of a multi-output op; None where the op is not cached.
    At `max_entries` the cache starts again empty (FakeTensorMode's own cache still holds every op)."""

    max_entries = 200_000

    def __init__(self):
        self.entries: dict = {}
        self._mutables: dict = {}
        self.hits = 0
        self.misses = 0

    def key(self, func, args, kwargs):
        arg_key = _in_place_arg_key if self._mutable(func) else _arg_key
        try:
            parts = [func, torch.get_default_dtype(), torch.is_inference_mode_enabled()]
            parts.extend(arg_key(a) for a in args)
            for name, value in kwargs.items():
                parts.append(name)
                parts.append(arg_key(value))
            return tuple(parts)
        except _Unkeyable:
            return None

    def _mutable(self, func) -> bool:
        """Whether `func` writes into an argument: if cached at all, it is cached as returning the arguments it
        wrote into, whatever its numbers (an optimizer's step size changes every step), so numbers are keyed by
        their type alone."""
        mutable = self._mutables.get(func)
        if mutable is None:
            mutable = self._mutables[func] = func._schema.is_mutable
        return mutable

    def call(self, func, args, kwargs):
        """`func(*args, **kwargs)`, from the cache where it can be."""
        key = self.key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        entry = self.entries.get(key, _MISS)
        if entry is None:
            return func(*args, **kwargs)
        if entry is _MISS:
            out = func(*args, **kwargs)
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = _entry(func, args, out, kwargs)
            self.misses += 1
            return out
        self.hits += 1
        return _build(entry, args)


def _in_place_entry(func, args, out):
    """An in-place op (add_, mul_, lerp_, addcdiv_, the in-place foreach ops, ...): what it returns is the
    arguments it wrote into, itself, so a repeat returns them again. `("in-place", indices, sequence)`: the
    positional arguments returned (None: the op returns nothing), or None where an output is anything else
    (a fresh tensor, a keyword argument) or the op changes its argument's metadata (inplace_view)."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or "resize" in name:  # the in-place variant of an op, by aten's naming (torch 2.11
        return None  # has no Tag.inplace): not set_data or record_stream; not _resize_output_, which resizes
    if any(r.alias_info is None or not r.alias_info.is_write for r in schema.returns):
        return None
    if not schema.returns:
        return ("in-place", None, None) if out is None else None
    sequence = type(out) if type(out) in (tuple, list) else None
    indices = []
    for t in (out if sequence else (out,)):
        i = next((i for i, a in enumerate(args) if a is t), None)
        if i is None or type(t) is not FakeTensor:
            return None
        indices.append(i)
    return "in-place", tuple(indices), sequence


def _entry(func, args, out, kwargs=None):
    """What rebuilds `out` from `args` (outputs' specs, whether a tuple or list), or None when it cannot be
    rebuilt exactly."""
    schema = func._schema
    if func in _LIFTS or any(tag in func.tags for tag in _UNCACHEABLE_TAGS):
        return None
    if schema.is_mutable:
        return _in_place_entry(func, args, out)
    storages, mode = {}, None
    for i, a in enumerate(args):
        if type(a) is FakeTensor:
            storages.setdefault(a.untyped_storage()._cdata, i)
            mode = mode or a.fake_mode
    if mode is None and not any(_has_tensor(a) for a in (*args, *(kwargs or {}).values())):  # a factory: see _build
        mode = _fake_mode()
    sequence = type(out) if type(out) in (tuple, list) else None
    outputs = out if sequence else (out,)
    specs, seen = [], set()
    for t in outputs:
        if t is None and sequence:
            specs.append(None)
            continue
        if type(t) is not FakeTensor or t.fake_mode is not mode or t.constant is not None \
                or t.layout != torch.strided or t.is_conj() or t.is_neg():
            return None
        storage = t.untyped_storage()
        view_idx = storages.get(storage._cdata)
        shape, stride, offset = tuple(t.shape), t.stride(), t.storage_offset()
        if view_idx is None:  # a storage of its own: exactly its extent, no other output on it
            if storage._cdata in seen or offset != 0 \
                    or storage.nbytes() != extent_bytes(shape, stride, t.element_size()):
                return None
            seen.add(storage._cdata)
        specs.append((shape, stride, t.dtype, t.requires_grad, t.fake_device, view_idx, offset))
    return tuple(specs), sequence


def _has_tensor(a) -> bool:
    return isinstance(a, torch.Tensor) or isinstance(a, (list, tuple)) and any(_has_tensor(x) for x in a)


def _fake_mode():
    """The FakeTensorMode in force: a factory's outputs (no tensor argument to take a mode from) are its."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


def _build(entry, args):
    if entry[0] == "in-place":  # the op wrote into its arguments, as FakeTensorMode's meta kernel would
        _, indices, sequence = entry
        if indices is None:
            return None
        return sequence(args[i] for i in indices) if sequence else args[indices[0]]
    specs, sequence = entry
    mode = next((a.fake_mode for a in args if type(a) is FakeTensor), None) or _fake_mode()
    built = []
    with in_kernel_invocation_manager(mode):
        for spec in specs:
            if spec is None:
                built.append(None)
                continue
            shape, stride, dtype, requires_grad, device, view_idx, offset = spec
            if view_idx is not None and not args[view_idx].is_inference():
                # a view of a normal tensor is a normal tensor, in inference mode too (autograd then shares the
                # base's version counter with it, which an inference tensor refuses)
                with torch.inference_mode(False):
                    empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                    empty.set_(args[view_idx].untyped_storage(), offset, shape, stride)
            else:
                empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                if view_idx is not None:
                    empty.set_(args[view_idx].untyped_storage(), offset, shape, stride)
            if requires_grad:
                empty.requires_grad_(True)
            built.append((empty, device))
    outs = [None if b is None else _fake_tensor(mode, *b) for b in built]
    return sequence(outs) if sequence else outs[0]


_PROTOTYPES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # mode -> {device: a FakeTensor's vars}


def _fake_tensor(mode, elem: torch.Tensor, device: torch.device) -> FakeTensor:
    """`FakeTensor(mode, elem, device)` at a third of the cost: the subclass made as FakeTensor.__new__ makes it,
    then given the attributes (mode, device, empty memos) of one FakeTensor built by __new__ for this mode and
    device. Built by __new__ itself in FakeTensorMode's debug mode and under export (which track tensors)."""
    if FakeTensorConfig.debug or torch.compiler.is_exporting():
        return FakeTensor(mode, elem, device)
    by_device = _PROTOTYPES.setdefault(mode, {})
    attrs = by_device.get(device)
    if attrs is None:
        made = FakeTensor(mode, elem, device)
        by_device[device] = {k: v for k, v in vars(made).items() if k != "fake_mode"}  # (no reference to the key)
        return made
    t = torch.Tensor._make_subclass(FakeTensor, elem, elem.requires_grad, dispatch_device=True,
                                    device_for_backend_keys=device)
    if mode._allow_unsafe_data_ptr_access:
        torch._C._set_warn_deprecated_on_mutable_data_ptr(t)
    else:
        torch._C._set_throw_on_mutable_data_ptr(t)
    t.__dict__.update(attrs)
    t.fake_mode = mode
    return t
