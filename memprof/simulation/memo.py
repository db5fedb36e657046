"""Every memo a prediction may reuse from an earlier one, in one object: nothing else in the engine keeps state
between predictions.

`MEMO` is the process's: memprof.simulation.simulate.prediction takes a `memo` (default MEMO) and hands it to the
shortcuts that read and fill it (memprof.simulation.shared: forward traces, batch lines, optimizer windows;
memprof.simulation.math_attention: attention recordings, through `replaying`), and gives each tracker its front
cache (memprof.simulation.fast_dispatch). A fresh Memo() predicts from scratch, as MEMO.clear() makes the process's
do (benchmarks and tests). What stays process-wide besides is not a memo: facts of the installed torch (which ops
have CPU autocast kernels) and the meta kernels memprof.simulation.fake_compat registers.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

FORWARD_ENTRIES = 8  # forward traces kept (e.g. frozen or not x checkpointing off or on x 2 batch sizes)
ATTENTION_ENTRIES = 1024  # attention recordings kept


class Memo:
    """What predictions share: forward traces by forward key (LRU, FORWARD_ENTRIES), each batch family's
    verified line, optimizer windows, attention recordings, the dispatch front cache, and whether batch lines
    serve (`scaling`, fit's probes)."""

    def __init__(self, front: bool = True):
        self.forwards: OrderedDict = OrderedDict()  # forward key -> memprof.simulation.shared.Forward
        self.lines: dict = {}  # batch family -> {"traced": {batch: Forward}, "line": BatchLine | None, "verified"}
        self.windows: dict = {}  # (batch family, optimizer fields) -> what shared._with_windows reuses
        self.attention: dict = {}  # (rules' state, layout, is_causal, scale) -> math_attention Template
        self.attention_replayed = 0  # attention calls replayed from a recording
        self.scaling = False  # batch lines serve forwards at other batch sizes (memprof fit)
        self._front = None
        self._front_on = front

    @property
    def front(self):
        """The fake-tensor dispatch front cache (memprof.simulation.fast_dispatch.FrontCache), or None when off."""
        if self._front is None and self._front_on:
            from memprof.simulation.fast_dispatch import FrontCache

            self._front = FrontCache()
        return self._front if self._front_on else None

    @front.setter
    def front(self, cache) -> None:
        self._front, self._front_on = cache, cache is not None

    def clear(self, attention: bool = True, front: bool = False) -> None:
        """Forget every trace (and, with `attention`, every attention recording): the next prediction traces
        from scratch. The front cache (what an op returns, by its inputs' layout: it speeds dispatch and decides
        no figure) is kept unless `front`."""
        self.forwards.clear()
        self.lines.clear()
        self.windows.clear()
        if attention:
            self.attention.clear()
        if front and self._front is not None:
            self._front.entries.clear()

    @contextlib.contextmanager
    def scaling_in_batch(self):
        """Within, a configuration traced at two batch sizes (2 or more) and checked at a third gives its forward
        at every other batch from memprof.simulation.batch_scaling instead of a trace (`memprof fit`'s probes)."""
        saved, self.scaling = self.scaling, True
        try:
            yield
        finally:
            self.scaling = saved


MEMO = Memo()  # the process's
