"""Precision, optimizer implementation and optimizer-in-backward: the rules that model them (hand-computed
cases with negative controls), the axes from the command line to the record, CPU equality, accuracy
verdicts, and the paper-size orderings (slow)."""

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof import accuracy
from memprof.budget import parse_budget
from memprof.errors import UsageError
from memprof.optims import REGISTRY as OPTIMS, build_optimizer
from memprof.plan import plan_run, run_options
from memprof.simulation.rules import (CudaAutocastPolicy, FlashAttentionBackward, HalfPrecisionAttention, LayerNormStatsFp32,
                           cuda_autocast_lists, cuda_rules)
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec, skip_reason
from memprof.model_sources.open_clip import REGISTRY as MODELS
from memprof.simulation.events import ALLOC
from memprof.simulation.tracker import StorageTracker

BF16 = torch.bfloat16


@contextlib.contextmanager
def cuda_autocast(rule=None):
    """CPU autocast in bf16 with CUDA's policy (the rule) or the CPU's own (rule None)."""
    with rule.mode() if rule else contextlib.nullcontext(), torch.autocast("cpu", dtype=BF16):
        yield


# --- CUDA autocast policy ----------------------------------------------------------------------------

def test_cuda_lists_are_read_from_the_installed_header():
    lists = cuda_autocast_lists()
    assert "linear" in lists["AT_FORALL_LOWER_PRECISION_FP"] and "layer_norm" in lists["AT_FORALL_FP32"]
    assert "softmax.int" in lists["AT_FORALL_FP32_SET_OPT_DTYPE"] and "index_put" in lists["AT_FORALL_PROMOTE"]
    assert "cross_entropy_loss" not in sum(lists.values(), [])  # CUDA leaves it to log_softmax + nll_loss


def test_cuda_lists_negative_control(tmp_path):
    broken = tmp_path / "autocast_mode.h"
    broken.write_text("#define AT_FORALL_FP32(_) _(acos)\n\n")
    with pytest.raises(RuntimeError, match="AT_FORALL_LOWER_PRECISION_FP"):
        cuda_autocast_lists(str(broken))


def test_layer_norm_and_softmax_run_in_fp32_under_cuda_policy_only():
    x = torch.randn(2, 8)
    with cuda_autocast(CudaAutocastPolicy()):
        cuda = (F.layer_norm(x.to(BF16), (8,)).dtype, torch.softmax(x.to(BF16), -1).dtype, F.linear(x, x).dtype)
    with cuda_autocast():  # negative control: CPU autocast leaves both in the input dtype
        cpu = (F.layer_norm(x.to(BF16), (8,)).dtype, torch.softmax(x.to(BF16), -1).dtype, F.linear(x, x).dtype)
    assert cuda == (torch.float32, torch.float32, BF16)
    assert cpu == (BF16, BF16, BF16)


def test_cross_entropy_saves_low_precision_log_probs_under_cuda_policy():
    """logits [4, 10] bf16. CUDA: cross_entropy_loss is unlisted; it calls log_softmax with dtype=bf16 given, so
    the log-probs stay bf16 (4*10*2 = 80 B, saved), then nll_loss (fp32 list) casts them: 160 B. CPU autocast
    lists cross_entropy_loss as fp32: the logits are cast first (160 B) and log_softmax is fp32 (160 B)."""
    def sizes(rule):
        with FakeTensorMode():
            lg, lb = torch.empty(4, 10, dtype=BF16, requires_grad=True), torch.zeros(4, dtype=torch.long)
            with StorageTracker() as t, cuda_autocast(rule):
                F.cross_entropy(lg, lb)
        return [(ev[2], ev[4]) for ev in t.events if ev[0] == ALLOC][:2]

    assert sizes(CudaAutocastPolicy()) == [(80, "aten._log_softmax.default"), (160, "aten._to_copy.default")]
    assert sizes(None) == [(160, "aten._to_copy.default"), (160, "aten._log_softmax.default")]  # negative control


def test_cast_cache_keeps_one_copy_per_weight_per_region():
    """A [16, 16] fp32 weight used by three linears in one region: one bf16 copy (512 B); after the region
    exits the next use casts again."""
    rule = CudaAutocastPolicy()
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(2, 16)
    with rule.mode():
        with torch.autocast("cpu", dtype=BF16):
            for _ in range(3):
                F.linear(x, w)
        casts_first = rule.casts
        with torch.autocast("cpu", dtype=BF16):
            F.linear(x, w)
    assert rule.cache_hits == 2
    assert casts_first == 1 + 3  # the weight once, the activation at every use (not a leaf that requires grad)
    assert rule.casts == casts_first + 2  # new region: weight and activation cast again


def test_cast_cache_negative_control_views_and_no_grad_tensors_are_not_cached():
    rule = CudaAutocastPolicy()
    w = torch.randn(16, 16, requires_grad=True)
    frozen = torch.randn(16, 16)
    with rule.mode(), torch.autocast("cpu", dtype=BF16):
        for _ in range(3):
            F.linear(torch.ones(2, 16), w.t())  # a view of a leaf: never cached
            F.linear(torch.ones(2, 16), frozen)  # no grad: never cached
    assert rule.cache_hits == 0 and rule.casts == 3 * 4


def test_policy_kernels_are_removed_after_the_rule():
    with CudaAutocastPolicy().mode():
        pass
    with torch.autocast("cpu", dtype=BF16):
        assert F.layer_norm(torch.randn(2, 8).to(BF16), (8,)).dtype == BF16  # the CPU's own policy again


# --- attention backend per card ----------------------------------------------------------------------

@pytest.mark.parametrize("budget, dtype, cudnn, kind", [
    ("a100-80g", BF16, 92400, "flash"), ("h100-80g", torch.float16, 91500, "flash"),
    ("h100-80g", torch.float16, 92400, "cudnn"), ("titan-x", torch.float16, 92400, "efficient"),
    ("titan-x", BF16, 92400, "math")])
def test_attention_backend_follows_the_card(budget, dtype, cudnn, kind):
    """cuDNN attention first on sm90 with a cuDNN newer than 9.15 (tests/test_cudnn_attention.py), else flash on sm80+."""
    rule = HalfPrecisionAttention(parse_budget(budget), cudnn_version=cudnn)
    assert rule.backend(dtype, 64, masked=False) == kind
    assert rule.backend(dtype, 64, masked=True) != "flash"  # negative control: flash takes no mask


def test_flash_attention_saves_fp32_logsumexp_from_its_meta_function():
    """B=2, H=4, L=50, K=16 bf16: output 2*4*50*16*2 = 12800 B, logsumexp fp32 [2, 4, 50] = 1600 B; backward
    transients softmax_d 2*4*128*4 = 4096 B and dq_accum 2*128*4*32*4 = 131072 B."""
    rule = HalfPrecisionAttention(parse_budget("a100-80g"))
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 50, 4, 16, dtype=BF16, requires_grad=True).transpose(1, 2) for _ in range(3))
        with rule.mode(), StorageTracker([rule, FlashAttentionBackward()]) as t:
            out = F.scaled_dot_product_attention(q, k, v)
            t.set_phase("backward")
            out.sum().backward()
    allocs = [(ev[2], ev[4]) for ev in t.events if ev[0] == ALLOC]
    assert (12800, "aten._scaled_dot_product_flash_attention.default") in allocs
    assert (1600, "aten._scaled_dot_product_flash_attention.default") in allocs
    assert (4096, "flash backward softmax_d") in allocs and (131072, "flash backward dq_accum") in allocs
    assert rule.kernels == {"flash": 1}


def test_bf16_attention_below_sm80_is_the_math_path_with_fp32_scores():
    """Negative control of the above on an sm75 card: no flash; math keeps fp32 scores [2, 4, 50, 50] = 80000 B."""
    rule = HalfPrecisionAttention(parse_budget("titan-x"))
    with FakeTensorMode():
        q = torch.empty(2, 4, 50, 16, dtype=BF16, requires_grad=True)
        with rule.mode(), StorageTracker([rule]) as t:
            F.scaled_dot_product_attention(q, q, q)
    sizes = [ev[2] for ev in t.events if ev[0] == ALLOC]
    assert 80000 in sizes and rule.kernels == {"math": 1}


def test_layer_norm_stats_are_fp32_for_half_inputs():
    """x [4, 8] bf16: mean and rstd [4, 1] are fp32 on CUDA (16 B each); the fake shape function says bf16 (8 B)."""
    def stats(rules):
        with FakeTensorMode():
            x = torch.empty(4, 8, dtype=BF16)
            with StorageTracker(rules) as t:
                F.layer_norm(x, (8,), torch.ones(8, dtype=BF16), torch.zeros(8, dtype=BF16))
        return sorted(ev[2] for ev in t.events if ev[0] == ALLOC)[:2]

    assert stats([LayerNormStatsFp32()]) == [16, 16]
    assert stats([LayerNormStatsFp32(on_cpu=True)]) == [8, 8]  # negative control: same dtypes on the CPU stay bf16
    assert stats([]) == [8, 8]


# --- optimizer implementations -----------------------------------------------------------------------

def _step_allocations(impl: str) -> list[int]:
    """Bytes allocated by the second AdamW step over two real [64, 64] fp32 parameters on the CPU."""
    params = [torch.randn(64, 64, requires_grad=True) for _ in range(2)]
    opt = build_optimizer(OPTIMS["adamw"], params, impl=impl)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with StorageTracker() as t:
        opt.step()
    return [ev[2] for ev in t.events if ev[0] == ALLOC]


def test_fused_cpu_kernel_allocates_no_temporaries_like_cuda():
    assert sum(_step_allocations("fused")) == 0
    assert sum(_step_allocations("foreach")) >= 2 * 64 * 64 * 4  # negative control: sqrt of every exp_avg_sq
    assert max(_step_allocations("forloop")) == 64 * 64 * 4  # one parameter's temporaries at a time


def test_unsupported_implementations_are_skipped_with_the_reason():
    vit = MODELS["test-vit"]
    assert "no fused implementation" in skip_reason(vit, OPTIMS["lamb"], 32, optim_impl="fused")
    assert "one implementation" in skip_reason(vit, OPTIMS["adamw"], 8, optim_impl="forloop")
    assert "global" not in (skip_reason(vit, OPTIMS["lars"], 32, in_backward=True) or "")
    assert "all parameters" in skip_reason(vit, OPTIMS["lamb"], 32, in_backward=True)
    assert "GradScaler" in skip_reason(vit, OPTIMS["adamw"], 32, precision="fp16-amp", in_backward=True)
    assert skip_reason(vit, OPTIMS["adam"], 32, optim_impl="fused", in_backward=True) is None


# --- command line, keys, records ---------------------------------------------------------------------

def test_keys_keep_defaults_and_name_the_new_axes():
    assert RunSpec("vit-b-16", "adamw").key == "vit-b-16/adamw/ckpt-off/32bit/bs1/fp32/steps2/titan-x"
    spec = RunSpec("vit-b-16", "adamw", precision="bf16-amp", optim_impl="fused", optim_in_backward=True)
    assert spec.key == "vit-b-16/adamw/ckpt-off/32bit/bs1/bf16-amp+fused+in-backward/steps2/titan-x"
    assert spec.config == "vit-b-16/adamw/ckpt-off/32bit/bs1/bf16-amp+fused+in-backward"


@pytest.mark.parametrize("given, words", [
    ({"precision": "fp16"}, "fp16-amp"), ({"precision": "bf16amp"}, "did you mean bf16-amp"),
    ({"optim_impl": "fusd"}, "did you mean fused"),
    ({"precision": "fp16-amp", "optim_in_backward": "on"}, "GradScaler"),
    ({"optim_in_backward": "yes"}, "off, on")])
def test_bad_training_axes_are_one_line_usage_errors(tmp_path, given, words):
    with pytest.raises(UsageError, match=words) as err:
        plan_run(run_options(models="test-vit", optims="adamw", backend="simulate", out=str(tmp_path), **given))
    assert "\n" not in str(err.value)


def test_all_expands_every_axis(tmp_path):
    plan = plan_run(run_options(models="test-vit", optims="adamw,lamb", backend="simulate", out=str(tmp_path),
                                precision="all", optim_impl="all", optim_in_backward="off,on"))
    assert len(plan.entries) == 4 * 3 * 2 * 2
    lamb_fused = [e for e in plan.entries if e.spec.optim == "lamb" and e.spec.optim_impl == "fused"]
    assert lamb_fused and all(e.skip_reason for e in lamb_fused)


def test_records_carry_the_floor():
    """test-vit AdamW fp32: floor = weights + grads + 2 states = 4 x 464168 B; bf16 halves it."""
    _, fp32 = predict(RunSpec("test-vit", "adamw"))
    _, bf16 = predict(RunSpec("test-vit", "adamw", precision="bf16"))
    assert fp32["floor_bytes"] == 4 * 464168 and bf16["floor_bytes"] == 2 * 464168
    assert fp32["peak_to_floor_ratio"] == round(fp32["peak_allocated_bytes"] / fp32["floor_bytes"], 4) > 1


def test_in_backward_has_no_optimizer_phase_and_fewer_gradients():
    _, on = predict(RunSpec("test-vit", "adamw", optim_in_backward=True))
    _, off = predict(RunSpec("test-vit", "adamw"))
    assert on["phase_peak_allocated_bytes"]["optimizer"] == 0 and on["peak_phase"] == "backward"
    assert on["breakdown_at_peak_bytes"]["gradients"] < off["breakdown_at_peak_bytes"]["gradients"]
    assert on["peak_allocated_bytes"] < off["peak_allocated_bytes"]


def test_amp_rules_join_only_reduced_precision():
    device = parse_budget("titan-x")
    names = lambda spec: {r.name for r in cuda_rules(device, spec)}  # noqa: E731
    assert "cuda-autocast-policy" not in names(RunSpec("test-vit", "adamw"))
    assert {"cuda-autocast-policy", "half-precision-attention"} <= names(RunSpec("test-vit", "adamw", precision="bf16-amp"))
    assert "grad-scaler-fake-step" in names(RunSpec("test-vit", "adamw", precision="fp16-amp"))


# --- accuracy verdicts -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, check", [(dict(optim_impl="fused"), "matches_foreach"),
                                       (dict(optim_impl="forloop"), "matches_foreach"),
                                       (dict(optim_in_backward=True), "in_backward_matches_step")])
def test_implementations_match_and_a_changed_update_does_not(digits, kw, check):
    spec = RunSpec("test-vit", "adamw", **kw)
    ok = accuracy.check_matches(spec, dataclasses.replace(spec, optim_impl="foreach", optim_in_backward=False),
                                digits, 1e-3, 0, "cpu")
    assert ok["pass"], ok

    def double_lr(model, optimizer):  # negative control: the tested run's update is no longer the same
        for opt in getattr(optimizer, "optimizers", {None: optimizer}).values():
            for group in opt.param_groups:
                group["lr"] *= 2

    bad = accuracy.check_matches(spec, dataclasses.replace(spec, optim_impl="foreach", optim_in_backward=False),
                                 digits, 1e-3, 0, "cpu", optimizer_hook=double_lr)
    assert not bad["pass"] and bad["update_rel_diff"] > 0.5
    r = accuracy.evaluate_config(spec, digits, steps=60)
    assert check in r["checks"] and r["checks"][check]["pass"], r["checks"][check]


@pytest.mark.slow  # 1000 real bf16-autocast steps on the CPU: ~8 minutes on 2 busy cores
def test_amp_still_learns_and_zero_lr_does_not(digits):
    r = accuracy.evaluate_config(RunSpec("test-vit", "adamw", precision="bf16-amp"), digits)
    assert r["checks"]["learns"]["pass"], r["checks"]["learns"]
    bad = accuracy.evaluate_config(RunSpec("test-vit", "adamw", precision="bf16-amp"), digits, steps=60, lr=0.0)
    assert "learns" in bad["failed"]


# --- paper-size orderings ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit-b-16", "vit-l-14"])
def test_paper_models_fused_below_foreach_in_backward_below_both_amp_below_fp32(model):
    _, foreach = predict(RunSpec(model, "adamw"))
    _, fused = predict(RunSpec(model, "adamw", optim_impl="fused"))
    _, inb = predict(RunSpec(model, "adamw", optim_impl="fused", optim_in_backward=True))
    assert fused["peak_allocated_bytes"] < foreach["peak_allocated_bytes"]
    # mechanism: foreach's peak holds the sqrt temporaries of the update, fused holds none
    assert foreach["peak_phase"] == "optimizer" and foreach["breakdown_at_peak_bytes"]["temporaries"] > \
        fused["breakdown_at_peak_bytes"]["temporaries"]
    assert inb["peak_allocated_bytes"] < min(fused["peak_allocated_bytes"], foreach["peak_allocated_bytes"])
    assert inb["breakdown_at_peak_bytes"]["gradients"] < fused["breakdown_at_peak_bytes"]["gradients"]
    _, fp32 = predict(RunSpec(model, "adamw", batch_size=32, budget="a100-80g"))
    _, amp = predict(RunSpec(model, "adamw", batch_size=32, budget="a100-80g", precision="bf16-amp"))
    assert amp["peak_allocated_bytes"] < fp32["peak_allocated_bytes"]
    assert set(amp["attention_kernels"]) == {"flash"}
    assert amp["breakdown_at_peak_bytes"]["activations"] < fp32["breakdown_at_peak_bytes"]["activations"]
