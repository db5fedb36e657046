"""Math-path attention replayed as one node (memprof.simulation.math_attention) gives the composite's stream."""

import contextlib

import pytest

from memprof.budget import parse_budget
from memprof.simulation import math_attention, shared, tracing
from memprof.simulation.memo import MEMO
from memprof.simulation.rules import cuda_rules
from memprof.simulation.events import ALLOC, FREE
from memprof.spec import RunSpec


def canonical(t) -> tuple:
    """The stream with storage ids numbered by first appearance, and each storage's category, module and origin."""
    ids, events = {}, []
    for ev in t.events:
        if ev[0] in (ALLOC, FREE):
            events.append((ev[0], ids.setdefault(ev[1], len(ids)), *ev[2:]))
        else:
            events.append(ev)
    return events, {ids[s]: (t.category.get(s), t.module.get(s), t.origin.get(s)) for s in ids}


@pytest.fixture(autouse=True)
def no_recordings():
    """Each test records afresh, and leaves no recording (some are wrong on purpose) to later tests."""
    MEMO.attention.clear()
    yield
    MEMO.attention.clear()


def traced(spec, replay: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not replay:
            m.setattr(math_attention, "replaying", lambda tracker, memo: contextlib.nullcontext())
        shared.clear()
        from memprof.simulation.shared import shareable, trace_shared

        rules = cuda_rules(parse_budget(spec.budget), spec)
        return trace_shared(spec, rules) if shareable(spec) else tracing.trace(spec, rules)


SPECS = [  # titan-x: below sm80, bf16 attention takes the math path
    RunSpec("test-vit", "adamw", precision="bf16-amp", optim_impl="fused", budget="titan-x"),
    RunSpec("test-vit", "sgd-fe", precision="bf16", budget="titan-x", batch_size=3),
    RunSpec("test-vit", "sgd", precision="bf16-amp", budget="titan-x", grad_ckpt=True),  # not replayed: recomputes
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.precision}-bs{s.batch_size}-ckpt{s.grad_ckpt}")
def test_replayed_stream_is_the_composites(spec, monkeypatch):
    from memprof.simulation.memo import MEMO

    before = MEMO.attention_replayed
    replayed = traced(spec, True, monkeypatch)
    assert (MEMO.attention_replayed > before) == (not spec.grad_ckpt)
    assert canonical(replayed) == canonical(traced(spec, False, monkeypatch))


def one_byte_larger(record):
    """`record` (math_attention._record_backward) with its first backward request one byte larger."""

    def wrong(*args):
        entries, layouts = record(*args)
        i = next(i for i, e in enumerate(entries) if e[0] == "a")
        kind, local, nbytes, op = entries[i]
        return [*entries[:i], (kind, local, nbytes + 1, op), *entries[i + 1:]], layouts

    return wrong


def test_a_wrong_template_changes_the_stream(monkeypatch):
    """Negative control for the comparison: a recorded backward request one byte larger shows in the stream."""
    wrong = one_byte_larger(math_attention._record_backward)
    spec = SPECS[0]
    composite = canonical(traced(spec, False, monkeypatch))
    monkeypatch.setattr(math_attention, "_record_backward", wrong)
    assert canonical(traced(spec, True, monkeypatch)) != composite


def test_a_forward_recording_the_backward_disagrees_with_is_not_replayed(monkeypatch):
    """The backward's recording runs the forward again; when that differs from the forward's template the
    trace is marked broken and traced op by op."""
    record = math_attention._record_forward

    def wrong(*args):
        template = record(*args)
        kind, local, nbytes, op = template.fwd[0]
        template.fwd[0] = (kind, local, nbytes + 1, op)
        return template

    spec = SPECS[0]
    composite = canonical(traced(spec, False, monkeypatch))
    monkeypatch.setattr(math_attention, "_record_forward", wrong)
    assert canonical(traced(spec, True, monkeypatch)) == composite


def test_a_gradient_held_past_the_node_breaks_the_replay(monkeypatch):
    """The replay releases the incoming gradient where the composite does; if something keeps it alive, the
    trace is marked broken and traced again op by op (the stream is still the composite's)."""
    held = []
    backward = math_attention._Replay.backward

    def holding(ctx, grad_out):
        held.append(grad_out)
        return backward(ctx, grad_out)

    monkeypatch.setattr(math_attention._Replay, "backward", staticmethod(holding))
    reasons = []
    broken = math_attention.broken
    monkeypatch.setattr(math_attention, "broken", lambda tracker: reasons.append(broken(tracker)) or reasons[-1])
    spec = SPECS[0]
    replayed = traced(spec, True, monkeypatch)
    held.clear()
    assert reasons and reasons[0] is not None and "outlived" in reasons[0]
    assert reasons[-1] is None  # the second trace, op by op
    assert canonical(replayed) == canonical(traced(spec, False, monkeypatch))


def test_a_later_trace_under_rules_in_the_same_state_replays_the_recordings(monkeypatch):
    """Recordings are kept for the process: the second trace of a spec (the next optimizer on the same model, as
    here) records nothing and its stream is still the composite's; rules in another state record afresh."""
    calls = []
    record = math_attention._record_forward
    monkeypatch.setattr(math_attention, "_record_forward", lambda *a: calls.append(1) or record(*a))
    first, second = SPECS[0], RunSpec("test-vit", "sgd", precision="bf16-amp", optim_impl="fused", budget="titan-x")
    traced(first, True, monkeypatch)
    recorded = len(calls)
    assert recorded > 0
    assert canonical(traced(second, True, monkeypatch)) == canonical(traced(second, False, monkeypatch))
    assert len(calls) == recorded
    other_card = RunSpec("test-vit", "sgd", precision="bf16-amp", optim_impl="fused", budget="12GiB@7.0")
    traced(other_card, True, monkeypatch)
    assert len(calls) > recorded  # a bare size has no known L2 cache: the rules stand differently, recorded afresh


def test_a_wrong_recording_reaches_the_later_trace(monkeypatch):
    """Negative control for the test above: the second trace does replay the first one's recordings, so a wrong
    one shows in its stream."""
    wrong = one_byte_larger(math_attention._record_backward)
    second = RunSpec("test-vit", "sgd", precision="bf16-amp", optim_impl="fused", budget="titan-x")
    composite = canonical(traced(second, False, monkeypatch))
    with monkeypatch.context() as m:
        m.setattr(math_attention, "_record_backward", wrong)
        traced(SPECS[0], True, monkeypatch)
    assert canonical(traced(second, True, monkeypatch)) != composite
