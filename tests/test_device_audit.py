"""The audit of device-dependent operations (memprof.simulation.audit, docs/device-branching-ops.md) cannot drift:
the page is the table's rendering, every row names a rule or test that exists, and every probe allocates on fake
CPU tensors under the rules what it allocates on fake CUDA tensors (the dispatch the installed torch takes for
CUDA); for a rule's row, without the rule it does not (negative control)."""

import ast
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.simulation import audit
from memprof.simulation.events import ALLOC
from memprof.simulation.rules import RULES, CudaDeviceBranches, LayerNormStatsFp32
from memprof.simulation.tracker import StorageTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "device-branching-ops.md")


def test_the_page_is_the_table():
    with open(PAGE, encoding="utf-8") as fh:
        assert fh.read() == audit.render(), "regenerate: python -m memprof.simulation.audit > docs/device-branching-ops.md"


def test_the_readme_links_the_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert "docs/device-branching-ops.md" in fh.read()


def _test_names(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return {n.name for n in ast.walk(ast.parse(fh.read())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("row", audit.ROWS, ids=lambda r: r.family)
def test_each_row_is_held_by_a_rule_or_a_test_that_exists(row):
    assert row.verdict in audit.VERDICTS
    if "::" in row.check:
        path, name = row.check.split("::")
        assert name in _test_names(path), row.check
    else:
        assert row.check in RULES, row.check
    if row.verdict in ("bound", "flag"):
        assert row.check in RULES


def test_every_device_dependent_opinfo_is_explained():
    scan = audit.read_scan()
    explained = {name for row in audit.ROWS for name in row.opinfo} | set(audit.NOT_IN_TRAINING)
    assert {e.rsplit(" (", 1)[0] for e in scan["differ"]} <= explained
    assert "UNEXPLAINED" not in audit.render(scan)


def test_unaudited_names_what_no_row_covers():
    """Negative control of the sweep's check: an op no row names and the scan never saw is reported."""
    scan = {"same": ["aten.mm.default"], "differ": {}}
    assert audit.unaudited(["aten.mm.default", "aten.native_dropout.default", "aten.made_up.default",
                            "cuBLAS workspace (main thread)"], scan) == ["aten.made_up.default"]


def _requests(probe, device, dtype, rules):
    """(sorted request sizes of aten ops, bytes alive while the outputs are held) of one probe's forward."""
    with FakeTensorMode():
        tracker = StorageTracker(rules)
        with tracker, contextlib.ExitStack() as stack:
            for rule in rules:
                if hasattr(rule, "mode"):
                    stack.enter_context(rule.mode())
            out = probe(device, dtype)
            alive = tracker.live_bytes
            sizes = sorted(ev.nbytes for ev in tracker.events if ev.kind is ALLOC and ev.op.startswith("aten."))
            del out
    return sizes, alive


def _rules():
    return [CudaDeviceBranches(), LayerNormStatsFp32()]


CASES = [(row, dt) for row in audit.ROWS if row.probe for dt in row.dtypes]


@pytest.mark.parametrize("row, dtype", CASES, ids=[f"{r.probe}-{d}" for r, d in CASES])
def test_probes_alike(row, dtype):
    probe, dt = audit.PROBES[row.probe], getattr(torch, dtype)
    torch.manual_seed(0)
    cuda = _requests(probe, "cuda", dt, [])
    assert _requests(probe, "cpu", dt, _rules()) == cuda


RULED = [r for r in audit.ROWS if r.probe and r.verdict == "rule" and r.check in ("cuda-device-branches",
                                                                                   "layer-norm-stats-fp32")]


@pytest.mark.parametrize("row", RULED, ids=lambda r: r.probe)
def test_a_rules_probe_differs_without_it(row):
    probe = audit.PROBES[row.probe]
    assert any(_requests(probe, "cpu", getattr(torch, d), []) != _requests(probe, "cuda", getattr(torch, d), [])
               for d in row.dtypes)


def test_batch_norm_fp32_keeps_what_cudnn_keeps():
    """fp32 [8, 64, 32, 32] training: the output (2 MiB) and save_mean / save_invstd [64] fp32 (256 B each) stay
    with the node, as cudnn_batch_norm's do (its reserve space: 0 in torch's meta, cuDNN's query unknown offline).
    Negative control: in eval the statistics are not computed (only the output)."""
    def run(training):
        with FakeTensorMode():
            x = torch.randn(8, 64, 32, 32, requires_grad=True)
            w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
            rm, rv = torch.zeros(64), torch.ones(64)
            tracker = StorageTracker([CudaDeviceBranches()])
            with tracker:
                y = F.batch_norm(x, rm, rv, w, b, training=training)
                sizes = [ev.nbytes for ev in tracker.events if ev.kind is ALLOC]
                del y
        return sizes

    assert run(True) == [2 << 20, 256, 256]
    assert run(False) == [2 << 20]


def test_ctc_loss_is_refused_in_one_line():
    """_ctc_loss sizes its buffers from the target lengths' values: on fake tensors a data-dependent output, which
    the tracer turns into one line naming the op and what to use instead."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    from memprof.simulation.tracing import _untraceable

    model = torch.nn.Linear(4, 20)
    with FakeTensorMode():
        logp = torch.randn(50, 2, 20, requires_grad=True).log_softmax(2)
        with pytest.raises(DynamicOutputShapeException) as info:
            F.ctc_loss(logp, torch.randint(1, 20, (2, 30)), torch.full((2,), 50, dtype=torch.long),
                       torch.full((2,), 30, dtype=torch.long))
    message = str(_untraceable(info.value, model))
    assert "\n" not in message and "_ctc_loss" in message and "--backend cpu" in message
