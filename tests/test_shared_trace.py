"""The shared forward trace (memprof.simulation.shared) gives every metric the full trace gives, and the
runner sends a group's configurations to the worker that holds its forward trace.

What this proves: for the test model under each rule family that acts in the optimizer window (foreach,
fused, timm chunking, bitsandbytes, autocast and half-precision attention, checkpointing), the spliced stream
replays to the same peaks, breakdown, holders, rules' metrics and verdict as a full trace, also when the
forward trace is reused from an earlier optimizer. What it does not prove: equality on the paper models
(checked by hand in the closing note of the session that added it: 38 ViT-B/16 configurations identical).
"""

import pytest

from memprof.executors.runner import _assign
from memprof.simulation.memo import MEMO
from memprof.simulation import shared
from memprof.simulation.simulate import predict_traced
from memprof.simulation.tracing import trace
from memprof.spec import RunSpec, forward_group


def _predict(spec, share):
    from memprof.simulation.shared import shareable, trace_shared

    def make(rules):
        return trace_shared(spec, rules) if share and shareable(spec) else trace(spec, rules)

    status, metrics = predict_traced(make, spec.budget, spec)
    return status, metrics


SPECS = [
    RunSpec("test-vit", "adamw"),
    RunSpec("test-vit", "sgd"),  # same forward as adamw: reused from the cache
    RunSpec("test-vit", "sgd-fe-nomom", grad_ckpt=True),
    RunSpec("test-vit", "lamb", budget="rtx4090"),  # timm's chunked foreach on a 72 MiB-L2 card
    RunSpec("test-vit", "adamw", state_bits=8),
    RunSpec("test-vit", "adamw", precision="bf16-amp", optim_impl="fused", budget="a100-80g"),
    RunSpec("test-vit", "sgd", precision="bf16", optim_impl="forloop"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.optim}-{s.precision}-{s.optim_impl}-{s.state_bits}")
def test_shared_trace_equals_full_trace(spec):
    pytest.importorskip("bitsandbytes") if spec.state_bits == 8 else None
    assert shared.shareable(spec)
    assert _predict(spec, share=True) == _predict(spec, share=False)


def test_forward_trace_is_reused_across_optimizers():
    shared.clear()
    _predict(RunSpec("test-vit", "adamw"), share=True)
    _predict(RunSpec("test-vit", "sgd"), share=True)
    _predict(RunSpec("test-vit", "sgd-fe"), share=True)  # freezes the embedding: its own forward
    assert len(MEMO.forwards) == 2


def test_comparison_catches_a_broken_splice(monkeypatch):
    """Negative control: an optimizer window that loses its events no longer matches the full trace."""
    spec = RunSpec("test-vit", "adamw")
    full = _predict(spec, share=False)
    shared.clear()
    original = shared.StorageTracker.set_phase

    def drop_optimizer_phase(self, phase, step=0):  # the optimizer's phase marker never reaches the stream
        if phase != "optimizer":
            original(self, phase, step)

    monkeypatch.setattr(shared.StorageTracker, "set_phase", drop_optimizer_phase)
    assert _predict(spec, share=True) != full
    shared.clear()


def test_a_users_factory_is_never_cached():
    assert not shared.shareable(RunSpec("py:mymodels:build", "adamw", input_shape="3x8x8"))


@pytest.mark.parametrize("spec", [RunSpec("test-vit", "adamw", precision="fp16-amp"),
                                  RunSpec("test-vit", "adamw", optim_in_backward=True),
                                  RunSpec("test-vit", "adamw", parallel="ddp", world_size=2)])
def test_unshareable_setups_trace_whole(spec):
    assert not shared.shareable(spec)
    shared.clear()
    _predict(spec, share=True)
    assert not MEMO.forwards


def test_forward_group_ignores_only_the_optimizer():
    base = RunSpec("test-vit", "adamw")
    assert forward_group(base) == forward_group(RunSpec("test-vit", "sgd", state_bits=8, optim_impl="fused"))
    assert forward_group(base) != forward_group(RunSpec("test-vit", "sgd-fe"))  # frozen embedding
    assert forward_group(base) != forward_group(RunSpec("test-vit", "adamw", grad_ckpt=True))
    assert forward_group(base) != forward_group(RunSpec("test-vit", "adamw", batch_size=2))


class _Worker:
    def __init__(self, group=None, task=None):
        self.group, self.task = group, task


def test_assign_keeps_groups_on_their_worker():
    group = {0: "a", 1: "a", 2: "b", 3: "b"}.get
    busy_a = _Worker("a", task=9)
    idle_b = _Worker("b")
    assert _assign([1, 2, 3], [busy_a, idle_b], 2, group) == (idle_b, 1)  # its own group first
    assert _assign([2, 3], [busy_a], 2, group) == (None, 0)  # a new worker for a group nobody serves
    assert _assign([1], [busy_a, _Worker("b")], 2, group) is None  # group a waits for its worker
    assert _assign([1], [busy_a], 1, group) is None  # no room for another worker


def test_assign_without_groups_takes_the_first_task():
    idle = _Worker("x")
    assert _assign([5, 6], [idle], 2, None) == (idle, 0)
    assert _assign([5, 6], [], 2, None) == (None, 0)


def test_a_failed_optimizer_trace_drops_its_forward(monkeypatch):
    """An optimizer that fails mid-step leaves nothing behind: the next prediction traces afresh and still
    equals the full trace."""
    spec = RunSpec("test-vit", "adamw")
    _predict(spec, share=True)

    def broken_step(self, *args, **kwargs):
        raise RuntimeError("step failed")

    import torch

    with monkeypatch.context() as m:
        m.setattr(torch.optim.SGD, "step", broken_step)
        with pytest.raises(RuntimeError, match="step failed"):
            _predict(RunSpec("test-vit", "sgd"), share=True)
    assert not MEMO.forwards
    assert _predict(RunSpec("test-vit", "sgd"), share=True) == _predict(RunSpec("test-vit", "sgd"), share=False)
