"""Forwards synthesized from a batch line (memprof.simulation.batch_scaling) and optimizer windows reused
across batches (memprof.simulation.shared, `memprof fit`'s probes) give exactly the prediction a trace gives.

What this proves: on the test model, under fp32 and bf16-amp with checkpointing, for foreach, fused and
timm-chunked optimizers and a frozen embedding, predictions at batches the line synthesized (including
ones far past the traced batches) equal full traces in every metric; a line is refused where two traces
differ in more than sizes, and a check against a third trace fails when that trace disagrees. What it
does not prove: the paper models (compared by hand in the closing note: every fit record identical).
"""

from dataclasses import replace

import pytest

from memprof.budget import parse_budget
from memprof.simulation.memo import MEMO
from memprof.simulation import shared
from memprof.simulation.batch_scaling import BatchLine, NotAffine
from memprof.simulation.rules import cuda_rules
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

BATCHES = [1, 2, 9, 17, 64, 5, 200]


def _forward(spec):
    return shared.trace_forward(spec, cuda_rules(parse_budget(spec.budget), spec))


@pytest.mark.parametrize("spec", [
    RunSpec("test-vit", "adamw", budget="rtx4090"),
    RunSpec("test-vit", "lamb", budget="rtx4090"),  # timm's chunked foreach
    RunSpec("test-vit", "sgd-fe", precision="bf16-amp", grad_ckpt=True, optim_impl="fused"),
], ids=lambda s: f"{s.optim}-{s.precision}")
def test_synthesized_forwards_and_reused_windows_equal_traces(spec):
    with shared.scaling_in_batch():
        scaled = {b: predict(replace(spec, batch_size=b)) for b in BATCHES}
    family = next(iter(MEMO.lines.values()))
    assert family["verified"] is True
    assert [seen[3] for seen in MEMO.windows.values()] == [True]
    for b in (17, 5, 200):  # 17 on: synthesized; 64 on: optimizer windows reused too
        shared.clear()
        assert scaled[b] == predict(replace(spec, batch_size=b)), b


def test_line_through_two_traces_gives_a_third():
    spec = RunSpec("test-vit", "adamw")
    line = BatchLine(_forward(replace(spec, batch_size=2)), 2, _forward(replace(spec, batch_size=5)), 5)
    assert line.sizes  # activations grow with the batch
    assert line.verify(_forward(replace(spec, batch_size=11)), 11)


def test_a_broken_third_trace_fails_the_check():
    """Negative control: one allocation a byte larger, or one event fewer, in the third trace."""
    spec = RunSpec("test-vit", "adamw")
    line = BatchLine(_forward(replace(spec, batch_size=2)), 2, _forward(replace(spec, batch_size=5)), 5)
    third = _forward(replace(spec, batch_size=11))
    i = next(iter(line.sizes))
    ev = third.events[i]
    bigger = replace(third, events=[*third.events[:i], ev._replace(nbytes=ev.nbytes + 1), *third.events[i + 1:]])
    assert not line.verify(bigger, 11)
    assert not line.verify(replace(third, events=third.events[:-1]), 11)
    assert not line.verify(third, 12)  # right stream, wrong batch


def test_streams_that_differ_in_more_than_sizes_make_no_line():
    """Batch 1 takes other paths (views already contiguous): its stream has other events."""
    spec = RunSpec("test-vit", "adamw")
    with pytest.raises(NotAffine):
        BatchLine(_forward(replace(spec, batch_size=1)), 1, _forward(replace(spec, batch_size=2)), 2)
    with pytest.raises(NotAffine, match="whole number"):
        two = _forward(replace(spec, batch_size=2))
        five = _forward(replace(spec, batch_size=5))
        i = next(j for j, (x, y) in enumerate(zip(two.events, five.events)) if x != y)
        ev = five.events[i]
        BatchLine(two, 2, replace(five, events=[*five.events[:i], ev._replace(nbytes=ev.nbytes + 1),
                                               *five.events[i + 1:]]), 5)


def test_windows_that_change_are_not_reused(monkeypatch):
    """Negative control: if an optimizer's second trace differs from its first, the windows are never reused
    and every prediction is a full trace."""
    spec = RunSpec("test-vit", "adamw")
    calls = []
    original = shared.trace_windows

    def drifting(fwd, spec, rules, memo=MEMO):
        opt = original(fwd, spec, rules, memo)
        calls.append(spec.batch_size)
        if len(calls) > 1:  # the second trace loses a release the first had
            opt.events[0] = opt.events[0][:-1]
        return opt

    monkeypatch.setattr(shared, "trace_windows", drifting)
    with shared.scaling_in_batch():
        for b in (2, 3, 4, 7):
            predict(replace(spec, batch_size=b))
    assert [seen[3] for seen in MEMO.windows.values()] == [False]
    assert calls == [2, 3, 4, 7]
