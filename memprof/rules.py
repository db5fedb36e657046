"""CUDA-vs-CPU corrections: each place where a CUDA run allocates differently from the CPU run we trace.

Every rule has a name (recorded with each prediction), a one-line summary and the source it follows.
Rules with hooks act on the tracker (memprof.tracker) op by op; the others are applied where their
docstring says and are listed so a prediction names everything it assumed.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from memprof.budget import DeviceProfile

aten = torch.ops.aten


class Rule:
    name = ""
    summary = ""
    source = ""

    def before_op(self, tracker, func, args, kwargs) -> None:
        pass

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "source": self.source}


class CachingAllocator(Rule):
    name = "caching-allocator"
    summary = ("requests round up to 512 B; best-fit reuse of cached blocks; 2 MiB / 20 MiB / 2 MiB-rounded "
               "segments; split rules per pool; unsplit blocks count whole (memprof.allocator)")
    source = "c10/cuda/CUDACachingAllocator.cpp"


class ForeachOptimizer(Rule):
    name = "foreach-optimizer"
    summary = ("optimizers run their foreach (multi-tensor) implementation, as torch and timm choose for CUDA "
               "parameters; its full-size temporaries (e.g. AdamW's sqrt of every exp_avg_sq) are traced")
    source = "torch/optim/optimizer.py _default_to_fused_or_foreach; timm/optim/_helpers.py _resolve_foreach"


class HostLiterals(Rule):
    name = "host-literals"
    summary = ("tensors made from Python literals without a device (the optimizers' step counters) stay in host "
               "memory on CUDA and are not counted")
    source = "torch/optim/adam.py _init_group: state['step'] = torch.tensor(0.0) unless capturable or fused"


class MemEfficientAttention(Rule):
    """fp32 scaled_dot_product_attention runs the memory-efficient kernel on CUDA.

    Flash and cuDNN attention need fp16/bf16, so for fp32 CUDA's dispatcher picks the memory-efficient
    kernel (sm50+, head dim a multiple of 4). It saves q, k, v, the output and an fp32 logsumexp of shape
    [B, H, ceil(L/32)*32]; its output is laid out [B, L, H, K], so the permute+reshape that follows in
    multi_head_attention_forward copies unless B == 1. The CPU would run its flash kernel instead
    (logsumexp [B, L, H], another layout), so we call the CUDA op itself, whose shape function (meta
    kernel) gives the CUDA sizes and strides, and autograd then runs the CUDA backward's shape function.
    """

    name = "mem-efficient-attention"
    summary = ("fp32 SDPA runs CUDA's memory-efficient kernel: saves an fp32 logsumexp padded to 32 and "
               "returns a [B, L, H, K]-strided output (the reshape after it copies when B > 1)")
    source = "aten/src/ATen/native/transformers/cuda/sdp_utils.cpp; torch/_meta_registrations.py"

    def mode(self) -> TorchFunctionMode:
        return _EfficientAttentionMode()


def efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """scaled_dot_product_attention through the op CUDA selects for fp32 inputs."""
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale)[0]


class _EfficientAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0]
            if q.dtype == torch.float32 and q.size(-1) % 4 == 0 and not kwargs.get("enable_gqa"):
                return efficient_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


MATMUL_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                        aten.addbmm.default, aten._addmm_activation.default, aten.addmv.default,
                        aten.mv.default, aten.dot.default})


class CublasWorkspace(Rule):
    """cuBLAS keeps one workspace per (handle, stream), taken from the caching allocator and never freed.

    Handles are per thread: the forward runs on the Python thread, the backward on autograd's device
    thread, so a training step holds two workspaces from the first backward matmul on.
    """

    name = "cublas-workspace"
    summary = "each thread that runs a matmul (forward; autograd's backward thread) holds one cuBLAS workspace"
    source = "aten/src/ATen/cuda/CublasHandlePool.cpp getChosenWorkspaceSize, getCurrentCUDABlasHandle"

    def __init__(self, device: DeviceProfile):
        self.nbytes = cublas_workspace_bytes(device)
        self._threads: set[str] = set()

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func in MATMUL_OPS:
            thread = "autograd" if tracker.phase == "backward" else "main"
            if thread not in self._threads:
                self._threads.add(thread)
                tracker.synthetic_alloc(self.nbytes, f"cuBLAS workspace ({thread} thread)")


def cublas_workspace_bytes(device: DeviceProfile) -> int:
    """CUBLAS_WORKSPACE_CONFIG default: ':4096:2:16:8' (8,519,680 B) before Hopper, ':4096:8' (32 MiB) on sm90+."""
    cc = device.compute_capability
    if cc is not None and cc >= (9, 0):
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


class EfficientAttentionBackwardDelta(Rule):
    """The memory-efficient backward computes delta = (grad_out * out).sum(-1) in fp32 before its kernel.

    The product is a transient tensor the size of the output, freed once delta ([B, H, L] fp32) exists;
    delta lives until the kernel returns. The CPU trace never sees either (the shape function allocates
    only the gradients), so both are added around the op.
    """

    name = "efficient-attention-backward-delta"
    summary = "the fp32 memory-efficient backward allocates grad_out*out (transient) and delta [B, H, L] fp32"
    source = "aten/src/ATen/native/transformers/cuda/attention_backward.cu _efficient_attention_backward"

    def __init__(self):
        self._delta: list[int] = []

    def before_op(self, tracker, func, args, kwargs) -> None:
        if func is aten._scaled_dot_product_efficient_attention_backward.default:
            grad_out = args[0]
            b, h, m = grad_out.shape[0], grad_out.shape[1], grad_out.shape[2]
            product = tracker.synthetic_alloc(grad_out.numel() * 4, "attention backward grad_out*out")
            self._delta.append(tracker.synthetic_alloc(b * h * m * 4, "attention backward delta"))
            tracker.free_synthetic(product)

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is aten._scaled_dot_product_efficient_attention_backward.default:
            tracker.free_synthetic(self._delta.pop())


def cuda_rules(device: DeviceProfile) -> list[Rule]:
    """Fresh rule instances for one simulated run on `device` (the workspace rule keeps per-run state)."""
    return [CachingAllocator(), ForeachOptimizer(), HostLiterals(), MemEfficientAttention(),
            CublasWorkspace(device), EfficientAttentionBackwardDelta()]
