"""Each CUDA-vs-CPU correction against a hand-computed case, and each one's negative control."""

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.budget import PROFILES, parse_budget
from memprof.simulation.rules import (CublasWorkspace, EfficientAttentionBackward, HostLiterals, MemEfficientAttention,
                           TimmForeachChunks, cublas_workspace_bytes)
from memprof.simulation.events import ALLOC, FREE
from memprof.simulation.tracker import StorageTracker
from memprof.spec import RunSpec


def allocs(tracker, contains=""):
    return [ev for ev in tracker.events if ev[0] == ALLOC and contains in ev[4]]


def test_cublas_workspace_sizes():
    assert cublas_workspace_bytes(PROFILES["titan-x"]) == 8_519_680  # 4096 KiB x 2 + 16 KiB x 8
    assert cublas_workspace_bytes(PROFILES["a100-80g"]) == 8_519_680
    assert cublas_workspace_bytes(PROFILES["h100-80g"]) == 32 * 1024 * 1024
    assert cublas_workspace_bytes(PROFILES["rtx5090"]) == 32 * 1024 * 1024  # sm_120
    assert cublas_workspace_bytes(parse_budget("12GiB")) == 8_519_680  # unknown card: pre-Hopper default


@pytest.mark.parametrize("cc, nbytes", [("9.0", 32 << 20), ("10.0", 32 << 20), ("12.0", 32 << 20), ("12.1", 32 << 20),
                                        ("11.0", 8_519_680), ("8.9", 8_519_680), ("7.5", 8_519_680)])
def test_cublas_32mib_only_for_majors_9_10_12(cc, nbytes):
    """CublasHandlePool.cpp: use32mb = major == 9 || major == 10 || major == 12; a `cc >= 9.0` test would give
    sm_110 32 MiB (negative control: 11.0 stays at 4096 KiB x 2 + 16 KiB x 8)."""
    assert cublas_workspace_bytes(parse_budget(f"40GiB@{cc}")) == nbytes


def _linear_step(rules, with_matmul=True):
    with FakeTensorMode():
        layer = nn.Linear(8, 4) if with_matmul else nn.LayerNorm(8)
        x = torch.randn(3, 8)
        tracker = StorageTracker(rules)
        with tracker:
            tracker.set_phase("forward")
            out = layer(x).sum()
            tracker.set_phase("backward")
            out.backward()
    return tracker


def test_cublas_workspace_once_per_thread():
    tracker = _linear_step([CublasWorkspace(PROFILES["titan-x"], (2, 14))])
    ws = allocs(tracker, "cuBLAS")
    assert [(ev[2], ev[3]) for ev in ws] == [(8_519_680, "forward"), (8_519_680, "backward")]
    assert not any(ev[0] == FREE and ev[1] in {w[1] for w in ws} for ev in tracker.events)  # never freed


@pytest.mark.parametrize("version, lt", [((2, 11), [(1 << 20, "forward")]), ((2, 14), []), ((2, 8), [])])
def test_cublaslt_workspace_by_torch_version(version, lt):
    """torch 2.9-2.11 keep a separate 1 MiB cuBLASLt workspace for addmm (the forward's biased Linear)."""
    tracker = _linear_step([CublasWorkspace(PROFILES["h100-80g"], version)])
    assert [(ev[2], ev[3]) for ev in allocs(tracker, "cuBLASLt")] == lt
    assert [ev[2] for ev in allocs(tracker, "cuBLAS workspace")] == [32 << 20, 32 << 20]


def test_no_workspace_without_matmul():
    tracker = _linear_step([CublasWorkspace(PROFILES["titan-x"])], with_matmul=False)
    assert allocs(tracker, "cuBLAS workspace") == []


def _mha(batch, rules, backward=False):
    """nn.MultiheadAttention as open_clip calls it: batch_first, need_weights=False, training."""
    mode = next((r.mode() for r in rules if isinstance(r, MemEfficientAttention)), None)
    with FakeTensorMode():
        mha = nn.MultiheadAttention(64, 2, batch_first=True)
        x = torch.randn(batch, 10, 64, requires_grad=True)
        tracker = StorageTracker(rules)
        with tracker:
            if mode is not None:
                with mode:
                    out = mha(x, x, x, need_weights=False)[0]
            else:
                out = mha(x, x, x, need_weights=False)[0]
            if backward:
                tracker.set_phase("backward")
                out.sum().backward()
    return tracker


def test_efficient_attention_saves_padded_logsumexp():
    tracker = _mha(2, [MemEfficientAttention(), HostLiterals()])
    att = allocs(tracker, "_scaled_dot_product_efficient_attention")
    # output [B, L, H, K] = 2*10*2*32 fp32, logsumexp [B, H, ceil(L/32)*32] = 2*2*32 fp32; seed and offset
    # are host tensors on CUDA
    assert sorted(ev[2] for ev in att) == sorted([2 * 10 * 64 * 4, 2 * 2 * 32 * 4])


def test_attention_rng_state_counts_without_host_rule():
    """Negative control: without the host rule the two int64 RNG scalars would be device allocations."""
    tracker = _mha(2, [MemEfficientAttention()])
    att = allocs(tracker, "_scaled_dot_product_efficient_attention")
    assert sorted(ev[2] for ev in att) == sorted([8, 8, 2 * 10 * 64 * 4, 2 * 2 * 32 * 4])


def test_cpu_attention_differs_without_the_rule():
    """Negative control: the CPU flash kernel is what runs without the rule (logsumexp [B, L, H])."""
    tracker = _mha(2, [])
    assert allocs(tracker, "_scaled_dot_product_efficient_attention") == []
    cpu = allocs(tracker, "_scaled_dot_product_flash_attention_for_cpu")
    assert sorted(ev[2] for ev in cpu) == sorted([2 * 10 * 64 * 4, 2 * 10 * 2 * 4])


@pytest.mark.parametrize("batch, copies", [(1, 0), (2, 1)])
def test_reshape_after_efficient_attention_copies_only_when_batch_above_1(batch, copies):
    tracker = _mha(batch, [MemEfficientAttention()])
    ops = [ev[4] for ev in tracker.events if ev[0] == ALLOC]
    i = max(k for k, op in enumerate(ops) if "efficient_attention" in op)
    after = [op for op in ops[i + 1:] if "clone" in op or "_unsafe_view" in op or "copy" in op]
    assert len(after) == copies


@pytest.mark.parametrize("card, workspace", [("12GiB@6.1", None), ("titan-x", 2 * 2 * 4100 * 4),
                                             ("a100-80g", 2 * 2 * 4100 * 4)])
def test_efficient_backward_temporaries(card, workspace):
    rules = [MemEfficientAttention(), EfficientAttentionBackward(parse_budget(card))]
    tracker = _mha(2, rules, backward=True)
    sizes = {ev[4]: ev[2] for ev in allocs(tracker, "attention backward")}
    assert sizes["attention backward grad_out*out"] == 2 * 10 * 2 * 32 * 4  # [B, M, H, Kv] fp32
    assert sizes["attention backward (grad_out*out).sum(-1)"] == 2 * 10 * 2 * 4
    assert sizes["attention backward delta"] == 2 * 2 * 10 * 4  # [B, H, M] fp32
    # sm70+: B*H*align4(ceil(10/64)*ceil(32/64)*(4 + 64*64))*4; none before Volta
    assert sizes.get("attention backward workspace") == workspace
    freed = {ev[1] for ev in tracker.events if ev[0] == FREE}
    assert all(ev[1] in freed for ev in allocs(tracker, "attention backward"))


def test_no_backward_temporaries_without_backward():
    tracker = _mha(2, [MemEfficientAttention(), EfficientAttentionBackward(PROFILES["a100-80g"])])
    assert allocs(tracker, "attention backward") == []


def test_torch_picks_foreach_on_cuda():
    """The optimizer registry's foreach=True is what torch itself chooses for CUDA parameters."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensor
    from torch.optim import optimizer
    from torch.optim.optimizer import _default_to_fused_or_foreach

    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda_param = torch.empty(4, device="cuda")
        cpu_param = torch.empty(4, device="cpu")
    # torch also checks the tensor's type is a plain Tensor; let the fake stand in for one
    with mock.patch.object(optimizer, "_foreach_supported_types", [FakeTensor]):
        assert _default_to_fused_or_foreach([cuda_param], False, False) == (False, True)
        assert _default_to_fused_or_foreach([cpu_param], False, False) == (False, False)  # the CPU would not


def test_host_literals_are_not_counted():
    """AdamW's step counters are torch.tensor(0.0) literals: host memory on CUDA, absent from the trace."""
    from memprof.optims import REGISTRY, build_optimizer

    with FakeTensorMode():
        p = nn.Parameter(torch.randn(1000))
        tracker = StorageTracker()
        with tracker:
            tracker.register(p, "param")
            p.grad = torch.randn(1000)
            opt = build_optimizer(REGISTRY["adamw"], [p])
            tracker.set_phase("optimizer")
            opt.step()
        state_ids = {tracker.storage_id(t) for t in opt.state[p].values()}
    assert tracker.storage_id(opt.state[p]["step"]) is None
    # exp_avg and exp_avg_sq are counted; the step counter is not
    assert len(state_ids - {None}) == 2


@pytest.mark.parametrize("batch, copied", [(1, None), (2, 2 * 10 * 64 * 4)])
def test_attention_backward_copies_grad_out_only_when_its_transpose_is_strided(batch, copied):
    """CUDA copies `grad_out.transpose(1, 2)` ([B, M, H, K]) with .contiguous(): under nn.MultiheadAttention the
    incoming gradient is laid out [L, B, H, K], so the view is contiguous at batch 1 (no copy) and strided at
    batch 2 (a copy of B*L*E fp32 = 2*10*64*4 B)."""
    rules = [MemEfficientAttention(), EfficientAttentionBackward(PROFILES["a100-80g"])]
    sizes = {ev[4]: ev[2] for ev in allocs(_mha(batch, rules, backward=True), "attention backward")}
    assert sizes.get("attention backward grad_out.transpose(1, 2).contiguous()") == copied


def test_attention_backward_copy_negative_control():
    """Negative control: the [B, H, M, K] gradient itself is never contiguous here, so testing it (the old
    rule) would add a copy at batch 1 too."""
    seen = {}

    class Probe(EfficientAttentionBackward):
        def after_op(self, tracker, func, args, kwargs, out):
            if func is torch.ops.aten._scaled_dot_product_efficient_attention_backward.default:
                seen["grad_out"] = args[0].is_contiguous()
                seen["view"] = args[0].transpose(1, 2).is_contiguous()

    _mha(1, [MemEfficientAttention(), Probe(PROFILES["a100-80g"])], backward=True)
    assert seen == {"grad_out": False, "view": True}


def _lamb_step_peak(device, numels=(3_000_000,) * 3):
    """Live-byte peak of one timm LAMB (foreach) step over fake fp32 parameters, under the chunking rule."""
    from memprof.optims import REGISTRY, build_optimizer
    from memprof.simulation.events import ALLOC, FREE

    rule = TimmForeachChunks(device)
    with FakeTensorMode():
        params = [nn.Parameter(torch.randn(n)) for n in numels]
        for p in params:
            p.grad = torch.randn(p.numel())
        opt = build_optimizer(REGISTRY["lamb"], params)
        tracker = StorageTracker([rule])
        with tracker, rule.mode():
            tracker.set_phase("optimizer")
            opt.step()
    live = peak = 0
    sizes = {}
    for ev in tracker.events:
        if ev[0] == ALLOC:
            sizes[ev[1]] = ev[2]
            live += ev[2]
            peak = max(peak, live)
        elif ev[0] == FREE:
            live -= sizes.pop(ev[1], 0)
    return peak, rule


def test_timm_lamb_chunks_on_a_72mib_l2_card():
    """RTX 4090 (72 MiB L2): chunk = 72 MiB // (4 * 4 B) = 4,718,592 elements, so three 3M-element parameters
    form three chunks. LAMB's step keeps three full-size temporaries per chunk (grads / clip norm, sqrt of
    exp_avg_sq, updates), so the peak drops by 3 temporaries x 2 parameters x 3M x 4 B = 72,000,000 B (plus
    a few bytes of per-parameter norm scalars that chunking frees earlier)."""
    chunked, rule = _lamb_step_peak(PROFILES["rtx4090"])
    whole, _ = _lamb_step_peak(PROFILES["h100-80g"])  # 50 MiB L2: 3,276,800 < 2**22 elements, no chunking
    assert rule.metrics() == {"foreach_chunk_elements": {"4": 72 * 2**20 // 16}}
    assert 72_000_000 <= whole - chunked < 72_000_000 + 4096


def test_timm_lamb_chunk_override_restores_the_whole_update(monkeypatch):
    """Negative control: TIMM_FOREACH_CHUNK_SIZE=0 (timm's `_FOREACH_CHUNK_OVERRIDE`) turns chunking off, and
    the 72 MiB card's prediction rises back to the unchunked one."""
    from timm.optim import _helpers

    chunked, _ = _lamb_step_peak(PROFILES["rtx4090"])
    monkeypatch.setattr(_helpers, "_FOREACH_CHUNK_OVERRIDE", 0)
    overridden, rule = _lamb_step_peak(PROFILES["rtx4090"])
    whole, _ = _lamb_step_peak(PROFILES["h100-80g"])
    assert overridden == whole and overridden - chunked >= 72_000_000
    assert rule.metrics() == {"foreach_chunk_elements": {"4": None}}


def test_timm_chunking_never_on_unknown_card():
    """A bare size has no L2 figure: timm's CPU answer (one chunk) stands."""
    _, rule = _lamb_step_peak(parse_budget("24GiB"))
    assert rule.metrics() == {"foreach_chunk_elements": {"4": None}}


def _twice_used_step(rules):
    """y = lin(lin(x)) + x on fake tensors: lin's weight and bias and x each receive two gradients."""
    with FakeTensorMode():
        lin = nn.Linear(4, 4)
        x = torch.randn(2, 4, requires_grad=True)
        tracker = StorageTracker(rules)
        with tracker:
            for t in (lin.weight, lin.bias, x):
                tracker.register(t, "param")
            tracker.set_phase("forward")
            y = lin(lin(x)) + x
            tracker.set_phase("backward")
            y.sum().backward()
    return tracker


def test_gradient_accumulation_is_out_of_place_under_the_tracer():
    """Negative control: under a dispatch mode autograd sums twice-received gradients with aten.add.Tensor,
    a new storage each: the weight's 4x4 (64 B), the bias's 4 (16 B) and x's 2x4 (32 B)."""
    tracker = _twice_used_step([])
    assert sorted(ev[2] for ev in allocs(tracker, "aten.add.Tensor") if ev[3] == "backward") == [16, 32, 64]


def test_in_place_accumulation_folds_the_dense_sums():
    """On CUDA the weight's (64 B) and bias's (16 B) sums are in place: their old gradients are dense mm / sum
    results held only by autograd. x's first gradient is the broadcast (expanded, not dense) ones of
    `sum`'s backward, which CUDA cannot add into either, so its 32 B sum stays. The rewritten stream loses
    those two allocations and the two old gradients' releases, and stays well formed."""
    from memprof.simulation.rules import InPlaceGradAccumulation

    rule = InPlaceGradAccumulation()
    tracker = _twice_used_step([rule])
    events = rule.rewrite(tracker.events)
    assert rule.folded == 2
    added = {ev[1]: ev[2] for ev in allocs(tracker, "aten.add.Tensor") if ev[3] == "backward"}
    kept = [added[ev[1]] for ev in events if ev[0] == ALLOC and ev[1] in added]
    assert kept == [32]
    assert sum(ev[0] == FREE for ev in tracker.events) - sum(ev[0] == FREE for ev in events) == 2
    freed, live = set(), set()
    for ev in events:  # every allocation is released at most once, and only after it was made
        if ev[0] == ALLOC:
            live.add(ev[1])
        elif ev[0] == FREE:
            assert ev[1] in live and ev[1] not in freed
            freed.add(ev[1])


def _predicted(spec):
    from memprof.simulation import shared
    from memprof.simulation.simulate import predict

    shared.clear()
    status, metrics = predict(spec)
    return status, {k: v for k, v in metrics.items() if not k.startswith(("trace_seconds", "elapsed"))}


ACTS_ON_SPECS = [RunSpec("test-vit", "adamw", precision="bf16-amp", optim_impl="fused", budget="a100-80g"),
                 RunSpec("test-vit", "sgd", budget="titan-x")]


@pytest.mark.parametrize("spec", ACTS_ON_SPECS, ids=lambda s: f"{s.precision}-{s.budget}")
def test_acts_on_skips_only_calls_that_do_nothing(spec, monkeypatch):
    """The tracker calls a rule's after_op only for its `acts_on` ops: the prediction equals one with every rule
    called for every op."""
    from memprof.simulation import rules

    filtered = _predicted(spec)
    for cls in rules.RULES.values():
        monkeypatch.setattr(cls, "acts_on", None)
    assert _predicted(spec) == filtered


def test_a_rule_left_without_its_ops_changes_the_prediction(monkeypatch):
    """Negative control: the cuBLAS workspace rule acting on no op drops its workspaces."""
    from memprof.simulation import rules

    spec = ACTS_ON_SPECS[1]
    full = _predicted(spec)
    monkeypatch.setattr(rules.CublasWorkspace, "acts_on", frozenset())
    assert _predicted(spec) != full
