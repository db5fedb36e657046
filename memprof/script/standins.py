"""Stand-in values: what a script reads back from the simulated device, which has shapes but no data.

A training loop reads values back (`loss.item()`, `if not torch.isfinite(loss)`, a GradScaler's inf check, an
early-stop test) and branches on them. The stand-ins are chosen so that such a loop trains on as it would on a card
where training goes well:
- **known values are exact.** A device tensor keeps the values the script gave it when they are few (at most
  `LIMIT` elements): a CPU tensor moved to the device (labels, a step counter), a factory with a fill
  (`torch.full((), 65536.0, device="cuda")`, a GradScaler's scale), `copy_` from the CPU. An op whose every input
  is known computes its output for real on the CPU (a GradScaler's update, `labels != -100`, a loss mask's sum), and
  an in-place op with an unknown input makes what it writes unknown.
- **the rest of the device's data is finite and not converged**: `isnan` / `isinf` read False and `isfinite` True
  (for a tensor of any size: a `Constant`, which pointwise ops, views and `all` / `any` / `amax` / `amin` / `mean`
  carry on), a GradScaler's non-finite check of the gradients finds nothing (found_inf keeps its value), and an
  unknown value reads 1 (1.0 for floating point: finite, not zero, not a converged loss), False for a bool.
So `loss.item()` reads 1.0, `torch.isfinite(loss)` True, a scaler steps every step and keeps its scale, and
`labels.tolist()` reads the real labels. The summary says which stand-ins a run read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

LIMIT = 4096  # elements: a device tensor this small keeps its known values
_ATTR = "_memprof_value"
_aten = torch.ops.aten
_FINITE = {_aten.isfinite.default: True, _aten.isnan.default: False, _aten.isinf.default: False,
           _aten.isposinf.default: False, _aten.isneginf.default: False}
_KEEPS_CONSTANT = {_aten.all.default, _aten.any.default, _aten.all.dim, _aten.any.dim, _aten.amax.default,
                   _aten.amin.default, _aten.max.default, _aten.min.default, _aten.mean.default, _aten.mean.dim,
                   _aten.clone.default, _aten._to_copy.default, _aten.detach.default, _aten.alias.default}
_OVERWRITES = {_aten.copy_.default, _aten.fill_.Scalar, _aten.fill_.Tensor, _aten.zero_.default}
_UNKNOWABLE_FACTORIES = ("empty", "new_empty", "rand", "randn", "randint", "randperm", "normal", "bernoulli",
                         "rand_like", "randn_like", "randint_like")
# ops whose unknown inputs leave the written tensors as they were, on a device whose data is finite
_FINDS_NOTHING = {_aten._amp_foreach_non_finite_check_and_unscale_.default: (1,)}


_COMPARE = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}


def _finite(func, args):
    """What an op on unknown data gives when that data is finite (no NaN, no inf), or None: isnan / isinf False,
    isfinite True (and its decomposition: `x == x` True, `|x| != inf` True), a comparison with an infinity."""
    known = _FINITE.get(func)
    if known is not None:
        return known
    name = func._schema.name.split("::")[-1]
    compare = _COMPARE.get(name)
    if compare is None or len(args) < 2:
        return None
    a, b = args[0], args[1]
    if a is b:  # x == x: no NaN
        return compare(0, 0)
    if isinstance(b, float) and b in (float("inf"), float("-inf")):
        return compare(0.0, b)  # any finite value stands for the unknown one
    return None


class Constant(NamedTuple):
    """A tensor every element of which is `value` (a Python number or bool), however large."""
    value: object


def value_of(t):
    """A tensor's known value: a real tensor of its shape, a Constant, or None (unknown). A real (CPU) tensor is
    its own value."""
    if type(t) is FakeTensor:
        return t.__dict__.get(_ATTR)
    return t if isinstance(t, torch.Tensor) else None


def set_value(t, value) -> None:
    if value is None:
        t.__dict__.pop(_ATTR, None)
    else:
        t.__dict__[_ATTR] = value


def default_value(dtype: torch.dtype):
    return False if dtype == torch.bool else 1


def materialise(value, like) -> torch.Tensor:
    """A real CPU tensor of `like`'s shape and dtype holding `value` (a real tensor, a Constant, or None)."""
    with torch.inference_mode(False), torch.no_grad():
        if isinstance(value, torch.Tensor):
            return value.to(dtype=like.dtype).reshape(tuple(like.shape)).clone()
        fill = default_value(like.dtype) if value is None else value.value
        return torch.full(tuple(like.shape), fill, dtype=like.dtype)


class _OpInfo(NamedTuple):
    written: tuple  # indices of the arguments the op writes into
    pointwise: bool
    keeps_constant: bool  # a view, a copy or a reduction that keeps a Constant constant
    unknowable: bool  # what it makes is random (drawn from a generator) or uninitialised (empty)
    special: bool  # it may make a value from unknown inputs (a finiteness check, an overwrite)


def _info(func) -> _OpInfo:
    schema = func._schema
    written = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    view = bool(schema.returns) and not written and all(r.alias_info is not None for r in schema.returns)
    name = schema.name.split("::")[-1]
    unknowable = torch.Tag.nondeterministic_seeded in func.tags or name.startswith(("empty", "new_empty"))
    special = func in _FINITE or name in _COMPARE or func in _OVERWRITES or func in _FINDS_NOTHING
    return _OpInfo(written, torch.Tag.pointwise in func.tags, view or func in _KEEPS_CONSTANT, unknowable, special)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def _outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


class StandIns:
    """The known values of one simulated block's device tensors (see the module docstring). `read` counts what was
    read: `exact` (a known value) and `stand_in` (a default or a Constant)."""

    def __init__(self):
        self._infos: dict = {}
        self.reads = {"exact": 0, "stand_in": 0}

    # --- propagation, after each device op --------------------------------------------------------------------
    def after_op(self, func, args, kwargs, out) -> None:
        info = self._infos.get(func)
        if info is None:
            info = self._infos[func] = _info(func)
        values, constant, unknown, known = [], False, False, False
        for a in args:
            for t in (a,) if isinstance(a, torch.Tensor) else a if type(a) in (list, tuple) else ():
                if type(t) is FakeTensor:
                    v = t.__dict__.get(_ATTR)
                elif isinstance(t, torch.Tensor):
                    v = t  # a real tensor is its own value
                else:
                    continue
                if v is None:
                    unknown = True
                else:
                    known = True
                    constant = constant or isinstance(v, Constant)
                values.append(v)
        if unknown and not known and not info.special:  # the common case: nothing known in, nothing known out
            return
        if info.unknowable:  # random (the CPU generator must not advance) or uninitialised
            self._forget_written(args, info)
            return
        if not values and not info.written:  # a factory: the outputs are computed from the arguments alone
            self._compute(func, args, kwargs, out, info)
            return
        if not unknown and values:
            if constant:
                self._constant(func, args, kwargs, out, info)
            else:
                self._compute(func, args, kwargs, out, info)
            return
        finite = _finite(func, args)
        if finite is not None:
            for t in _outputs(out):
                set_value(t, materialise(Constant(finite), t) if t.numel() <= LIMIT else Constant(finite))
            return
        if func in _OVERWRITES and all(v is not None for v in values[1:]):  # written whole from what is known
            target = args[0]
            if target.numel() <= LIMIT:
                set_value(target, materialise(None, target))  # (any buffer: the op writes every element)
                self._compute(func, args, kwargs, out, info)
            elif func is _aten.zero_.default or func is _aten.fill_.Scalar:
                set_value(target, Constant(0 if func is _aten.zero_.default else args[1]))
            else:
                set_value(target, values[1] if isinstance(values[1], Constant) else None)
            return
        keep = _FINDS_NOTHING.get(func, ())
        for i in info.written:
            if i < len(args) and i not in keep:
                for t in _tensors(args[i]):
                    set_value(t, None)

    def _real_args(self, args, kwargs):
        def real(a):
            if type(a) is FakeTensor:
                v = value_of(a)
                return materialise(v, a) if isinstance(v, Constant) else v
            if isinstance(a, (list, tuple)) and any(type(x) is FakeTensor for x in a):
                return type(a)(real(x) for x in a)
            return a

        return tuple(real(a) for a in args), {k: real(v) for k, v in kwargs.items()}

    def _compute(self, func, args, kwargs, out, info) -> None:
        """Every input known and every output small: the op run for real on the values."""
        outs = _outputs(out)
        if any(t.numel() > LIMIT for t in outs) or \
                any(t.numel() > LIMIT for i in info.written if i < len(args) for t in _tensors(args[i])):
            self._forget_written(args, info)
            return
        real_args, real_kwargs = self._real_args(args, kwargs)
        if "device" in real_kwargs:
            real_kwargs["device"] = "cpu"
        try:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
                got = func(*real_args, **real_kwargs)
        except Exception:  # (an op without a CPU kernel: what it makes stays unknown)
            self._forget_written(args, info)
            return
        for i in info.written:  # the values written in place are the values of the written arguments
            for fake, real in zip(_tensors(args[i]), _tensors(real_args[i])):
                if real is not value_of(fake):
                    set_value(fake, real)
        if not info.written:
            for fake, real in zip(outs, _outputs(got)):
                if type(fake) is FakeTensor and tuple(real.shape) == tuple(fake.shape):
                    set_value(fake, real if real.dtype == fake.dtype else real.to(fake.dtype))

    def _constant(self, func, args, kwargs, out, info) -> None:
        """Some inputs Constant: a pointwise op, a view, a copy or a constant-keeping reduction stays Constant."""
        if not (info.pointwise or info.keeps_constant) or info.written and not info.pointwise:
            self._forget_written(args, info)
            return
        first = next(t for a in args for t in _tensors(a))

        def small(a):
            v = value_of(a) if type(a) is FakeTensor else a
            if isinstance(v, Constant):
                return torch.tensor(v.value, dtype=a.dtype)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                return v.reshape(())
            raise ValueError  # a full tensor beside a Constant: not kept

        try:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
                if info.pointwise:
                    got = func(*[small(a) if isinstance(a, torch.Tensor) else a for a in args],
                               **{k: small(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
                else:  # one Constant input: its value, whatever the view or reduction
                    got = torch.tensor(value_of(first).value).to(_outputs(out)[0].dtype) if _outputs(out) else None
        except Exception:
            self._forget_written(args, info)
            return
        targets = [t for i in info.written for t in _tensors(args[i])] if info.written else _outputs(out)
        for t in targets:
            if type(t) is FakeTensor and got is not None:
                c = Constant(got.item())
                set_value(t, materialise(c, t) if t.numel() <= LIMIT else c)

    def _forget_written(self, args, info) -> None:
        for i in info.written:
            if i < len(args):
                for t in _tensors(args[i]):
                    set_value(t, None)

    # --- sources -------------------------------------------------------------------------------------------------
    def made(self, func, args, kwargs, out) -> None:
        """`out` was made by torch factory `func` given the CUDA device (memprof.script.moves): a small one made
        from values alone (zeros, full, arange, tensor(data), ones_like, ...) keeps them; a random or
        uninitialised one stays unknown."""
        name = getattr(func, "__name__", "")
        if not isinstance(out, torch.Tensor) or out.numel() > LIMIT or name.startswith(_UNKNOWABLE_FACTORIES):
            return
        if args and isinstance(args[0], torch.Tensor) and (name.endswith("_like") or name.startswith("new_")):
            args = (torch.zeros(tuple(args[0].shape), dtype=args[0].dtype), *args[1:])  # (only its layout counts)
        try:
            with torch.inference_mode(False), torch.no_grad():
                got = func(*args, **{**kwargs, "device": "cpu", "requires_grad": False}) \
                    if "requires_grad" in kwargs else func(*args, **{**kwargs, "device": "cpu"})
        except Exception:
            return
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(out.shape):
            set_value(out, got.to(out.dtype))

    def copied(self, fake, real: torch.Tensor) -> None:
        """`fake` is a device copy of the real CPU tensor `real`: it keeps its values when small."""
        if real.numel() <= LIMIT:
            with torch.inference_mode(False), torch.no_grad():
                set_value(fake, real.detach().to(dtype=fake.dtype).clone().reshape(tuple(fake.shape)))

    # --- read-backs ----------------------------------------------------------------------------------------------
    def counted(self, t):
        """Device tensor `t`'s value (see value_of), counted as a read: exact or a stand-in."""
        v = value_of(t)
        self.reads["exact" if isinstance(v, torch.Tensor) else "stand_in"] += 1
        return v

    def scalar(self, t):
        """`aten._local_scalar_dense`: the Python number a one-element device tensor reads as."""
        return materialise(self.counted(t), t).reshape(()).item()

    def note(self) -> str | None:
        exact, stand_in = self.reads["exact"], self.reads["stand_in"]
        if not exact and not stand_in:
            return None
        return (f"values read back from the device: {exact} exact (values the script put there, and what was "
                f"computed from them alone), {stand_in} stand-ins (the simulation has no data: the device's data "
                f"reads as finite, isnan False, isfinite True, a GradScaler finds no inf, and an unknown value reads "
                f"1 or False), so the script trained on as on a card where training goes well")
