"""Storage lifetimes as an event stream (memprof.simulation.events): what a device allocator would be asked for,
op by op.

A TorchDispatchMode sees every aten op below autograd. Each op output whose storage is new (the op's
schema says the output is not an alias of an input, and the storage has not been seen) is one allocation
request of `storage.nbytes()` bytes; a weakref on the storage logs its release when the last tensor using
it dies. Views and in-place ops allocate nothing. Tensors made from Python literals (`torch.tensor(0.0)`,
e.g. the optimizers' step counters) reach dispatch only as `lift_fresh`, an alias: they are host memory
on CUDA too, and are not counted. Rules can declare other outputs host memory (`treat_as_host`).

Each allocation also gets the module it was made in (`module`: storage id -> dotted module path, "" outside
any module) from the `where` callable, when one is set (memprof.simulation.attribution sets it). An
allocation made while a stream other than the default one is current gets that stream's name (`stream`:
storage id -> name, only those) from the `stream_of` callable, when one is set (`track_streams`; FSDP's rule
memprof.simulation.distributed.FSDPStorageEvents sets it): CUDA's caching allocator keeps each stream's
blocks apart (memprof.simulation.allocator).

Rules (memprof.simulation.rules) may add requests CUDA makes that the CPU does not (library workspaces, kernel
temporaries) through `synthetic_alloc` and `free_synthetic`. The tracker alone edits its state: rules and the
shortcuts above change what it logged through its methods (`relabel`, `resize`, `release`, `treat_as_host`,
`adopt`, `continue_ids`, `scratch`, `mark`, `track_streams`).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from memprof.simulation.events import alloc, free, last_allocation, phase

_DEVICE = torch.ops.prim.device.default  # `Tensor.device` of a fake tensor: asked thousands of times a step



def _may_allocate(func) -> bool:
    """False when every output of the op aliases an input (views, in-place and out= ops)."""
    returns = func._schema.returns
    return any(r.alias_info is None and "Tensor" in str(r.type) for r in returns)


class StorageTracker(TorchDispatchMode):
    """Logs an Alloc and a Free event (memprof.simulation.events) for every device storage.

    `front`: an object whose `call(func, args, kwargs)` stands for the fake-tensor dispatch below (the shortcut
    layer's memprof.simulation.fast_dispatch.FrontCache), or None."""

    def __init__(self, rules=(), limit_bytes: int | None = None, front=None):
        super().__init__()
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
        self.stream: dict[int, str] = {}  # storage id -> its stream, for those made off the default stream
        self.stream_of = None  # callable -> the current stream's name (None: the default stream), or None
        self._by_cdata: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._next_id = 0
        self._allocating: dict = {}  # op -> its name when it may allocate, else None
        self.front = front
        self.math_attention = None  # callable standing for the math-path attention composite (math_attention), or None
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
        self.events.append(alloc(sid, nbytes, self.phase, op))
        self.origin[sid] = op
        self.module[sid] = self.where() if self.where is not None else ""
        if self.stream_of is not None:
            stream = self.stream_of()
            if stream is not None:
                self.stream[sid] = stream
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
        self.events.append(free(sid))

    def treat_as_host(self, tensor: torch.Tensor) -> None:
        """Un-count a storage just registered: CUDA keeps it in host memory."""
        sid = self._by_cdata.pop(tensor.untyped_storage()._cdata, None)
        if sid is None:
            return
        del self._refs[sid]  # the weakref goes, so its release is never logged
        del self.origin[sid]
        self.module.pop(sid, None)
        self.stream.pop(sid, None)
        self.live_bytes -= self._sizes.pop(sid)
        i = last_allocation(self.events, sid)
        if i is not None:
            del self.events[i]

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

    def id_of_storage(self, storage) -> int | None:
        """The id of a counted storage (an UntypedStorage), or None."""
        return self._by_cdata.get(storage._cdata)

    def synthetic_alloc(self, nbytes: int, op: str) -> int:
        """A request CUDA makes that has no tensor here (e.g. a cuBLAS workspace)."""
        sid = self._new_id()
        self._log_alloc(sid, nbytes, op)
        return sid

    def free_synthetic(self, sid: int) -> None:
        self.live_bytes -= self._sizes.pop(sid)
        self.events.append(free(sid))

    def track_streams(self, stream_of) -> None:
        """Record each allocation's stream from now on: `stream_of()` names the current one (None: default)."""
        self.stream_of = stream_of

    def set_phase(self, name: str, step: int = 0) -> None:
        """Mark a phase boundary in the stream (setup, forward, backward, optimizer, done)."""
        self.phase, self.step = name, step
        self.events.append(phase(name, step))

    def mark(self, event) -> None:
        """Put a shortcut's mark (memprof.simulation.events.Block, Window) in the stream."""
        self.events.append(event)

    def relabel(self, sid: int, label: str) -> None:
        """Name what made a storage (its origin, and its allocation event) after the fact."""
        self.origin[sid] = label
        i = last_allocation(self.events, sid)
        if i is not None:
            self.events[i] = self.events[i]._replace(op=label)

    def resize(self, sid: int, nbytes: int) -> None:
        """Count a just-registered storage at `nbytes` (a kernel allocates it in another dtype than the fake
        tensor's shape function says)."""
        if self._sizes.get(sid) == nbytes:
            return
        self.live_bytes += nbytes - self._sizes[sid]
        self._sizes[sid] = nbytes
        i = last_allocation(self.events, sid)
        if i is not None:
            self.events[i] = self.events[i]._replace(nbytes=nbytes)

    def release(self, tensor) -> None:
        """Log the release of a storage that is resized to nothing (it lives on as an empty storage)."""
        sid = self._by_cdata.pop(tensor.untyped_storage()._cdata, None)
        if sid is None:
            return
        self._refs.pop(sid, None)  # the weakref goes, so the empty storage's eventual death logs nothing
        self.free_synthetic(sid)

    @property
    def next_id(self) -> int:
        """The last storage id given (ids count up from it)."""
        return self._next_id

    def continue_ids(self, last: int) -> None:
        """Give ids after `last` from now on (a trace continuing another's stream, memprof.simulation.shared)."""
        self._next_id = last

    @contextlib.contextmanager
    def scratch(self):
        """Within, events go to a fresh list (the yielded Scratch's `events`). Afterwards the stream is the one
        before; requests made within whose storages have no tensor (a rule's workspace) are uncounted; and when
        no storage made within is alive (`alive` False), ids continue as before, what the made ones were forgotten."""
        events, last = self.events, self._next_id
        result = Scratch()
        self.events = result.events
        try:
            yield result
        finally:
            self.events = events
            made = [sid for sid in self._sizes if sid > last]
            result.alive = any(sid in self._refs for sid in made)
            for sid in made:
                if sid not in self._refs:
                    self.live_bytes -= self._sizes.pop(sid)
            if not result.alive:
                for sid in range(last + 1, self._next_id + 1):
                    self.origin.pop(sid, None)
                    self.module.pop(sid, None)
                    self.stream.pop(sid, None)
                self._next_id = last

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


class Scratch:
    """What StorageTracker.scratch saw: its events, and (after) whether a storage made within is still alive."""

    def __init__(self):
        self.events: list = []
        self.alive = False


def current_tracker() -> StorageTracker | None:
    """The innermost StorageTracker in the dispatch mode stack, or None."""
    return next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, StorageTracker)), None)
