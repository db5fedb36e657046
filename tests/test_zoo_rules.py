"""CUDA's fused attention kernels take 4-D q/k/v only (sdp_utils_cpp.h check_tensor_shapes): SAM's [B*H, L, K]
and NesT's / Hiera's [B, H, windows, L, K] run the math path, and a bool mask reaches every kernel but cuDNN as an
additive one (attention.cpp convert_boolean_attn_mask). Before, the rules handed 3-D and 5-D inputs to the
memory-efficient / flash ops, whose shape functions read them as [B, H, L, K]: the sweep's errors in timm:nest_base,
timm:samvit_base_patch16 and timm:hiera_base_224."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.budget import parse_budget
from memprof.simulation import rules as R
from memprof.simulation.events import ALLOC
from memprof.simulation.tracker import StorageTracker

BF16 = torch.bfloat16
SHAPES = [(2, 3, 4, 10, 8), (1, 2, 3, 4, 10, 8)]  # NesT's / Hiera's [B, H, T, N, K]; one more dimension


def _rule(dtype):
    if dtype == torch.float32:
        return R.MemEfficientAttention()
    return R.HalfPrecisionAttention(parse_budget("h100-80g"), cudnn_version=92400)  # cuDNN first where 4-D


def _run(shape, dtype, rule=None, mask=None):
    """(output shape, allocations (bytes, op)) of SDPA forward and backward on fake CPU tensors, under `rule`'s mode
    or, without one, the CPU's own SDPA (un-simulated: for non-4-D inputs the CPU runs the same math composite)."""
    with FakeTensorMode():
        q, k, v = (torch.empty(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        m = None if mask is None else torch.empty(mask, dtype=torch.bool)
        with StorageTracker([rule] if rule else []) as t:
            if rule is not None:
                with rule.mode():
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            t.set_phase("backward")
            out.sum().backward()
    return tuple(out.shape), [(ev[2], ev[4]) for ev in t.events if ev[0] == ALLOC]


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("shape", SHAPES)
def test_non_4d_attention_is_the_math_path_as_on_the_cpu(shape, dtype):
    """Output of q's shape, the allocations of the un-simulated math composite (the CPU's front end picks math for
    them too), among them the scores in fp32: prod(batch dims) * L * L * 4 = 24 * 10 * 10 * 4 = 9600 B."""
    out, allocs = _run(shape, dtype, _rule(dtype))
    ref_out, ref_allocs = _run(shape, dtype)
    assert out == ref_out == shape
    assert allocs == ref_allocs
    assert (9600, "aten.bmm.default") in allocs
    assert not any("efficient" in op or "flash" in op or "cudnn" in op for _, op in allocs)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_non_4d_negative_control_fused_kernels_break(monkeypatch, dtype):
    """Negative control: with the fused kernels taking any rank (the old rules), a 5-D input fails or comes back
    in another shape."""
    monkeypatch.setattr(R, "fused_shapes", lambda *a: True)
    try:
        out, _ = _run(SHAPES[0], dtype, _rule(dtype))
    except Exception:  # noqa: BLE001 - the shape functions reject it: the sweep's errors
        return
    assert out != SHAPES[0]


def test_four_d_attention_keeps_its_fused_kernel():
    """4-D fp32 stays on the memory-efficient kernel: output [B, L, H, K]-strided, logsumexp padded to 32."""
    _, allocs = _run((2, 2, 10, 32), torch.float32, R.MemEfficientAttention())
    assert (2 * 10 * 2 * 32 * 4, "aten._scaled_dot_product_efficient_attention.default") in allocs


def test_bool_mask_becomes_additive_before_the_kernel():
    """A bool mask [10, 10] in front of the math path (5-D fp32): the additive fp32 mask, 400 B, and its two 0-dim
    operands, as the front end makes them on every device: the same requests as the un-simulated CPU front end."""
    _, allocs = _run(SHAPES[0], torch.float32, R.MemEfficientAttention(), mask=(10, 10))
    assert (400, "aten.where.self") in allocs
    _, ref_allocs = _run(SHAPES[0], torch.float32, mask=(10, 10))  # the CPU's front end, un-simulated
    assert allocs == ref_allocs


def test_bool_mask_negative_control(monkeypatch):
    monkeypatch.setattr(R, "additive_mask", lambda mask, dtype: mask)
    _, allocs = _run(SHAPES[0], torch.float32, R.MemEfficientAttention(), mask=(10, 10))
    assert (400, "aten.where.self") not in allocs


@pytest.mark.skipif(not R.front_end_batches_3d(), reason="this torch's SDPA front end runs 3-D inputs on math")
def test_3d_attention_gets_a_batch_dimension_and_the_fused_kernel():
    """SAM's [B*H, L, K] = [6, 10, 32] fp32 with an fp32 mask [6, 10, 10]: the front end (torch 2.14) makes them
    [1, 6, 10, 32] and the mask [1, 6, 10, 10]; the memory-efficient kernel's output 6*10*32*4 = 7680 B and
    logsumexp [1, 6, 32] fp32 = 768 B; the output comes back 3-D."""
    with FakeTensorMode():
        q, k, v = (torch.empty(6, 10, 32, requires_grad=True) for _ in range(3))
        mask = torch.empty(6, 10, 10)
        rule = R.MemEfficientAttention()
        with StorageTracker([rule]) as t, rule.mode():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert tuple(out.shape) == (6, 10, 32)
    allocs = sorted(ev[2] for ev in t.events if ev[0] == ALLOC and "efficient" in ev[4])
    assert allocs[-2:] == [768, 7680] or sorted(allocs) == [8, 8, 768, 7680]


def test_3d_negative_control_without_the_batch_dimension(monkeypatch):
    """Negative control: handed on 3-D (the old rules), the memory-efficient op reads [6, 10, 32] as [B, H, L, K]
    and fails or returns another shape."""
    monkeypatch.setattr(R, "front_end_batches_3d", lambda: False)
    monkeypatch.setattr(R, "fused_shapes", lambda *a: True)
    with FakeTensorMode():
        q = torch.empty(6, 10, 32, requires_grad=True)
        rule = R.MemEfficientAttention()
        try:
            with StorageTracker([rule]), rule.mode():
                out = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.empty(6, 10, 10))
        except Exception:  # noqa: BLE001 - the sweep's samvit error
            return
    assert tuple(out.shape) != (6, 10, 32)


# --- index_put(accumulate=True): CUDA sorts the indices (memprof.simulation.rules.IndexPutAccumulate) -------------

def _index_backward(rules):
    """A relative-position table [169, 4] gathered by 2401 indices (Swin's window 7), backward: IndexBackward0."""
    with FakeTensorMode():
        table = torch.empty(169, 4, requires_grad=True)
        index = torch.zeros(2401, dtype=torch.long)
        with StorageTracker(rules) as t:
            out = table[index]
            t.set_phase("backward")
            out.sum().backward()
    return [(ev[2], ev[4]) for ev in t.events if ev[0] == ALLOC]


def test_index_put_accumulate_sorts_on_cuda():
    """N = 2401 indices: four int64 tensors of 19208 B and cub's alternate buffers 38416 B, inside the backward's
    index_put (accumulate=True); the op's own output (the table's gradient, 169*4*4 = 2704 B) as on the CPU."""
    rule = R.IndexPutAccumulate()
    allocs = _index_backward([rule])
    temps = [n for n, op in allocs if op.startswith("index_put accumulate")]
    assert temps == [19208] * 4 + [38416]
    assert rule.calls == 1 and not rule.idle()
    # the rest is what the un-simulated CPU trace allocates
    assert [a for a in allocs if not a[1].startswith("index_put accumulate")] == _index_backward([])


def test_index_put_negative_controls():
    """Without the rule no sort temporaries; an index_put without accumulate (x[index] = v) takes none on CUDA."""
    assert not any(op.startswith("index_put accumulate") for _, op in _index_backward([]))
    rule = R.IndexPutAccumulate()
    with FakeTensorMode():
        x, v = torch.empty(169, 4), torch.empty(2401, 4)
        with StorageTracker([rule]) as t:
            x.index_put_((torch.zeros(2401, dtype=torch.long),), v)
    assert rule.calls == 0 and rule.idle()
    assert not any(ev[4].startswith("index_put accumulate") for ev in t.events if ev[0] == ALLOC)
