"""--train (partial fine-tuning): all, head (a linear probe), last:N (the last N residual blocks, the final norm,
the output projection and the head) or module-name globs. What does not train gets no gradient and no optimizer
state: checked by hand-computed bytes on test-vit (see tests/test_grad_accum.py for the count)."""

import json
import pathlib

import pytest

import memprof
from memprof.errors import UsageError
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec
from tests.test_grad_accum import BLOCK, HEAD, PARAMS, TAIL

ADAMW = 4 + 8  # fp32 bytes per trained parameter: its gradient, AdamW's exp_avg and exp_avg_sq


def _run(train: str = "all", optim: str = "adamw"):
    status, m = predict(RunSpec("test-vit", optim, train=train))
    assert status == "ok"
    return m


def _grad_and_state_bytes(m) -> int:
    """floor_bytes is every weight + one gradient per trained parameter + the optimizer's state."""
    return m["floor_bytes"] - 4 * m["params_total"]


def test_a_linear_probe_trains_the_head_alone():
    m = _run("head")
    assert m["params_trainable"] == HEAD == 330
    assert _grad_and_state_bytes(m) == HEAD * ADAMW and m["optimizer_state_bytes"] == HEAD * 8
    assert m["params_total"] == PARAMS and len(m["frozen_parameter_names"]) > 0


def test_last_one_trains_one_block_the_tail_and_the_head():
    m = _run("last:1")
    assert m["params_trainable"] == BLOCK + TAIL + HEAD == 52490
    assert _grad_and_state_bytes(m) == (BLOCK + TAIL + HEAD) * ADAMW
    assert not any(n.startswith("visual.transformer.resblocks.1.") for n in m["frozen_parameter_names"])
    assert any(n.startswith("visual.transformer.resblocks.0.") for n in m["frozen_parameter_names"])


def test_negative_control_training_everything_costs_more():
    everything = _run()
    assert _grad_and_state_bytes(everything) == PARAMS * ADAMW > (BLOCK + TAIL + HEAD) * ADAMW > HEAD * ADAMW
    assert everything["peak_allocated_bytes"] > _run("head")["peak_allocated_bytes"]


def test_globs_name_modules_as_freeze_does():
    m = _run("head,transformer.resblocks.1.mlp")
    assert m["params_trainable"] == HEAD + (64 * 256 + 256) + (256 * 64 + 64)


def test_with_freeze_embed_both_apply():
    m = _run("last:1", optim="sgd-fe")
    assert m["params_trainable"] == BLOCK + TAIL + HEAD  # the embedding was frozen already


@pytest.mark.parametrize("train,words", [
    ("blocks.1*", "--train 'blocks.1*' matches no module or parameter of test-vit (did you mean "
                  "transformer.resblocks.1"),
    ("blocks.9*", "--train 'blocks.9*' matches no module or parameter of test-vit (top-level modules: conv1, "),
    ("last:3", "--train last:3: test-vit has 2 blocks; use --train last:2 or fewer"),
    ("last:0", "--train 'last:0': give the number of last blocks that train"),
])
def test_bad_values_are_one_line_errors(train, words):
    with pytest.raises(UsageError) as exc:
        memprof.predict("test-vit", "adamw", train=train)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_model_without_a_block_list_refuses_last_n_naming_the_glob_form():
    with pytest.raises(UsageError) as exc:
        memprof.predict("torchvision:resnet18", "sgd", train="last:1")
    assert "does not say where its residual blocks" in str(exc.value) and "--train 'fc'" in str(exc.value)


def test_keys_name_it_only_when_not_all():
    assert RunSpec("test-vit", "adamw", train="head").key.endswith("/titan-x/train-head")
    assert RunSpec("test-vit", "adamw", train="last:2").config.endswith("/fp32/train-last2")
    assert "train" not in RunSpec("test-vit", "adamw").key


def test_the_default_grid_keys_are_the_committed_ones_byte_for_byte(tmp_path):
    """The paper grid planned now (every new option at its default) gives exactly the keys of the committed paper
    grid (tests/data/paper_grid.jsonl), and the CI baseline's records (reports/baselines/ci.json, written before
    these options) keep their keys when read back."""
    from memprof.plan import plan_run, run_options

    root = pathlib.Path(__file__).parent.parent
    committed = [json.loads(line) for line in (root / "tests" / "data" / "paper_grid.jsonl").read_text().splitlines()]
    plan = plan_run(run_options(models="paper", optims="paper", state_bits="32,8", backend="simulate",
                                out=str(tmp_path / "o")))
    assert sorted(e.spec.key for e in plan.entries) == sorted(r["key"] for r in committed) and len(committed) == 24
    baseline = json.loads((root / "reports" / "baselines" / "ci.json").read_text())["benchmarks"]
    assert baseline and all(f"{RunSpec.from_dict(b['params']).key}@{b['backend']}" == b["name"] for b in baseline)
    changed = RunSpec.from_dict({**baseline[0]["params"], "grad_accum": 2, "train": "head"})
    assert f"{changed.key}@{baseline[0]['backend']}" != baseline[0]["name"]  # control: the check can fail


def test_advise_weighs_a_linear_probe_saying_what_trains():
    from memprof.planning.advise import candidates

    cands, _, _ = candidates(RunSpec("test-vit", "adamw"))
    (probe,) = [c for c in cands if c.label == "linear probe"]
    assert probe.spec.train == "head"
    assert f"only the head's {HEAD:,} parameters train instead of {PARAMS:,}" in probe.cost
    # negative control: a configuration that already trains the head alone is offered no probe
    cands, _, _ = candidates(RunSpec("test-vit", "adamw", train="head"))
    assert not any("linear probe" in c.label for c in cands)
