"""--grad-accum N: each optimizer step is N micro-steps (forward + backward of the micro-batch) with the gradients
alive and summed between them, then the optimizer step and the clear. Checked by hand-computed bytes on test-vit
(open_clip VisionTransformer: width 64, 2 blocks, 32-wide output, a 10-class head)."""

import functools

import pytest

import memprof
from memprof import harness
from memprof.errors import UsageError
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

# test-vit's parameters by hand (width w=64, 2 blocks, mlp 4w, 32-wide projection, 10 classes, 8x8 patches of 32 px)
W, PATCH, TOKENS = 64, 8, (32 // 8) ** 2 + 1
EMBED = 3 * PATCH * PATCH * W + W + TOKENS * W + 2 * W  # conv1 (no bias), class token, positions, ln_pre
BLOCK = 2 * W + (3 * W * W + 3 * W) + (W * W + W) + 2 * W + (W * 4 * W + 4 * W) + (4 * W * W + W)
TAIL = 2 * W + W * 32  # ln_post, proj
HEAD = 32 * 10 + 10
PARAMS = EMBED + 2 * BLOCK + TAIL + HEAD
GRAD_BYTES = 4 * PARAMS  # fp32, every parameter trains


def _run(**kw):
    status, m = predict(RunSpec("test-vit", "adamw", batch_size=4, **kw))
    assert status == "ok"
    return m


def test_the_hand_count_is_the_models():
    assert _run()["params_trainable"] == PARAMS == 116042


def test_the_second_micro_steps_forward_runs_with_every_gradient_alive():
    one, two = _run(), _run(grad_accum=2)
    fwd1, fwd2 = one["phase_peak_allocated_bytes"]["forward"], two["phase_peak_allocated_bytes"]["forward"]
    assert fwd2 >= fwd1 + GRAD_BYTES  # micro-step 2's forward holds micro-step 1's gradients
    assert fwd2 - fwd1 < GRAD_BYTES + 512 * 64  # ... and nothing else (allocator rounding: 512 B per tensor)
    assert two["optimizer_state_bytes"] == one["optimizer_state_bytes"] == 2 * GRAD_BYTES  # AdamW: exp_avg, exp_avg_sq
    assert two["breakdown_at_peak_bytes"]["gradients"] >= GRAD_BYTES  # the kept gradients are named gradients
    assert "/fp32+accum2/" in RunSpec("test-vit", "adamw", grad_accum=2).key


def test_negative_control_a_harness_that_clears_between_micro_steps_fails_the_check(monkeypatch):
    fwd1 = _run()["phase_peak_allocated_bytes"]["forward"]
    original = harness.classification_step

    @functools.wraps(original)
    def clearing(model, optimizer, inputs, *args, micro=0, micro_steps=1, **kw):
        loss = original(model, optimizer, inputs, *args, micro=micro, micro_steps=micro_steps, **kw)
        if micro < micro_steps - 1:
            optimizer.zero_grad(set_to_none=True)  # a broken accumulation: the gradients die between micro-steps
        return loss

    monkeypatch.setattr(harness, "classification_step", clearing)
    cleared = _run(grad_accum=2)["phase_peak_allocated_bytes"]["forward"]
    assert not cleared >= fwd1 + GRAD_BYTES


def test_every_micro_step_is_a_forward_and_a_backward_of_its_optimizer_step():
    """On the CPU with real tensors and torch's SGD: the phases the harness marks, with their step numbers."""
    import torch

    seen = []
    spec = RunSpec("test-vit", "sgd", grad_accum=3)
    model = harness.prepare(spec).model
    harness.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), spec, "cpu",
                        lambda phase, step: seen.append((str(phase), step)))
    step = [("forward", None), ("backward", None)] * 3 + [("optimizer", None)]
    assert [p for p, _ in seen] == [p for p, _ in step] * 2 + ["done"]
    assert [s for _, s in seen] == [0] * 7 + [1] * 7 + [2]  # micro-steps carry their optimizer step's number


def test_ddp_reduces_only_on_the_last_micro_step():
    """rank 0 of 2: the first micro-step runs under no_sync(), so no gradient is copied into DDP's buckets."""
    m = _run(parallel="ddp", world_size=2, grad_accum=2)
    # per backward, "step.micro-step": 2 steps x 2 micro-steps
    assert m["ddp_bucket_copy_bytes"] == {"0.0": 0, "0.1": GRAD_BYTES, "1.0": 0, "1.1": GRAD_BYTES}
    assert m["ddp_bucket_bytes"] == GRAD_BYTES  # the buckets themselves as without accumulation


def test_negative_control_ddp_without_no_sync_reduces_every_micro_step(monkeypatch):
    import contextlib

    from memprof.simulation import distributed

    monkeypatch.setattr(distributed.DDPBuckets, "mode", lambda self: contextlib.nullcontext())
    m = _run(parallel="ddp", world_size=2, grad_accum=2)
    assert list(m["ddp_bucket_copy_bytes"].values()) == [GRAD_BYTES] * 4


def test_optimizer_in_backward_leaves_nothing_to_accumulate():
    with pytest.raises(UsageError, match="--grad-accum 2 with --optim-in-backward on.*use --optim-in-backward off"):
        memprof.predict("test-vit", "adamw", grad_accum=2, optim_in_backward=True)


def test_default_keys_do_not_change():
    assert RunSpec("test-vit", "adamw").key == RunSpec("test-vit", "adamw", grad_accum=1).key
    assert "accum" not in RunSpec("test-vit", "adamw").key


def test_advise_accumulates_instead_of_halving_and_says_the_effective_batch():
    from memprof.planning.advise import candidates

    cands, _, _ = candidates(RunSpec("test-vit", "adamw", batch_size=6, grad_accum=2))
    acc = next(c for c in cands if c.changes and "accumulation" in c.label)
    assert (acc.spec.batch_size, acc.spec.grad_accum) == (3, 4)  # 6 x 2 = 3 x 4: the same 12 samples per step
    assert acc.label == "micro-batch 3 x 4 gradient accumulation" and "3 x 4 accumulation = 12 samples" in acc.cost
    in_backward, _, not_applicable = candidates(RunSpec("test-vit", "adamw", batch_size=4, optim_in_backward=True))
    assert not any("accumulation" in c.label for c in in_backward)  # control: nothing accumulates in backward
