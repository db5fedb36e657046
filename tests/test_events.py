"""The event stream's kinds and walkers (memprof.simulation.events), and that the engine reads events by name."""

import ast
from pathlib import Path

import pytest

from memprof.simulation.events import (ALLOC, BLOCK, FREE, Alloc, Block, Free, allocation_count, allocation_phases,
                                       alloc, first_allocation, free, last_allocation, live_after, names_storage,
                                       phase, phase_at, renamed)

ROOT = Path(__file__).resolve().parents[1] / "memprof"
KINDS = {"ALLOC", "FREE", "PHASE", "BLOCK", "WINDOW"}

STREAM = [phase("forward", 0), alloc(1, 100, "forward", "aten.mm"), alloc(2, 50, "forward", "aten.add"), free(1),
          phase("backward", 0), alloc(3, 70, "backward", "aten.mm"), alloc(1, 10, "backward", "again")]


def test_walkers_read_the_stream():
    assert live_after(STREAM, 2) == {1: 100, 2: 50}
    assert live_after(STREAM, 5) == {2: 50, 3: 70}
    assert phase_at(STREAM, 0) == ("forward", 0) and phase_at(STREAM, 5) == ("backward", 0)
    assert phase_at(STREAM[1:], 0) == ("setup", 0)
    assert allocation_phases(STREAM, 6) == {1: "backward", 2: "forward", 3: "backward"}
    assert allocation_count(STREAM) == 4
    assert first_allocation(STREAM, 1) == 1 and last_allocation(STREAM, 1) == 6 and last_allocation(STREAM, 9) is None


def test_events_of_different_kinds_are_never_equal():
    """Negative control of the representation: a release and a block mark with the same payload differ (the kind
    is a field), and renaming keeps an event's kind and its other fields."""
    assert Free(FREE, 3) != Block(BLOCK, 3)
    assert names_storage(free(3)) and not names_storage(Block(BLOCK, 3)) and not names_storage(phase("forward", 0))
    moved = renamed(alloc(1, 100, "forward", "aten.mm"), 7)
    assert type(moved) is Alloc and moved == Alloc(ALLOC, 7, 100, "forward", "aten.mm")


def positional_event_tests(text: str) -> list[int]:
    """Lines that compare an indexed value with an event kind (`ev[0] == ALLOC`) or read a kind's field by index."""
    lines = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Name) and s.id in KINDS for s in sides) and \
                    any(isinstance(s, ast.Subscript) and isinstance(s.slice, ast.Constant) for s in sides):
                lines.append(node.lineno)
    return lines


def test_no_module_tests_an_event_kind_by_position():
    found = {str(p.relative_to(ROOT)): positional_event_tests(p.read_text(encoding="utf-8"))
             for p in sorted(ROOT.rglob("*.py"))}
    assert {p: lines for p, lines in found.items() if lines} == {}


@pytest.mark.parametrize("source", ["if ev[0] == ALLOC:\n    pass\n", "x = [e for e in s if FREE != e[0]]\n"])
def test_the_check_finds_a_positional_test(source):
    """Negative control: the reader above flags the old style."""
    assert positional_event_tests(source) == [1]


def test_the_tracker_edits_its_own_stream():
    """relabel and resize rewrite the allocation in place, as the same kind; release logs a Free."""
    import torch

    from memprof.simulation.tracker import StorageTracker

    tracker = StorageTracker()
    t = torch.empty(4)
    sid = tracker.register(t, "aten.empty")
    tracker.relabel(sid, "cuBLAS workspace")
    tracker.resize(sid, 64)
    assert tracker.events[-1] == alloc(sid, 64, "setup", "cuBLAS workspace") and tracker.live_bytes == 64
    tracker.release(t)
    assert tracker.events[-1] == free(sid) and tracker.live_bytes == 0
