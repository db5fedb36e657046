"""A forward trace at any micro-batch from two traced ones: what makes `memprof fit` cheap, since its
probes differ only in batch size.

Why it can be exact: at batch sizes that take the same code path, a training step makes the same
requests in the same order, and each request's size is bytes-per-sample x batch + fixed bytes (an
activation has the batch as one dimension; weights, gradients and workspaces have none). So two traces at
batches b1 < b2 whose streams agree in everything but allocation sizes give every size as a line, and the
stream at any other batch follows. The line is trusted only once it has predicted a third traced batch
exactly (`verify`); until then, and wherever the streams differ (batch 1, whose views are often already
contiguous, takes other paths), the caller traces for real. The same holds for the rules' numeric state
(e.g. the convolution workspace bound grows with the batch).
"""

from __future__ import annotations

from dataclasses import replace

from memprof.simulation.events import ALLOC


class NotAffine(Exception):
    """The two traces differ in more than allocation sizes, or a size is not a whole number of bytes per sample."""


def same_value(a, b) -> bool:
    """Equality of two rule attributes (tensors and the like: only the very same object)."""
    try:
        return bool(a == b)
    except Exception:  # tensors and the like: equal only when the same object
        return a is b


def _line(v1: int, v2: int, b1: int, b2: int) -> tuple[int, int]:
    """(fixed, per_sample) with v = fixed + per_sample * batch through both points, in whole bytes."""
    if (v2 - v1) % (b2 - b1):
        raise NotAffine(f"{v1} at batch {b1} and {v2} at batch {b2} is not a whole number per sample")
    per = (v2 - v1) // (b2 - b1)
    return v1 - per * b1, per


class BatchLine:
    """The forward traces of one configuration at every batch size, from traces at two (`low`, `high`)."""

    def __init__(self, low, b_low: int, high, b_high: int):
        if b_low == b_high:
            raise NotAffine("two different batch sizes are needed")
        if len(low.events) != len(high.events) or len(low.windows) != len(high.windows):
            raise NotAffine("the streams differ in length")
        self.high, self.b_high = high, b_high
        sizes: dict[int, tuple[int, int]] = {}  # event index -> (fixed, per_sample) where they differ
        for i, (x, y) in enumerate(zip(low.events, high.events)):
            if x == y:
                continue
            if x.kind is not ALLOC or y.kind is not ALLOC or x._replace(nbytes=0) != y._replace(nbytes=0):
                raise NotAffine(f"event {i} differs in more than its size: {x} / {y}")
            sizes[i] = _line(x.nbytes, y.nbytes, b_low, b_high)
        self.sizes = sizes
        if low.windows != high.windows or low.resident_ids != high.resident_ids or low.params != high.params \
                or low.origin != high.origin or low.module != high.module or low.next_id != high.next_id:
            raise NotAffine("the streams' storages or optimizer windows differ")
        self.state: list[dict] = []  # per rule: attribute -> (fixed, per_sample) where they differ
        for s_low, s_high in zip(low.rule_state, high.rule_state):
            lines = {}
            for name, v_high in s_high.items():
                v_low = s_low.get(name)
                if same_value(v_low, v_high):
                    continue
                if type(v_low) is not int or type(v_high) is not int:
                    raise NotAffine(f"rule state {name} differs and is not a count of bytes: {v_low!r} / {v_high!r}")
                lines[name] = _line(v_low, v_high, b_low, b_high)
            self.state.append(lines)

    def at(self, batch: int):
        """The forward trace at `batch` (the high trace's fake model and windows, sizes on the lines)."""
        events = list(self.high.events)
        for i, (fixed, per) in self.sizes.items():
            size = fixed + per * batch
            if size <= 0:
                raise NotAffine(f"event {i} would ask for {size} B at batch {batch}")
            events[i] = events[i]._replace(nbytes=size)
        return replace(self.high, events=events, rule_state=self.state_at(self.high.rule_state, batch))

    def state_at(self, rule_state: list, batch: int) -> list:
        """`rule_state` (each rule's attributes, from a trace at another batch) with the attributes that change
        with the batch at `batch`."""
        out = []
        for state, lines in zip(rule_state, self.state):
            state = dict(state)
            state.update({name: fixed + per * batch for name, (fixed, per) in lines.items()})
            out.append(state)
        return out

    def verify(self, traced, batch: int) -> bool:
        """Whether the line gives exactly `traced`, the forward traced at `batch`."""
        try:
            made = self.at(batch)
        except NotAffine:
            return False
        return (made.events == traced.events and made.windows == traced.windows
                and made.resident_ids == traced.resident_ids and made.origin == traced.origin
                and made.module == traced.module and made.next_id == traced.next_id
                and same_state(made.rule_state, traced.rule_state))


def same_state(a: list, b: list) -> bool:
    """Whether two lists of rule attributes agree (tensors and other objects: only when the very same)."""
    return len(a) == len(b) and all(same_value(x.get(k), y.get(k)) for x, y in zip(a, b) for k in set(x) | set(y))
