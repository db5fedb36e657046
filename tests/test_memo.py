"""One memo object (memprof.simulation.memo.Memo) holds everything predictions reuse: a prediction reads and fills
the memo it is given, and no module of the engine keeps another cache or switch of its own."""

import importlib
import pkgutil
import types
import weakref
from collections import OrderedDict

from memprof import simulation
from memprof.simulation.events import ALLOC
from memprof.simulation.memo import MEMO, Memo
from memprof.simulation.simulate import prediction
from memprof.spec import RunSpec

SPEC = RunSpec("test-vit", "adamw")
# module-level containers that are not memos between predictions, each with why
NOT_MEMOS = {
    ("memprof.simulation.fake_compat", "_LIBRARY"): "the torch.library handle keeping the meta kernels registered",
    ("memprof.simulation.rules", "_CPU_AUTOCAST_OPS"): "a fact of the installed torch's dispatcher, read once",
    ("memprof.simulation.fast_dispatch", "_PROTOTYPES"): "per fake mode (weak): gone with the trace's mode",
    ("memprof.simulation.attribution", "OUTSIDE"): "a constant table (categories outside any module)",
    ("memprof.simulation.rules", "RULES"): "the rule classes by name",
    ("memprof.simulation.shared", "OPTIMS"): "the optimizer registry, imported",
    ("memprof.simulation.branches", "NOTES"): "a constant table (the notes of the CUDA branches not modelled)",
    ("memprof.simulation.audit", "PROBES"): "a constant table (the audit's probe functions)",
    ("memprof.simulation.audit", "NOT_IN_TRAINING"): "a constant table (OpInfo entries outside training)",
}


def test_a_prediction_reads_and_fills_the_memo_it_is_given():
    mine = Memo()
    before = len(MEMO.forwards)
    first = prediction(SPEC, memo=mine)
    assert len(mine.forwards) == 1 and len(MEMO.forwards) == before  # the process's memo is not touched
    again = prediction(SPEC, memo=mine)
    assert again.metrics["peak_reserved_bytes"] == first.metrics["peak_reserved_bytes"]
    # negative control: a memo whose forward lost its largest allocation gives another figure, so it was read
    fwd = next(iter(mine.forwards.values()))
    largest = max((i for i, e in enumerate(fwd.events) if e.kind is ALLOC), key=lambda i: fwd.events[i].nbytes)
    fwd.events[largest] = fwd.events[largest]._replace(nbytes=0)
    assert prediction(SPEC, memo=mine).metrics["peak_allocated_bytes"] != first.metrics["peak_allocated_bytes"]
    fresh = prediction(SPEC, memo=Memo())  # a fresh memo predicts from scratch: the true figure
    assert (fresh.metrics["peak_allocated_bytes"], fresh.metrics["peak_reserved_bytes"]) == \
        (first.metrics["peak_allocated_bytes"], first.metrics["peak_reserved_bytes"])


def _mutable_globals(module) -> list[str]:
    """Module-level containers that could carry state from one prediction to the next, less NOT_MEMOS."""
    kinds = (dict, list, set, OrderedDict, weakref.WeakKeyDictionary, weakref.WeakValueDictionary)
    return [name for name, value in vars(module).items() if isinstance(value, kinds) and not name.startswith("__")
            and (module.__name__, name) not in NOT_MEMOS]


def test_no_engine_module_keeps_a_cache_of_its_own():
    found = []
    for info in pkgutil.iter_modules(simulation.__path__):
        module = importlib.import_module(f"memprof.simulation.{info.name}")
        found += [f"{module.__name__}.{name}" for name in _mutable_globals(module)]
    assert found == []


def test_negative_control_a_module_cache_is_found():
    module = types.ModuleType("memprof.simulation.example")
    module._RECORDINGS = {}
    module.SEEN_STATS = {"hits": 0}
    assert _mutable_globals(module) == ["_RECORDINGS", "SEEN_STATS"]
