"""The rule `cuda-device-branches` (memprof.simulation.branches): each CUDA branch against hand-computed bytes,
with its negative control (the same op without the rule: the CPU's branch), and a ViT-L/16 with dropout 0.1
against the same network with its dropout written out as the fused op (a 1-byte mask)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.simulation.events import ALLOC
from memprof.simulation.rules import RULES, CudaDeviceBranches, cuda_rules
from memprof.simulation.tracker import StorageTracker
from memprof.budget import PROFILES

MiB = 1 << 20


def _run(fn, with_rule: bool):
    """(bytes alive when fn's output is held, the requests fn made, the rule) on fake CPU tensors."""
    rule = CudaDeviceBranches()
    with FakeTensorMode():
        tracker = StorageTracker([rule] if with_rule else [])
        with tracker, (rule.mode() if with_rule else _null()):
            before = tracker.live_bytes
            out = fn()
            alive = tracker.live_bytes - before
            requests = [(ev.op, ev.nbytes) for ev in tracker.events if ev.kind is ALLOC]
            del out
    return alive, requests, rule


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dropout_1024():
    x = torch.randn(1024, 1024, requires_grad=True)
    return x, F.dropout(x, 0.1, training=True)


def test_dropout_keeps_a_one_byte_mask():
    """1024 x 1024 fp32, p=0.1, training: CUDA's native_dropout returns the output (4 MiB) and a bool mask (1 MiB)
    that NativeDropoutBackward0 keeps: 5 MiB beyond the input."""
    alive, requests, rule = _run(lambda: _dropout_1024()[1], with_rule=True)
    # the input (4 MiB) dies with the lambda's frame only after the output is returned: count the dropout's own
    assert [r for r in requests if "dropout" in r[0]] == [("aten.native_dropout.default", 4 * MiB),
                                                           ("aten.native_dropout.default", 1 * MiB)]
    assert rule.metrics() == {"cuda_branches": {"dropout": 1}}


def test_dropout_without_the_rule_keeps_a_mask_of_the_input_dtype():
    """Negative control: the CPU's composite (empty_like, bernoulli_, div_, mul) keeps an fp32 mask: 8 MiB."""
    _, requests, _ = _run(lambda: _dropout_1024()[1], with_rule=False)
    made = [r for r in requests if r[0] != "aten.randn.default"]
    assert made == [("aten.empty_like.default", 4 * MiB), ("aten.mul.Tensor", 4 * MiB)]


@pytest.mark.parametrize("call", [lambda x: F.dropout(x, 0.0), lambda x: F.dropout(x, 0.1, training=False),
                                  lambda x: F.dropout(x, 1.0)])
def test_dropout_outside_the_fused_branch_stays_the_composite(call):
    """p = 0, eval or p = 1: is_fused_kernel_acceptable is false on CUDA too; the composite runs (no branch counted)."""
    _, _, rule = _run(lambda: call(torch.randn(64, 64, requires_grad=True)), with_rule=True)
    assert rule.metrics() == {}


def test_dropout_backward_frees_the_mask_and_allocates_one_gradient():
    rule = CudaDeviceBranches()
    with FakeTensorMode():
        x = torch.randn(1024, 1024, requires_grad=True)
        tracker = StorageTracker([rule])
        with tracker, rule.mode():
            F.dropout(x, 0.1).sum().backward()
        grads = [ev.nbytes for ev in tracker.events if ev.kind is ALLOC and "dropout_backward" in ev.op]
    assert grads == [4 * MiB]  # native_dropout_backward: grad * mask * scale, one tensor of the gradient's size


def test_in_place_and_feature_dropout_are_alike_on_both_devices():
    """dropout_ and dropout2d never take the fused kernel (Dropout.cpp: only `dropout` asks is_fused_kernel_acceptable):
    the same requests with and without the rule."""
    def calls():
        x = torch.randn(8, 16, 32, 32, requires_grad=True) * 1
        return F.dropout(x, 0.1, inplace=True), F.dropout2d(x, 0.1)

    assert _run(calls, True)[1] == _run(calls, False)[1]


def test_rms_norm_runs_the_fused_kernel():
    """bf16 [8, 197, 768], weight bf16: the fused kernel returns the output (bf16) and rstd [8, 197, 1] fp32 and its
    node saves input, rstd, weight; the CPU's composite makes an fp32 copy of the input, x^2, x*rstd, *weight and a
    bf16 cast (negative control)."""
    n = 8 * 197 * 768

    def call():
        x = torch.randn(8, 197, 768, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(768, dtype=torch.bfloat16, requires_grad=True)
        return F.rms_norm(x, (768,), w)

    _, fused, rule = _run(call, True)
    made = [r for r in fused if r[0] not in ("aten.randn.default", "aten.ones.default")]
    assert made == [("aten._fused_rms_norm.default", 2 * n), ("aten._fused_rms_norm.default", 8 * 197 * 4)]
    assert rule.metrics() == {"cuda_branches": {"rms_norm": 1}}
    _, composite, _ = _run(call, False)
    assert sum(b for op, b in composite if op.startswith("aten._to_copy")) >= 4 * n + 2 * n


def test_rms_norm_backward_through_the_fused_node():
    rule = CudaDeviceBranches()
    with FakeTensorMode():
        x = torch.randn(4, 16, requires_grad=True)
        w = torch.ones(16, requires_grad=True)
        with StorageTracker([rule]) as tracker, rule.mode():
            y = F.rms_norm(x, (16,), w)
            assert y.grad_fn.name() == "FusedRmsNormBackward0"
            y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
        assert any("_fused_rms_norm_backward" in ev.op for ev in tracker.events if ev.kind is ALLOC)


def test_fp16_softmax_to_float_makes_no_fp32_copy():
    """[64, 1024] fp16 with dtype=float32: CUDA runs _softmax(half_to_float) -> one fp32 output (256 KiB); the CPU
    first copies the input to fp32 (256 KiB more; negative control). bf16 takes the copy on CUDA too."""
    def call(dtype):
        return lambda: torch.softmax(torch.randn(64, 1024, dtype=dtype, requires_grad=True), -1, dtype=torch.float32)

    _, fused, _ = _run(call(torch.float16), True)
    assert [r for r in fused if r[0] != "aten.randn.default"] == [("aten._softmax.default", 256 * 1024)]
    _, copied, _ = _run(call(torch.float16), False)
    assert [r for r in copied if r[0] != "aten.randn.default"] == [("aten._to_copy.default", 256 * 1024),
                                                                    ("aten._softmax.default", 256 * 1024)]
    assert _run(call(torch.bfloat16), True)[1] == _run(call(torch.bfloat16), False)[1]


def test_one_hot_is_zeros_and_scatter():
    """CUDA: zeros int64 [4096, 1000] (32,768,000 B) and an in-place scatter_; the fake-tensor variant (negative
    control) adds a bool [4096, 1000] (4,096,000 B)."""
    call = lambda: F.one_hot(torch.zeros(4096, dtype=torch.long), 1000)  # noqa: E731
    _, cuda, rule = _run(call, True)
    assert [r for r in cuda if r[0] != "aten.zeros.default" or r[1] > 4096 * 8] == [("aten.zeros.default", 32_768_000)]
    _, cpu, _ = _run(call, False)
    assert ("aten.eq.Tensor", 4_096_000) in cpu


def test_log_sigmoid_keeps_no_buffer_on_cuda():
    """log_sigmoid_forward: the CPU keeps a buffer the input's size for the backward; CUDA returns an empty one."""
    call = lambda: F.logsigmoid(torch.randn(256, 1024, requires_grad=True) * 1)  # noqa: E731
    _, cuda, _ = _run(call, True)
    _, cpu, _ = _run(call, False)
    assert [b for op, b in cuda if "log_sigmoid" in op] == [1 * MiB]
    assert [b for op, b in cpu if "log_sigmoid" in op] == [1 * MiB, 1 * MiB]


def test_batch_norm_keeps_fp32_statistics_for_half_inputs():
    """bf16 [8, 64, 32, 32]: CUDA keeps save_mean / save_invstd in fp32 (64 x 4 B each); the CPU in bf16."""
    def call():
        bn = nn.BatchNorm2d(64)
        return bn(torch.randn(8, 64, 32, 32, dtype=torch.bfloat16, requires_grad=True))

    stats = lambda reqs: [b for op, b in reqs if op == "aten.native_batch_norm.default"][1:]  # noqa: E731
    assert stats(_run(call, True)[1]) == [256, 256]
    assert stats(_run(call, False)[1]) == [128, 128]


def test_the_rule_is_in_every_run_and_registered():
    assert "cuda-device-branches" in RULES
    for precision in ("fp32", "bf16-amp", "bf16"):
        from memprof.spec import RunSpec
        spec = RunSpec(model="vit-b-16", optim="adamw", precision=precision)
        assert any(isinstance(r, CudaDeviceBranches) for r in cuda_rules(PROFILES["h100-80g"], spec))


def test_real_cpu_tensors_keep_the_cpu_branch():
    """A script's real CPU tensors (outside the simulated device) run the CPU's own composite while the rule is on."""
    rule = CudaDeviceBranches()
    with rule.mode():
        y = F.dropout(torch.randn(8, 8, requires_grad=True), 0.5)
    assert y.grad_fn.name() == "MulBackward0" and rule.metrics() == {}


# --- a whole network --------------------------------------------------------------------------------------------

def _vit_l16(written_out: bool):
    """torchvision's vit_l_16 with dropout 0.1; `written_out`: each nn.Dropout replaced by the fused op called
    directly (the reference: a 1-byte mask whatever the rule does)."""
    def build():
        import torchvision

        net = torchvision.models.vit_l_16(weights=None, dropout=0.1, num_classes=10)
        if written_out:
            class Fused(nn.Module):
                def __init__(self, p):
                    super().__init__()
                    self.p = p

                def forward(self, x):
                    return torch.ops.aten.native_dropout(x, self.p, self.training)[0]

            for name, module in list(net.named_modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, nn.Dropout) and child.p > 0:
                        setattr(module, child_name, Fused(child.p))
        return net
    return build


@pytest.mark.slow
def test_vit_l16_with_dropout_lands_on_the_written_out_reference(monkeypatch):
    """ViT-L/16, dropout 0.1, fp32, AdamW, batch 8 on an H100 (predicted): F.dropout under the rule within 1% of
    the same network with its dropout written out as native_dropout (1-byte mask); without the rule (the CPU's
    branch, an fp32 mask) well above it."""
    import memprof
    from memprof.simulation import rules as rules_module

    kw = dict(optimizer="adamw", batch_size=8, budget="h100-80g", input_shape="3x224x224")
    reference = memprof.predict(_vit_l16(True), **kw).peak_allocated_bytes
    ruled = memprof.predict(_vit_l16(False), **kw).peak_allocated_bytes
    assert abs(ruled - reference) / reference < 0.01
    original = rules_module.cuda_rules
    monkeypatch.setattr(rules_module, "cuda_rules", lambda device, spec=None: [
        r for r in original(device, spec) if not isinstance(r, CudaDeviceBranches)])
    import memprof.simulation.simulate as simulate_module
    monkeypatch.setattr(simulate_module, "cuda_rules", rules_module.cuda_rules)
    from memprof.simulation.memo import MEMO
    MEMO.clear()
    without = memprof.predict(_vit_l16(False), **kw).peak_allocated_bytes
    MEMO.clear()
    assert without > reference * 1.03
