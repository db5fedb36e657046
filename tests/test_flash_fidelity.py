"""Flash attention as torch 2.14's CUDA kernels allocate it (memprof.simulation.rules): its RNG state on the
device, and the backward's contiguous copies of a strided incoming gradient. Hand-computed on the test model
(2 blocks, width 64, 4 heads of 16: a100-80g runs flash for bf16), each with a negative control."""


from memprof.simulation import rules
from memprof.simulation.simulate import prediction
from memprof.spec import RunSpec

ALLOC, FREE = 0, 1
LAYERS = 2


def _flash(spec):
    from memprof.simulation.memo import Memo

    p = prediction(spec, memo=Memo())  # traced afresh: nothing from an earlier test's forward
    assert p.metrics.get("attention_kernels", {}).get("flash") == LAYERS * spec.steps, p.metrics.get("attention_kernels")
    return p


def test_the_rng_state_is_two_device_blocks_per_attention_call():
    spec = RunSpec("test-vit", "adamw", precision="bf16-amp", budget="a100-80g", batch_size=4)
    p = _flash(spec)
    small = [e for e in p.trace.events if e[0] == ALLOC and "flash" in str(e[4]) and e[2] in (8, 16)]
    assert sorted(e[2] for e in small) == sorted([8, 16] * LAYERS * spec.steps)  # rng_state and _unused, each call
    freed = {e[1] for e in p.trace.events if e[0] == FREE}
    assert all(e[1] in freed for e in small)  # saved for the backward, released there


def test_negative_control_the_older_layout_keeps_the_state_on_the_host(monkeypatch):
    spec = RunSpec("test-vit", "adamw", precision="bf16-amp", budget="a100-80g", batch_size=4)
    monkeypatch.setattr(rules, "rng_state_on_device", lambda seed: False)
    p = _flash(spec)
    assert not [e for e in p.trace.events if e[0] == ALLOC and "flash" in str(e[4]) and e[2] in (8, 16)]


def test_the_math_path_has_no_flash_state():
    p = prediction(RunSpec("test-vit", "adamw", precision="bf16-amp", budget="titan-x", batch_size=4))
    assert "flash" not in p.metrics.get("attention_kernels", {})
    assert not [e for e in p.trace.events if e[0] == ALLOC and "flash" in str(e[4])]


def test_the_backward_copies_a_strided_gradient_and_output():
    """At batch 4 nn.MultiheadAttention's q, k, v are views of an [L, B, E] tensor, so the flash output and its
    incoming gradient, transposed to [B, L, H, D], are strided: each backward call copies both, 4 x 17 x 64 x 2 B
    (17 tokens: 16 patches and the class token; bf16), and frees them when it returns."""
    p = _flash(RunSpec("test-vit", "adamw", precision="bf16-amp", budget="a100-80g", batch_size=4))
    copies = [e for e in p.trace.events if e[0] == ALLOC and "flash backward contiguous" in str(e[4])]
    assert sorted((e[4], e[2]) for e in copies) == sorted(
        [("flash backward contiguous grad_out", 4 * 17 * 64 * 2), ("flash backward contiguous out", 4 * 17 * 64 * 2)]
        * LAYERS * 2)
    freed = {e[1] for e in p.trace.events if e[0] == FREE}
    assert all(e[1] in freed for e in copies)


def test_negative_control_at_batch_1_nothing_is_strided():
    p = _flash(RunSpec("test-vit", "adamw", precision="bf16-amp", budget="a100-80g", batch_size=1))
    assert not [e for e in p.trace.events if e[0] == ALLOC and "flash backward contiguous" in str(e[4])]


def test_the_contiguity_check_reads_strides_as_c10_does():
    import torch

    x = torch.empty(17, 4, 4, 16)  # [L, B, H, D] as nn.MultiheadAttention lays out q
    q = x.permute(1, 2, 0, 3)  # [B, H, L, D]
    assert not rules._transposed_contiguous(q) and not q.transpose(1, 2).is_contiguous()
    single = torch.empty(17, 1, 4, 16).permute(1, 2, 0, 3)  # batch 1: the batch stride imposes nothing
    assert rules._transposed_contiguous(single) == single.transpose(1, 2).is_contiguous() is True
    dense = torch.empty(4, 17, 4, 16).transpose(1, 2)
    assert rules._transposed_contiguous(dense) == dense.transpose(1, 2).is_contiguous() is True
