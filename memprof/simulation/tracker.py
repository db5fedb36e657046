"""Storage lifetimes as an event stream: what a device allocator would be asked for, op by op.

A TorchDispatchMode sees every aten op below autograd. Each op output whose storage is new (the op's
schema says the output is not an alias of an input, and the storage has not been seen) is one allocation
request of `storage.nbytes()` bytes; a weakref on the storage logs its release when the last tensor using
it dies. Views and in-place ops allocate nothing. Tensors made from Python literals (`torch.tensor(0.0)`,
e.g. the optimizers' step counters) reach dispatch only as `lift_fresh`, an alias: they are host memory
on CUDA too, and are not counted. Rules can declare other outputs host memory (`treat_as_host`).

Each allocation also gets the module it was made in (`module`: storage id -> dotted module path, "" outside
any module) from the `where` callable, when one is set (memprof.simulation.attribution sets it).

Rules (memprof.simulation.rules) may add requests CUDA makes that the CPU does not (library workspaces, kernel
temporaries) through `synthetic_alloc` and `free_synthetic`.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.simulation.memo import MEMO, Memo

ALLOC, FREE, PHASE = 0, 1, 2  # events: (ALLOC, id, nbytes, phase, op), (FREE, id), (PHASE, name, step)
_DEVICE = torch.ops.prim.device.default  # `Tensor.device` of a fake tensor: asked thousands of times a step



def _may_allocate(func) -> bool:
    """False when every output of the op aliases an input (views, in-place and out= ops)."""
    returns = func._schema.returns
    return any(r.alias_info is None and "Tensor" in str(r.type) for r in returns)


class StorageTracker(TorchDispatchMode):
    """Logs (ALLOC, id, nbytes, phase, op) and (FREE, id) events for every device storage."""

    def __init__(self, rules=(), limit_bytes: int | None = None, memo: Memo | None = None):
        super().__init__()
        self.memo = memo or MEMO  # what this trace may reuse and fill (memprof.simulation.memo)
        self.rules = tuple(rules)
        # only the rules that act per op are called per op
        self._before = tuple(r for r in self.rules if _overrides(r, "before_op"))
        self._after = tuple(r for r in self.rules if _overrides(r, "after_op"))
        self._after_for: dict = {}  # op -> the rules whose after_op acts on it (Rule.acts_on)
        self.limit_bytes = limit_bytes
        self.live_bytes = 0
        self._sizes: dict[int, int] = {}
        self.events: list[tuple] = []
        self.phase = "setup"
        self.step = 0
        self.origin: dict[int, str] = {}  # storage id -> what made it (for the op at the peak)
        self.module: dict[int, str] = {}  # storage id -> module path it was made in ("" outside modules)
        self.where = None  # callable -> current module path, or None
        self._by_cdata: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._next_id = 0
        self._allocating: dict = {}  # op -> its name when it may allocate, else None
        self.front = self.memo.front  # fake-tensor dispatch through memprof.simulation.fast_dispatch (None: off)
        self.replay_attention = False  # math-path attention replayed from the memo's recordings (math_attention)
        self.attention_state = None  # this trace's replays (math_attention._TraceState)

    def add_rule(self, rule) -> None:
        """A rule joining a run already under way (a parallelism a user's script starts midway)."""
        self.rules = (*self.rules, rule)
        self._before = tuple(r for r in self.rules if _overrides(r, "before_op"))
        self._after = tuple(r for r in self.rules if _overrides(r, "after_op"))
        self._after_for = {}

    # --- bookkeeping -----------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def register(self, tensor: torch.Tensor, op: str) -> int | None:
        """Count `tensor`'s storage as allocated now, unless already counted; returns its id."""
        st = tensor.untyped_storage()
        key = st._cdata
        sid = self._by_cdata.get(key)
        if sid is not None or st.nbytes() == 0:
            return sid
        sid = self._new_id()
        self._by_cdata[key] = sid
        self._refs[sid] = weakref.ref(st, lambda _r, sid=sid, key=key: self._released(sid, key))
        self._log_alloc(sid, st.nbytes(), op)
        return sid

    def _log_alloc(self, sid: int, nbytes: int, op: str) -> None:
        self.events.append((ALLOC, sid, nbytes, self.phase, op))
        self.origin[sid] = op
        self.module[sid] = self.where() if self.where is not None else ""
        self._sizes[sid] = nbytes
        self.live_bytes += nbytes
        if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
            err = torch.OutOfMemoryError(f"live tensor bytes would reach {self.live_bytes} B, over the budget of "
                                         f"{self.limit_bytes} B ({op} asked for {nbytes} B)")
            err.requested_bytes, err.live_bytes = nbytes, self.live_bytes
            raise err

    def _released(self, sid: int, key: int) -> None:
        self._by_cdata.pop(key, None)
        self._refs.pop(sid, None)
        self.live_bytes -= self._sizes.pop(sid, 0)
        self.events.append((FREE, sid))

    def treat_as_host(self, tensor: torch.Tensor) -> None:
        """Un-count a storage just registered: CUDA keeps it in host memory."""
        sid = self._by_cdata.pop(tensor.untyped_storage()._cdata, None)
        if sid is None:
            return
        del self._refs[sid]  # the weakref goes, so its release is never logged
        del self.origin[sid]
        self.module.pop(sid, None)
        self.live_bytes -= self._sizes.pop(sid)
        for i in range(len(self.events) - 1, -1, -1):
            if self.events[i][0] == ALLOC and self.events[i][1] == sid:
                del self.events[i]
                break

    def adopt(self, tensor: torch.Tensor, sid: int, log_release: bool = True) -> None:
        """Count `tensor`'s storage under an id another tracker gave it, logging no allocation (the other
        tracker's stream has it); its release is logged unless `log_release` is False (memprof.simulation.shared)."""
        st = tensor.untyped_storage()
        key, nbytes = st._cdata, st.nbytes()
        self._by_cdata[key] = sid
        self._next_id = max(self._next_id, sid)
        if log_release:
            self._refs[sid] = weakref.ref(st, lambda _r, sid=sid, key=key: self._released(sid, key))
            self._sizes[sid] = nbytes
            self.live_bytes += nbytes

    def storage_id(self, tensor: torch.Tensor) -> int | None:
        return self._by_cdata.get(tensor.untyped_storage()._cdata)

    def synthetic_alloc(self, nbytes: int, op: str) -> int:
        """A request CUDA makes that has no tensor here (e.g. a cuBLAS workspace)."""
        sid = self._new_id()
        self._log_alloc(sid, nbytes, op)
        return sid

    def free_synthetic(self, sid: int) -> None:
        self.live_bytes -= self._sizes.pop(sid)
        self.events.append((FREE, sid))

    def set_phase(self, phase: str, step: int = 0) -> None:
        """Mark a phase boundary in the stream (setup, forward, backward, optimizer, done)."""
        self.phase, self.step = phase, step
        self.events.append((PHASE, phase, step))

    # --- dispatch ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and type(args[0]) is FakeTensor:  # metadata: no allocation, nothing for a rule
            return args[0].fake_device
        kwargs = kwargs or {}
        for rule in self._before:
            rule.before_op(self, func, args, kwargs)
        if self.front is not None and torch._C._len_torch_dispatch_stack() == 1:  # FakeTensorMode next
            out = self.front.call(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        try:
            op = self._allocating[func]
        except KeyError:
            op = self._allocating[func] = str(func) if _may_allocate(func) else None
        if op is not None:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.register(t, op)
                elif isinstance(t, (tuple, list)):  # foreach ops return lists
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self.register(u, op)
        try:
            after = self._after_for[func]
        except KeyError:
            after = self._after_for[func] = tuple(r for r in self._after if getattr(r, "acts_on", None) is None
                                                  or func in r.acts_on)
        for rule in after:
            rule.after_op(self, func, args, kwargs, out)
        return out


def _overrides(rule, method: str) -> bool:
    """Whether `rule` defines `method` itself (the base class's is a no-op)."""
    from memprof.simulation.rule import Rule

    own = getattr(type(rule), method, None)
    return own is not None and own is not getattr(Rule, method, None)


def relabel(tracker, sid: int, label: str) -> None:
    """Name what made a storage (its origin, and its allocation event) after the fact."""
    tracker.origin[sid] = label
    for i in range(len(tracker.events) - 1, -1, -1):
        ev = tracker.events[i]
        if ev[0] == ALLOC and ev[1] == sid:
            tracker.events[i] = ev[:4] + (label,)
            break


def release(tracker, tensor) -> None:
    """Log the release of a storage that is resized to nothing (it lives on as an empty storage)."""
    key = tensor.untyped_storage()._cdata
    sid = tracker._by_cdata.pop(key, None)
    if sid is None:
        return
    tracker._refs.pop(sid, None)  # the weakref goes, so the empty storage's eventual death logs nothing
    tracker.free_synthetic(sid)
