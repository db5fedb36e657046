"""--clear-grads: when a step's zero_grad(set_to_none=True) runs. before-backward (torchvision's reference script,
Lightning's automatic optimization) keeps the last step's gradients alive through the next forward: the forward's
peak grows by exactly the gradients' allocations, the backward and optimizer phases are unchanged."""

import pytest

import memprof
from memprof.errors import UsageError


def _phases(**kw):
    r = memprof.predict("test-vit", "adamw", batch_size=4, **kw)
    return r.record["metrics"]["phase_peak_allocated_bytes"], r.record["metrics"]


def test_clearing_before_backward_adds_the_gradients_to_the_forward_and_nothing_else():
    after, m = _phases()
    before, _ = _phases(clear_grads="before-backward")
    assert before["forward"] - after["forward"] == m["breakdown_at_peak_bytes"]["gradients"] > 0
    assert before["backward"] == after["backward"] and before["optimizer"] == after["optimizer"]


def test_negative_control_the_default_is_after_the_step():
    default, _ = _phases()
    explicit, _ = _phases(clear_grads="after-step")
    assert default == explicit


def test_the_key_names_it_only_when_not_the_default():
    r = memprof.predict("test-vit", "adamw", clear_grads="before-backward")
    assert "/fp32+clear-before-backward/" in r.key and "clear" not in memprof.predict("test-vit", "adamw").key


def test_with_optimizer_in_backward_there_is_no_gradient_to_keep():
    with pytest.raises(UsageError, match="no gradient|none to keep"):
        memprof.predict("test-vit", "adamw", clear_grads="before-backward", optim_in_backward=True)


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_advise_points_out_that_clearing_after_the_step_is_cheaper(tmp_path):
    from memprof.cli import main

    assert main(["advise", "--models", "test-vit", "--optims", "adamw", "--batch-size", "4", "--clear-grads",
                 "before-backward", "--budget", "1GiB", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    text = (tmp_path / "a" / "advise.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| clear gradients after the step "))
    assert "none: zero_grad" in row
