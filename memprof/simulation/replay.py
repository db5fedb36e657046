"""The request stream replayed through the caching-allocator model (memprof.simulation.allocator): the engine's one
replay, for a whole stream (a prediction, memprof.simulation.simulate) and incrementally (the simulated device's
torch.cuda figures while a script runs, memprof.script.device).

A `Replayer` is fed the stream as it grows: events it has already seen are not fed again, and a stream whose
prefix changed (a rule's rewrite reached back) is replayed from the start. It keeps the peaks torch.cuda reports
(max_memory_allocated, max_memory_reserved), each phase's allocated peak, the event at the peak, and which block
served each request.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from memprof.simulation.allocator import DEFAULT_STREAM, CachingAllocatorModel, SimulatedOOM
from memprof.simulation.events import ALLOC, FREE


@dataclass
class Replay:
    peak_allocated: int
    peak_reserved: int
    peak_index: int
    phase_peaks: dict
    allocator: CachingAllocatorModel
    block_bytes: dict  # request id -> the size of the block that served it (fixed while it is allocated)


class Replayer:
    """The allocator model fed with a stream as it grows (see the module docstring). `capacity` limits it (a
    SimulatedOOM carries the event's index and the allocator as it was); `record` keeps its history, each entry
    stamped with its event's index; `streams` (storage id -> stream name, Trace.stream) puts those requests on their
    stream's pools, every other one on the default stream."""

    def __init__(self, capacity: int | None = None, record: bool = False, incremental: bool = True):
        self.capacity, self.record, self.incremental = capacity, record, incremental
        self._start()

    def _start(self) -> None:
        self.allocator = CachingAllocatorModel(self.capacity, self.record)
        self.fed: list = []  # (incremental: what was fed, to find what a longer stream adds)
        self.count = 0
        self.phase, self.peak_allocated, self.peak_reserved, self.peak_index = "setup", 0, 0, -1
        self.phase_peaks: dict = defaultdict(int)
        self.block_bytes: dict = {}

    def feed(self, events, streams: dict | None = None) -> CachingAllocatorModel:
        """Replay what `events` adds to the stream fed so far (all of it when its prefix changed)."""
        fed = self.fed
        if self.incremental and (len(events) < len(fed) or (fed and events[len(fed) - 1] != fed[-1])
                                 or events[:len(fed)] != fed):
            self._start()
            fed = self.fed
        alloc, stream_of, record = self.allocator, (streams or {}).get, self.record
        for i in range(self.count, len(events)):
            ev = events[i]
            kind = ev.kind
            if record:
                alloc.clock = i
            if kind is ALLOC:
                try:
                    self.block_bytes[ev.sid] = alloc.malloc(ev.sid, ev.nbytes, stream_of(ev.sid, DEFAULT_STREAM))
                except SimulatedOOM as oom:
                    oom.index, oom.allocator = i, alloc
                    raise
                if alloc.allocated > self.peak_allocated:
                    self.peak_allocated, self.peak_index = alloc.allocated, i
                if alloc.allocated > self.phase_peaks[self.phase]:
                    self.phase_peaks[self.phase] = alloc.allocated
                self.peak_reserved = max(self.peak_reserved, alloc.reserved)
            elif kind is FREE:
                alloc.free(ev.sid)
            else:
                self.phase = ev.name
        if self.incremental:
            fed.extend(events[self.count:])
        self.count = len(events)
        return alloc

    def reset_peaks(self) -> None:
        """The peaks count from now (torch.cuda.reset_peak_memory_stats)."""
        self.peak_allocated, self.peak_reserved = self.allocator.allocated, self.allocator.reserved

    def result(self) -> Replay:
        return Replay(self.peak_allocated, self.allocator.peak_reserved, self.peak_index, dict(self.phase_peaks),
                      self.allocator, self.block_bytes)


def replay(events, capacity: int | None = None, record: bool = False, streams: dict | None = None) -> Replay:
    """The whole stream replayed at once (see Replayer)."""
    replayer = Replayer(capacity, record, incremental=False)
    replayer.feed(events, streams)
    return replayer.result()
