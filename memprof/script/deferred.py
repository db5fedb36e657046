"""Random initialisation of real CPU tensors, deferred until its values are needed (the script path's speed).

A script builds its model on the CPU and then moves it to the device; the simulated device copies only shapes, so
the CPU fills the constructors run (`uniform_`, `normal_`: nn.Linear's kaiming_uniform_, xavier_uniform_, normal_)
are work nobody reads when the model goes to the device untouched: ~2.5 s of a 2-core CPU for ViT-L/16's 304M
parameters. Here those fills are queued instead of run, and the queue is *settled* (every queued fill whose tensor
still holds the storage it was queued for run, in order, on it) before anything could tell the difference:
- any op on a real tensor whose storage has a queued fill (a CPU model's forward, a view, .item(), printing);
- any op that draws from a random generator (torch.Tag.nondeterministic_seeded: a DataLoader's shuffling seed,
  CPU data augmentation, another fill that is not queued), and torch.get_rng_state / set_rng_state / manual_seed /
  seed (torch.utils.checkpoint's preserve_rng_state reads it);
- reads that bypass dispatch: .numpy(), .tolist(), pickling, torch.save of CPU tensors.
So every value the script sees is drawn as in an eager run, except in one way, said in the record's notes: the
fills of tensors that went to the device unread are never drawn (the record's script_cpu_fills_skipped counts
them), so the CPU generator's later draws (a DataLoader's order, augmentation, later initialisations) come from
another point of its stream than in an eager run. No figure of the device depends on it. (Drawing them on
scratch tensors, only to advance the generator, cost about 2 s per ViT-B.)
"""

from __future__ import annotations

import weakref

import torch

_aten = torch.ops.aten
DEFERRABLE = frozenset({_aten.uniform_.default, _aten.normal_.default})
OVERWRITING = frozenset({_aten.fill_.Scalar, _aten.zero_.default})  # (nn.init.constant_ / zeros_ after a fill)


def _scalars_kept(rest):
    """The other arguments of an in-place op, with 0-dim tensors (Python numbers wrapped by torch) copied so the
    queued op reads them as they are now; None when any other tensor takes part (the op must run now)."""
    out = []
    for a in rest:
        if isinstance(a, torch.Tensor):
            if a.dim() != 0 or type(a) is not torch.Tensor or a.device.type != "cpu":
                return None
            a = a.clone()
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            return None
        out.append(a)
    return tuple(out)


def _GONE():
    return None


def stand_in_fill(t, value):
    """A stand-in's fill (memprof.script.standins), queued like a random fill but not counted among them."""
    t.fill_(value)


class DeferredFills:
    """The queue of deferred fills of one simulated block (memprof.script.device.SimulatedCuda)."""

    def __init__(self):
        # [weakref to the storage (or _GONE), its _cdata, func, args[1:], kwargs, (offset, shape, stride, dtype)]
        self.queue: list = []
        self.pending: set = set()  # storage _cdata of the tensors with a queued fill
        self.seeded: dict = {}  # op -> whether it draws from a generator
        self.in_place: dict = {}  # op -> whether it only writes its first argument (no other tensor)
        self.skipped = 0
        self.skipped_before_a_draw = 0
        self.settling = False

    def __bool__(self) -> bool:
        return bool(self.queue)

    def dispatch(self, func, args, kwargs):
        """For an op on real tensors: (True, result) when the op is a fill that was queued, else (False, None) after
        settling the queue where the op could see the difference."""
        if self.settling:
            return False, None
        if func in DEFERRABLE and self.deferrable(args[0], kwargs.get("generator")):
            self.defer(func, args[0], args[1:], kwargs)
            return True, args[0]
        if not self.queue:
            return False, None
        if self._in_place_on_self(func) and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage()._cdata in self.pending:
            rest = _scalars_kept(args[1:])
            if rest is not None and not kwargs:  # (timm's trunc_normal_: uniform_, erfinv_, mul_, add_, clamp_)
                self.defer(func, args[0], rest, kwargs)
                return True, args[0]
        if func in OVERWRITING and self._overwrites(args[0]):
            return False, None  # it runs now; the queued fills it overwrites only advance the generator
        if self._draws(func) or self._touches(args, kwargs):
            self.settle()
        return False, None

    def defer(self, fn, t, rest, kwargs) -> None:
        """Queue fn(t, *rest, **kwargs) (an in-place op, or a Python init function filling `t`)."""
        st = t.untyped_storage()  # (a weak reference to the tensor itself would refuse its swap)
        cdata = st._cdata
        # a storage that dies (its tensor went to the device) is no longer pending: its address may be reused
        ref = weakref.ref(st, lambda _r, cdata=cdata, pending=self.pending: pending.discard(cdata))
        self.queue.append([ref, cdata, fn, tuple(rest), dict(kwargs),
                           (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)])
        self.pending.add(cdata)

    def deferrable(self, t, generator=None) -> bool:
        """Whether a fill of `t` may be queued: a real, contiguous CPU tensor, the default generator."""
        return generator is None and (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) \
            and t.device.type == "cpu" and t.is_contiguous() and not self.settling

    def _in_place_on_self(self, func) -> bool:
        known = self.in_place.get(func)
        if known is None:
            schema = func._schema
            args = schema.arguments
            known = self.in_place[func] = bool(
                args and args[0].alias_info is not None and args[0].alias_info.is_write
                and not any(a.alias_info is not None for a in args[1:]) and not self._draws(func))
        return known

    def _overwrites(self, t) -> bool:
        """A fill of a whole storage that has queued fills: their values are never seen (they become scratch)."""
        if not isinstance(t, torch.Tensor) or t.storage_offset() or not t.is_contiguous():
            return False
        st = t.untyped_storage()
        if st._cdata not in self.pending or t.numel() * t.element_size() != st.nbytes():
            return False
        for entry in self.queue:
            if entry[1] == st._cdata:
                entry[0] = _GONE
        self.pending.discard(st._cdata)
        return True

    def _draws(self, func) -> bool:
        seeded = self.seeded.get(func)
        if seeded is None:
            seeded = self.seeded[func] = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
        return seeded

    def _touches(self, args, kwargs) -> bool:
        pending = self.pending
        for a in (*args, *kwargs.values()) if kwargs else args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in pending:
                    return True
        return False

    def settle(self) -> None:
        """Run every queued fill whose tensor still holds the storage the fill was queued for, in order, on it; a
        fill whose tensor is gone (it went to the device) is skipped, counted, and not drawn."""
        queue, self.queue, self.pending = self.queue, [], set()
        self.settling = True
        try:
            with torch.no_grad():
                for ref, _cdata, func, rest, kwargs, (offset, shape, stride, dtype) in queue:
                    st = ref()
                    if st is None:
                        if func is not stand_in_fill:
                            self.skipped += 1
                            self.skipped_before_a_draw += 1  # the generator's later draws differ (said)
                        continue
                    t = torch.empty(0, dtype=dtype, device="cpu").set_(st, offset, shape, stride)
                    func(t, *rest, **kwargs)
        finally:
            self.settling = False

    def drop(self) -> int:
        """At the block's end: the fills nobody read (how many)."""
        n = sum(1 for entry in self.queue if entry[2] is not stand_in_fill)
        self.queue, self.pending = [], set()
        self.skipped += n
        return self.skipped


def trunc_normal(deferred: DeferredFills, original):
    """torch.nn.init.trunc_normal_, queued as one fill (it reads its own draws to resample: op by op, that read
    would settle the queue)."""
    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        if deferred.deferrable(tensor, generator):
            deferred.defer(original, tensor, (mean, std, a, b), {})
            return tensor
        return original(tensor, mean, std, a, b, generator=generator)

    return trunc_normal_
