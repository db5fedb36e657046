"""A deep ViT's forward synthesized from four traced blocks (memprof.simulation.repeated_blocks) gives every
metric a trace of the whole model gives.

What this proves: on a 9-block test model, for fp32, bf16-amp (both attention paths: sm_75's math path and
sm_80's flash kernel), pure bf16, checkpointing, a frozen embedding, timm's chunked LAMB and a batch above 1,
the synthesized stream replays to the same peaks, breakdown, holders (module paths of every block), rules'
counters and verdict as the full trace; a model whose blocks differ is refused by the check and traced
whole. What it does not prove: the paper models (compared by hand in the closing note and by the CI gate,
whose baseline figures are unchanged).
"""

from dataclasses import replace

import pytest

from memprof.simulation.rule import Rule
import torch

from memprof import harness
from memprof.model_sources import open_clip as sources
from memprof.simulation import repeated_blocks, shared
from memprof.simulation.simulate import predict_traced
from memprof.simulation.tracing import trace
from memprof.spec import RunSpec

DEEP = sources.ModelInfo("test-vit-deep", "test-vit with 9 blocks", embed_dim=32,
                         vision_cfg=tuple((k, 9 if k == "layers" else v)
                                          for k, v in sources.REGISTRY["test-vit"].vision_cfg))


@pytest.fixture(autouse=True)
def deep_model(monkeypatch):
    monkeypatch.setitem(sources.REGISTRY, DEEP.name, DEEP)


@pytest.fixture
def outcomes(monkeypatch):
    """What each synthesis attempt gave: "synthesized" or the reason it was refused."""
    seen = []
    original = repeated_blocks.expand

    def watched(*args, **kwargs):
        try:
            out = original(*args, **kwargs)
        except repeated_blocks.NotPeriodic as exc:
            seen.append(str(exc))
            raise
        seen.append("synthesized")
        return out

    monkeypatch.setattr(repeated_blocks, "expand", watched)
    return seen


def _predict(spec, share):
    from memprof.simulation.shared import trace_shared

    return predict_traced(lambda rules: trace_shared(spec, rules) if share else trace(spec, rules), spec.budget, spec)


SPECS = [
    RunSpec("test-vit-deep", "adamw"),
    RunSpec("test-vit-deep", "sgd-fe", batch_size=3, grad_ckpt=True),
    RunSpec("test-vit-deep", "adamw", precision="bf16-amp", budget="titan-x"),  # sm_75: math attention
    RunSpec("test-vit-deep", "sgd-fe-nomom", precision="bf16-amp", grad_ckpt=True, optim_impl="fused",
            budget="a100-80g"),  # sm_80: flash attention
    RunSpec("test-vit-deep", "lamb", precision="bf16", budget="rtx4090"),  # timm's chunks on a 72 MiB-L2 card
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.optim}-{s.precision}-ckpt{int(s.grad_ckpt)}-{s.budget}")
def test_synthesized_blocks_equal_the_whole_trace(spec, outcomes):
    synthesized = _predict(spec, share=True)
    assert outcomes == ["synthesized"]
    assert synthesized == _predict(spec, share=False)


def test_the_stream_has_every_block(outcomes):
    spec = SPECS[0]
    rules = []
    fwd = shared.trace_forward(spec, rules)
    whole = shared.trace_forward(spec, [], repeat_blocks=False)
    assert outcomes == ["synthesized"]
    assert len(fwd.events) == len(whole.events)
    blocks = {name.split(".")[3] for name in fwd.module.values() if name.startswith("visual.transformer.resblocks.")}
    assert blocks == {str(i) for i in range(9)}
    assert len(fwd.resident_ids) == len(whole.resident_ids) and len(fwd.trainable) == len(whole.trainable)


def test_blocks_that_differ_are_traced_whole(monkeypatch, outcomes):
    """Negative control: block 2 with a narrower MLP does not repeat block 1; the check refuses it and the
    prediction comes from the whole trace."""
    build = harness.build_model

    def odd_block(info, num_classes):
        model = build(info, num_classes)
        if info.name == DEEP.name:
            mlp = model.visual.transformer.resblocks[2].mlp
            mlp.c_fc, mlp.c_proj = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
        return model

    monkeypatch.setattr(harness, "build_model", odd_block)
    spec = SPECS[0]
    result = _predict(spec, share=True)
    assert len(outcomes) == 1 and "differ" in outcomes[0]
    assert result == _predict(spec, share=False)


def test_shallow_models_are_traced_whole(outcomes):
    _predict(replace(SPECS[0], model="test-vit"), share=True)  # 2 blocks: nothing to gain
    assert outcomes == []


class _Counting(Rule):
    """A rule (memprof.simulation.rule.Rule's contract) counting the ops it sees: a count grows block by block."""

    name, summary, source, forward_only, acts_on = "counting", "", "", False, None
    storage_maps, emptied_each_step = (), ()

    def __init__(self):
        self.ops = 0

    def before_op(self, tracker, func, args, kwargs):
        pass

    def after_op(self, tracker, func, args, kwargs, out):
        self.ops += 1

    def attach(self, tracker, optimizer):
        pass

    def metrics(self):
        return {"ops_seen": self.ops}

    def describe(self):
        return {"name": self.name, "summary": "", "source": ""}


class _HoldsAStorage(_Counting):
    """A rule that keeps the last op's name, undeclared: not a count, changes in every block."""

    def __init__(self):
        super().__init__()
        self.last_op = ""

    def after_op(self, tracker, func, args, kwargs, out):
        self.last_op = f"{func}#{self.ops}"
        self.ops += 1


def _with_rule(spec, rule):
    from memprof.simulation.shared import trace_shared

    def make(rules):
        rules.append(rule)
        return trace_shared(spec, rules)

    return predict_traced(make, spec.budget, spec)


def test_a_rule_state_the_shortcut_cannot_scale_is_refused_by_name(outcomes):
    """A rule whose undeclared attribute changes in each block and is not a count: repeated blocks refuses it,
    naming the rule and the attribute, and the model is traced whole; a counting rule (the control) is
    synthesized, its count scaled to every block."""
    _with_rule(SPECS[0], _Counting())
    assert outcomes == ["synthesized"]
    shared.clear()
    _with_rule(SPECS[0], _HoldsAStorage())
    assert len(outcomes) == 2 and "rule _HoldsAStorage: last_op changes in each block and is not a count" in outcomes[1]


def test_the_shortcuts_read_what_rules_declare():
    from memprof.simulation.rule import declared
    from memprof.simulation.rules import CudaAutocastPolicy, InPlaceGradAccumulation

    assert declared(InPlaceGradAccumulation.__new__(InPlaceGradAccumulation))[1] == ("candidates",)
    assert declared(CudaAutocastPolicy.__new__(CudaAutocastPolicy))[2] == ("cache",)
    assert declared(_Counting()) == ("_Counting", (), ())  # control: a rule declaring nothing
