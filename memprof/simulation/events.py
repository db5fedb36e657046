"""The stream a trace records: what a CUDA caching allocator would be asked for, in order, and where the step was.

Each event is a named tuple whose first field is its kind (a `Kind`), so two events are equal only when they
are of one kind with equal fields:

- `Alloc(ALLOC, sid, nbytes, phase, op)`: storage `sid` of `nbytes` bytes is requested by `op` (an aten op's
  name, or what a rule says made it) during `phase`;
- `Free(FREE, sid)`: storage `sid` is released;
- `Phase(PHASE, name, step)`: the step enters phase `name` (setup, forward, backward, optimizer, done);
- `Block(BLOCK, at)` and `Window(WINDOW, step, which)`: marks the shortcuts put in a stream they are still
  building (memprof.simulation.repeated_blocks); a finished trace holds none.

Read the stream through the walkers below or by the fields' names, never by position.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Kind(IntEnum):
    ALLOC = 0
    FREE = 1
    PHASE = 2
    BLOCK = 3
    WINDOW = 4


ALLOC, FREE, PHASE, BLOCK, WINDOW = Kind


class Alloc(NamedTuple):
    kind: Kind
    sid: int
    nbytes: int
    phase: str
    op: str


class Free(NamedTuple):
    kind: Kind
    sid: int


class Phase(NamedTuple):
    kind: Kind
    name: str
    step: int


class Block(NamedTuple):
    kind: Kind
    at: object  # the block's index; (repeated_blocks.AFTER, index) right after its forward; None outside blocks


class Window(NamedTuple):
    kind: Kind
    step: int
    which: str  # "first" or "end"


def alloc(sid: int, nbytes: int, phase: str, op: str) -> Alloc:
    return Alloc(ALLOC, sid, nbytes, phase, op)


def free(sid: int) -> Free:
    return Free(FREE, sid)


def phase(name: str, step: int) -> Phase:
    return Phase(PHASE, name, step)


def names_storage(ev) -> bool:
    """Whether `ev` is an allocation or a release (the events that name a storage)."""
    return ev.kind is ALLOC or ev.kind is FREE


def renamed(ev, sid: int):
    """`ev` (an allocation or a release) naming storage `sid` instead."""
    return ev._replace(sid=sid)


def allocation_count(events) -> int:
    return sum(1 for ev in events if ev.kind is ALLOC)


def last_allocation(events, sid: int) -> int | None:
    """The index of the latest allocation of `sid`, or None."""
    for i in range(len(events) - 1, -1, -1):
        ev = events[i]
        if ev.kind is ALLOC and ev.sid == sid:
            return i
    return None


def first_allocation(events, sid: int) -> int | None:
    """The index of the first allocation of `sid`, or None."""
    return next((i for i, ev in enumerate(events) if ev.kind is ALLOC and ev.sid == sid), None)


def live_after(events, index: int) -> dict[int, int]:
    """Storage id -> requested bytes of every storage allocated and not yet released right after event `index`."""
    live = {}
    for ev in events[: index + 1]:
        if ev.kind is ALLOC:
            live[ev.sid] = ev.nbytes
        elif ev.kind is FREE:
            live.pop(ev.sid, None)
    return live


def phase_at(events, index: int) -> tuple[str, int]:
    """(phase, step) the stream is in at event `index`."""
    for ev in reversed(events[: index + 1]):
        if ev.kind is PHASE:
            return ev.name, ev.step
    return "setup", 0


def allocation_phases(events, index: int) -> dict[int, str]:
    """Storage id -> the phase it was allocated in, for the allocations up to event `index`."""
    phase_of, current = {}, "setup"
    for ev in events[: index + 1]:
        if ev.kind is ALLOC:
            phase_of[ev.sid] = current
        elif ev.kind is PHASE:
            current = ev.name
    return phase_of
