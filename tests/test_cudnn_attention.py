"""cuDNN attention where torch prefers it (sm90/sm100 with cuDNN newer than 9.15: memprof.simulation.rules), what it
allocates, and that the GPU check measures and predicts with the same kernels. Hand-computed, each with a negative
control."""

import torch
import torch.nn.functional as F
import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.budget import parse_budget
from memprof.simulation.events import ALLOC
from memprof.simulation.memo import Memo
from memprof.simulation.rules import CudnnAttentionWorkspace, HalfPrecisionAttention, cudnn_eligible, cudnn_preferred
from memprof.simulation.simulate import prediction
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec

BF16 = torch.bfloat16


@pytest.mark.parametrize("cc, version, torch_version, preferred", [
    ((9, 0), 92400, "2.14.1", True), ((9, 0), 91900, "2.11.0", True), ((10, 0), 91501, "2.14.1", True),
    ((9, 0), 91500, "2.14.1", False),  # 9.15.0 itself does not qualify (> 91500)
    ((8, 0), 92400, "2.14.1", False), ((12, 0), 92400, "2.14.1", False), ((9, 0), None, "2.14.1", False),
    ((9, 4), 92400, "2.14.1", True), ((9, 4), 91900, "2.11.0", False),  # 2.11 also asks for minor 0 or 3
])
def test_cudnn_is_preferred_on_hopper_and_blackwell_with_a_new_cudnn(cc, version, torch_version, preferred):
    assert cudnn_preferred(cc, version, torch_version) is preferred


def test_the_deprioritizing_variable_and_the_eligibility_checks(monkeypatch):
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert not cudnn_preferred((9, 0), 92400, "2.14.1")
    assert cudnn_eligible(80, 257, 0.0) and cudnn_eligible(64, 197, 0.125)
    assert not cudnn_eligible(84, 257, 0.0) and not cudnn_eligible(136, 257, 0.0)  # multiple of 8, at most 128
    assert not cudnn_eligible(64, 1, 0.0) and not cudnn_eligible(64, 197, 0.1)  # s_kv 1; dropout not k/16
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        assert not cudnn_eligible(64, 197, 0.0)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def _attend(grad_layout: str, requires_grad: bool = True):
    """B=2, H=4, L=50, K=16 bf16 on an H100 (cuDNN 9.24 given): out 2*4*50*16*2 = 12800 B, fp32 logsumexp [2,4,50,1]
    = 1600 B, philox seed and offset 8 B each; backward dq, dk, dv 12800 B each and the workspace's frontend part
    4*2*4*50*(16+1) = 27200 B (fp32 dQ_accum + softmax_sum), plus a 12800 B copy of an incoming gradient whose
    last stride is not 1."""
    rule = HalfPrecisionAttention(parse_budget("h100-80g"), cudnn_version=92400)
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 50, 4, 16, dtype=BF16, requires_grad=requires_grad).transpose(1, 2)
                   for _ in range(3))
        with rule.mode(), StorageTracker([rule, CudnnAttentionWorkspace()]) as t:
            out = F.scaled_dot_product_attention(q, k, v)
            if requires_grad:
                grad = torch.empty(out.shape, dtype=BF16) if grad_layout == "dense" else \
                    torch.empty((), dtype=BF16).expand(out.shape)
                t.set_phase("backward")
                torch.autograd.grad(out, (q, k, v), grad)
    return rule, [(ev.nbytes, ev.op) for ev in t.events if ev.kind is ALLOC and ev.op.startswith(("aten._scaled", "cudnn"))]


def test_cudnn_attention_allocates_what_its_kernels_do():
    rule, allocs = _attend("dense")
    fwd, bwd = "aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_cudnn_attention_backward.default"
    assert allocs == [(12800, fwd), (1600, fwd), (8, fwd), (8, fwd), (12800, bwd), (12800, bwd), (12800, bwd),
                      (27200, "cudnn backward workspace (dQ_accum, softmax_sum)")]
    assert rule.kernels == {"cudnn": 1}


def test_negative_controls_a_strided_gradient_is_copied_and_no_gradient_keeps_no_logsumexp():
    _, allocs = _attend("expanded")
    assert (12800, "cudnn backward contiguous grad_out") in allocs
    _, allocs = _attend("dense", requires_grad=False)
    assert [n for n, _ in allocs] == [12800, 8, 8]  # compute_log_sumexp is off: the kernel makes none


def _predict():
    return prediction(RunSpec("test-vit", "adamw", precision="bf16-amp", budget="h100-80g", batch_size=4), memo=Memo())


@pytest.mark.skipif(not cudnn_preferred((9, 0), torch.backends.cudnn.version()), reason="this torch has no cuDNN > 9.15")
def test_a_prediction_on_an_h100_runs_cudnn_and_bands_its_plan_workspaces():
    """test-vit (2 layers, 2 heads of 32, 17 tokens) at batch 4, 2 steps: 4 cuDNN calls, each backward's workspace
    4*4*2*17*(32+1) = 17952 B; the plan workspaces' estimate (1 MiB) is in `unmodelled` and, as a 2 MiB segment, in
    the upper band. Negative control: with cuDNN attention switched off the same card runs flash."""
    p = _predict()
    assert p.metrics["attention_kernels"] == {"cudnn": 4}
    workspaces = [e.nbytes for e in p.trace.events if e.kind is ALLOC and e.op.startswith("cudnn backward workspace")]
    assert workspaces == [17952] * 4
    estimate = [u for u in p.metrics["unmodelled"] if u["what"].startswith("cuDNN attention plan workspaces")]
    assert [u["bound_bytes"] for u in estimate] == [1 << 20]
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        off = _predict()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert off.metrics["attention_kernels"] == {"flash": 4}
    assert not [u for u in off.metrics["unmodelled"] if u["what"].startswith("cuDNN attention")]
    band = {k: q.metrics["peak_reserved_bytes_upper"] - q.metrics["peak_reserved_bytes"] for k, q in (("on", p), ("off", off))}
    assert band["on"] - band["off"] == 2 << 20  # 1 MiB is a small request: a 2 MiB segment at worst


def test_the_simulate_backend_reads_the_same_kernel_switch_as_the_cuda_backend(monkeypatch):
    """MEMPROF_CUDA_SDPA_DISABLE=cudnn: predicted with flash, and the record says which kernels were on; set empty,
    every kernel is on again and the record names none (negative control)."""
    from memprof.backends.simulate import SimulateBackend

    spec = RunSpec("test-vit", "adamw", precision="bf16-amp", budget="h100-80g", batch_size=4)
    try:
        monkeypatch.setenv("MEMPROF_CUDA_SDPA_DISABLE", "cudnn")
        off = SimulateBackend().run(spec)
        monkeypatch.setenv("MEMPROF_CUDA_SDPA_DISABLE", "")
        on = SimulateBackend().run(spec)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert off.metrics["sdpa_kernels_enabled"]["cudnn"] is False and "cudnn" not in off.metrics["attention_kernels"]
    assert "sdpa_kernels_enabled" not in on.metrics
    if cudnn_preferred((9, 0), torch.backends.cudnn.version()):
        assert on.metrics["attention_kernels"] == {"cudnn": 4}


def test_a_torch_without_cudnn_predicts_flash_on_hopper_and_says_so(monkeypatch):
    """A CPU-only torch wheel has no cuDNN version: flash is predicted on an H100 with a note that the card would run
    cuDNN attention; negative control: with a known cuDNN (or on an A100) there is no note."""
    from memprof.simulation.rules import CUDNN_UNKNOWN_NOTE

    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)
    p = _predict()
    assert p.metrics["attention_kernels"] == {"flash": 4} and CUDNN_UNKNOWN_NOTE in p.metrics["notes"]
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92400)
    assert "notes" not in _predict().metrics
