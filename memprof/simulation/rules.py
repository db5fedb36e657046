"""CUDA-vs-CPU corrections: each place where a CUDA run allocates differently from the CPU run we trace.

Every rule has a name (recorded with each prediction), a one-line summary and the source it follows.
Rules with hooks act on the tracker (memprof.simulation.tracker) op by op; the others are applied where their
docstring says and are listed so a prediction names everything it assumed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from memprof.budget import DeviceProfile
from memprof.simulation.events import ALLOC, FREE, renamed
from memprof.simulation.rule import Rule  # noqa: F401  (the base every rule here subclasses)
from memprof.simulation.tracker import current_tracker

aten = torch.ops.aten


class CachingAllocator(Rule):
    name = "caching-allocator"
    summary = ("requests round up to 512 B; best-fit reuse of cached blocks; 2 MiB / 20 MiB / 2 MiB-rounded "
               "segments; split rules per pool; unsplit blocks count whole (memprof.simulation.allocator)")
    source = "c10/cuda/CUDACachingAllocator.cpp"


class ForeachOptimizer(Rule):
    name = "foreach-optimizer"
    summary = ("optimizers run their foreach (multi-tensor) implementation, as torch and timm choose for CUDA "
               "parameters; its full-size temporaries (e.g. AdamW's sqrt of every exp_avg_sq) are traced")
    source = "torch/optim/optimizer.py _default_to_fused_or_foreach; timm/optim/_helpers.py _resolve_foreach"


class HostLiterals(Rule):
    acts_on = frozenset({aten._scaled_dot_product_efficient_attention.default})
    name = "host-literals"
    summary = ("tensors made from Python literals without a device (the optimizers' step counters) and the "
               "memory-efficient attention's RNG seed and offset are host memory on CUDA: not counted")
    source = ("torch/optim/adam.py _init_group: state['step'] = torch.tensor(0.0) unless capturable or fused; "
              "attention.cu _efficient_attention_forward: seed/offset are at::empty({}, kLong) on the CPU")

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is aten._scaled_dot_product_efficient_attention.default:
            for rng_state in out[2:4]:
                tracker.treat_as_host(rng_state)


class MemEfficientAttention(Rule):
    """fp32 scaled_dot_product_attention runs the memory-efficient kernel on CUDA.

    Flash and cuDNN attention need fp16/bf16, so for fp32 CUDA's dispatcher picks the memory-efficient
    kernel (sm50+, head dim a multiple of 4). It saves q, k, v, the output and an fp32 logsumexp of shape
    [B, H, ceil(L/32)*32]; its output is laid out [B, L, H, K], so the permute+reshape that follows in
    multi_head_attention_forward copies unless B == 1. The CPU would run its flash kernel instead
    (logsumexp [B, L, H], another layout), so we call the CUDA op itself, whose shape function (meta
    kernel) gives the CUDA sizes and strides, and autograd then runs the CUDA backward's shape function.
    """

    forward_only = True
    name = "mem-efficient-attention"
    summary = ("fp32 SDPA runs CUDA's memory-efficient kernel: saves an fp32 logsumexp padded to 32 and "
               "returns a [B, L, H, K]-strided output (the reshape after it copies when B > 1)")
    source = "aten/src/ATen/native/transformers/cuda/sdp_utils.cpp; torch/_meta_registrations.py"

    @contextlib.contextmanager
    def mode(self):
        """While active, torch.nn.functional.scaled_dot_product_attention (which multi_head_attention_forward
        and open_clip look up at call time) takes the path CUDA takes for fp32."""
        original = F.scaled_dot_product_attention

        @batched_3d
        def sdpa(query, key, value, *args, **kwargs):
            if query.dtype == torch.float32 and not kwargs.get("enable_gqa"):
                if not torch.backends.cuda.mem_efficient_sdp_enabled() or not fused_shapes(query, key, value):
                    # the kernel restricted away (sdpa_kernel), or q/k/v not 4-D: CUDA's math path
                    return math_sdpa(query, key, value, *args, **kwargs)  # (flash takes no fp32 on CUDA)
                if query.size(-1) % 4 == 0:
                    return efficient_sdpa(query, key, value, *args, **kwargs)
            return original(query, key, value, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original


def efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """scaled_dot_product_attention through the op CUDA selects for fp32 inputs."""
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, additive_mask(attn_mask, query.dtype), needs_lse, dropout_p, is_causal, scale=scale)[0]


def fused_shapes(query, key, value) -> bool:
    """Whether q, k and v are all 4-D ([B, H, L, K]): every fused SDPA kernel on CUDA (flash, memory-efficient,
    cuDNN) requires it (sdp_utils_cpp.h check_tensor_shapes, in each kernel's constraints in cuda/sdp_utils.cpp);
    5-D inputs (NesT's and Hiera's [B, H, windows, L, K]) run the math path, and so do 3-D ones (SAM's
    [B*H, L, K]) unless the front end gives them a batch dimension first (`front_end_batches_3d`)."""
    return query.dim() == 4 and key.dim() == 4 and value.dim() == 4


@functools.lru_cache(maxsize=None)
def front_end_batches_3d() -> bool:
    """Whether the installed torch's SDPA front end gives 3-D q/k/v a singleton batch dimension before it selects a
    kernel (sdp_utils_cpp.h normalize_unbatched_input, pytorch#192271: in torch 2.14, not in 2.11), so that they
    reach the fused kernels as [1, B*H, L, K]: read from what it dispatches for a tiny 3-D input."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with _disable_current_modes(), torch.autocast("cpu", enabled=False):  # real CPU tensors, outside any trace
        q = torch.zeros(1, 2, 8)
        with Ops():
            torch._C._nn.scaled_dot_product_attention(q, q, q)
    return bool(seen) and seen[0] is aten.unsqueeze.default


def batched_3d(kernel):
    """`kernel(query, key, value, attn_mask, ...)` as the front end runs it: 3-D q/k/v (and a mask, to 4-D) with a
    leading singleton dimension where `front_end_batches_3d`, the output squeezed back."""
    def run(query, key, value, attn_mask=None, *args, **kwargs):
        if not (query.dim() == key.dim() == value.dim() == 3 and front_end_batches_3d()):
            return kernel(query, key, value, attn_mask, *args, **kwargs)
        while attn_mask is not None and attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
        return kernel(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask, *args,
                      **kwargs).squeeze(0)
    return run


def additive_mask(attn_mask, dtype):
    """What SDPA's front end (attention.cpp scaled_dot_product_attention, convert_boolean_attn_mask) hands every
    kernel but cuDNN: a bool mask becomes where(mask, 0, -inf), an additive mask of its shape in the query's dtype
    (the two 0-dim operands are made on the device: two 512 B blocks); any other passes through. As the installed
    torch's front end dispatches it (tests/test_zoo_rules.py compares)."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.where(attn_mask, torch.scalar_tensor(0.0, dtype=dtype), torch.scalar_tensor(float("-inf"), dtype=dtype))


def math_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention on CUDA's math path (`_scaled_dot_product_attention_math`), the kernel left
    when the fused ones are switched off (torch.nn.attention.sdpa_kernel, torch.backends.cuda.enable_*_sdp) or
    cannot take the inputs (`fused_shapes`)."""
    return aten._scaled_dot_product_attention_math(query, key, value, additive_mask(attn_mask, query.dtype),
                                                   dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


MATMUL_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                        aten.addbmm.default, aten._addmm_activation.default, aten.addmv.default,
                        aten.mv.default, aten.dot.default})


LT_OPS = frozenset({aten.addmm.default, aten._addmm_activation.default})  # a 1-D bias: the cuBLASLt path


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class CublasWorkspace(Rule):
    """cuBLAS keeps one workspace per (handle, stream), taken from the caching allocator and never freed.

    Handles are per thread: the forward runs on the Python thread, the backward on autograd's device
    thread, so a training step holds two workspaces from the first backward matmul on. From torch 2.9 to
    2.11 cuBLASLt (addmm with a bias) kept a separate cached 1 MiB workspace per (handle, stream); from
    2.12 it shares the cuBLAS one.
    """

    acts_on = MATMUL_OPS
    name = "cublas-workspace"
    summary = ("each thread that runs a matmul (forward; autograd's backward thread) holds one cuBLAS workspace "
               "(plus a 1 MiB cuBLASLt one for addmm on torch 2.9-2.11)")
    source = "aten/src/ATen/cuda/CublasHandlePool.cpp getChosenWorkspaceSize, getCUDABlasLtWorkspace"

    def __init__(self, device: DeviceProfile, version: tuple[int, int] | None = None):
        self.nbytes = cublas_workspace_bytes(device)
        self.lt_separate = (2, 9) <= (version or torch_version()) < (2, 12)
        self._held: set[tuple[str, str]] = set()

    def _hold(self, tracker, kind: str, nbytes: int) -> None:
        thread = "autograd" if tracker.phase == "backward" else "main"
        if (kind, thread) not in self._held:
            self._held.add((kind, thread))
            tracker.synthetic_alloc(nbytes, f"{kind} workspace ({thread} thread)")

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func in MATMUL_OPS:
            self._hold(tracker, "cuBLAS", self.nbytes)
            if self.lt_separate and func in LT_OPS:
                self._hold(tracker, "cuBLASLt", LT_WORKSPACE_BYTES)


LT_WORKSPACE_BYTES = 1 << 20  # CUBLASLT_WORKSPACE_SIZE default, 1024 KiB


WORKSPACE_32MIB_MAJORS = (9, 10, 12)  # Hopper and Blackwell (datacenter 10.x, consumer 12.x)


def cublas_workspace_bytes(device: DeviceProfile) -> int:
    """CUBLAS_WORKSPACE_CONFIG default: ':4096:8' (32 MiB) for compute capability majors 9, 10 and 12, else
    ':4096:2:16:8' (8,519,680 B), as CublasHandlePool.cpp parseChosenWorkspaceSize decides (`use32mb`)."""
    cc = device.compute_capability
    if cc is not None and cc[0] in WORKSPACE_32MIB_MAJORS:
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


class EfficientAttentionBackward(Rule):
    """What the fp32 memory-efficient backward allocates besides the gradients its shape function returns.

    `_scaled_dot_product_efficient_attention_backward_cuda` passes `grad_out_.transpose(1, 2)` ([B, M, H, K])
    on, and `_efficient_attention_backward` copies it with `.contiguous()` unless that transposed view is
    already contiguous (e.g. at batch 1 under nn.MultiheadAttention, whose [B, L, E] gradient viewed as
    [B, H, L, K] transposes back to a contiguous [1, L, H, K]); for fp32 (kKernelComputesDelta is false unless half precision)
    `delta = (grad_out.float() * out.float()).sum(-1).transpose(-2, -1).contiguous()` makes the product
    [B, M, H, Kv], the sum [B, M, H] and delta [B, H, M] (the first two die at the end of that statement);
    on sm70+ the split-key kernel accumulates grad_q in a workspace of
    B*H*align4(ceil(M/BI)*ceil(K/BJ)*(4 + BI*BJ))*4 bytes (BI x BJ = 64 x 64 for head dim <= 64, else
    128 x 64). All of them are released when the op returns.
    """

    acts_on = frozenset({aten._scaled_dot_product_efficient_attention_backward.default})
    name = "efficient-attention-backward-temporaries"
    summary = ("the fp32 memory-efficient backward copies grad_out unless its [B, M, H, K] view is contiguous, "
               "allocates grad_out*out, its sum, delta [B, H, L] fp32 and, on "
               "sm70+, a grad_q accumulation workspace, all released when it returns")
    source = ("aten/src/ATen/native/transformers/cuda/attention_backward.cu _efficient_attention_backward; "
              "mem_eff_attention/kernel_backward.h workspace_size")

    def __init__(self, device: DeviceProfile):
        cc = device.compute_capability
        self.split_keys = cc is not None and cc >= (7, 0)

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is not aten._scaled_dot_product_efficient_attention_backward.default:
            return
        grad_out, query = args[0], args[1]
        b, h, m, k = query.shape
        temps = []
        if not grad_out.transpose(1, 2).is_contiguous():
            temps.append(tracker.synthetic_alloc(grad_out.numel() * grad_out.element_size(),
                                                 "attention backward grad_out.transpose(1, 2).contiguous()"))
        product = tracker.synthetic_alloc(grad_out.numel() * 4, "attention backward grad_out*out")
        summed = tracker.synthetic_alloc(b * h * m * 4, "attention backward (grad_out*out).sum(-1)")
        temps.append(tracker.synthetic_alloc(b * h * m * 4, "attention backward delta"))
        tracker.free_synthetic(product)
        tracker.free_synthetic(summed)
        if self.split_keys:
            bi, bj = (64, 64) if k <= 64 else (128, 64)
            elems = -(-m // bi) * -(-k // bj) * (4 + bi * bj)
            temps.append(tracker.synthetic_alloc(b * h * (-(-elems // 4) * 4) * 4, "attention backward workspace"))
        for sid in reversed(temps):
            tracker.free_synthetic(sid)


class TimmForeachChunks(Rule):
    """timm's foreach optimizers (LAMB, AdamW, Adan, ...: every step function wrapped in `_foreach_chunked`)
    run their update over chunks of parameters on CUDA when the card's L2 cache is large.

    timm/optim/_helpers.py `_foreach_chunk_elements`: on a CUDA device the chunk holds at most
    L2_cache_size // (4 * element_size) elements, and only when that is at least 2**22 elements (so for fp32
    an L2 of 64 MiB or more); on the CPU it returns None (one chunk). `_foreach_chunks` then packs consecutive
    parameters while their total stays within the chunk (a larger tensor is a chunk of its own), so the step's
    full-size temporaries (LAMB: the clipped grads, sqrt(exp_avg_sq), the updates) exist for one chunk at a
    time. Here timm's own function runs with the card's L2 size standing in for the CUDA query, so timm's
    threshold and its TIMM_FOREACH_CHUNK_SIZE override (`_FOREACH_CHUNK_OVERRIDE`) apply unchanged.
    """

    name = "timm-foreach-chunks"
    summary = ("timm foreach optimizers split their update into chunks of L2 bytes / (4 x element size) elements "
               "when that is >= 2**22 (L2 >= 64 MiB for fp32), as on CUDA; never on an unknown card")
    source = "timm/optim/_helpers.py _foreach_chunk_elements, _foreach_chunks, _foreach_chunked"

    def __init__(self, device: DeviceProfile):
        self.l2_bytes = device.l2_cache_bytes
        self.chunk_elements: dict[int, int | None] = {}  # element size -> chunk elements, as timm decided

    @contextlib.contextmanager
    def mode(self):
        try:
            from timm.optim import _helpers
        except ImportError:
            yield
            return
        if not hasattr(_helpers, "_foreach_chunk_elements"):  # a timm before chunking (or after its rename)
            yield
            return
        original = _helpers._foreach_chunk_elements
        key = torch.device("cuda", 0)  # the device timm would query; its cached L2 size is ours meanwhile
        saved = _helpers._L2_CACHE_SIZE.get(key)

        def chunk_elements(device, element_size):
            if self.l2_bytes is None:
                n = original(device, element_size)  # the parameters' own (CPU) device: only the override applies
            else:
                n = original(key, element_size)
            self.chunk_elements[element_size] = n
            return n

        if self.l2_bytes is not None:
            _helpers._L2_CACHE_SIZE[key] = self.l2_bytes
        _helpers._foreach_chunk_elements = chunk_elements
        try:
            yield
        finally:
            _helpers._foreach_chunk_elements = original
            if saved is None:
                _helpers._L2_CACHE_SIZE.pop(key, None)
            else:
                _helpers._L2_CACHE_SIZE[key] = saved

    def metrics(self) -> dict:
        if not self.chunk_elements:
            return {}
        return {"foreach_chunk_elements": {str(k): v for k, v in sorted(self.chunk_elements.items())}}


INDEX_PUT_OPS = frozenset({aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default,
                           aten._index_put_impl_.default})


class IndexPutAccumulate(Rule):
    """index_put with accumulate=True (the backward of advanced indexing: IndexBackward0's index_backward, e.g. a
    relative-position bias table gathered by an index, Swin / SAM / BEiT) sorts on CUDA: index_put_with_sort_kernel
    makes the linear index, an arange, sorted_indices and orig_indices (four int64 tensors of the indices' broadcast
    numel N) and cub's radix_sort_pairs takes alternate key and value buffers (2 x 8N) from the caching allocator;
    all die when the op returns. The CPU's kernel accumulates in place without them. The cub bookkeeping (a few
    hundred bytes) and the contiguous copy of a value that must be broadcast are not modelled."""

    acts_on = INDEX_PUT_OPS
    name = "index-put-accumulate-sort"
    summary = ("index_put(accumulate=True) on CUDA sorts its indices: linear index, arange, sorted and original "
               "indices (int64 x N each) and cub's alternate key/value buffers (2 x 8N), released when it returns")
    source = ("aten/src/ATen/native/cuda/Indexing.cu index_put_with_sort_kernel; aten/src/ATen/native/"
              "TensorAdvancedIndexing.cpp index_put_impl_ (accumulate on CUDA takes index_put_with_sort_stub)")

    def __init__(self):
        self.calls = 0

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func not in INDEX_PUT_OPS:
            return
        accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
        indices = [i for i in args[1] if i is not None]
        if not accumulate or not indices:
            return
        n = 1
        for d in torch.broadcast_shapes(*(i.shape for i in indices)):
            n *= d
        if n == 0:
            return
        self.calls += 1
        temps = [tracker.synthetic_alloc(8 * n, f"index_put accumulate {what} (int64)")
                 for what in ("linear index", "arange", "sorted_indices", "orig_indices")]
        temps.append(tracker.synthetic_alloc(16 * n, "index_put accumulate cub radix sort alternate buffers"))
        for sid in reversed(temps):
            tracker.free_synthetic(sid)

    def idle(self) -> bool:
        return not self.calls


class InPlaceGradAccumulation(Rule):
    """Autograd sums a gradient that reaches one tensor twice (a residual stream, a weight used twice, a grad
    kept across micro-batches) in place on CUDA, out of place under any TorchDispatchMode.

    torch/csrc/autograd/input_buffer.cpp (accumulate) and functions/accumulate_grad.h (accumulateGrad) add
    in place (`old.add_(new)`) when grad mode is off, autograd holds the last reference to the old gradient
    and neither tensor is `isTensorSubclassLike`; that test is true for every tensor while a dispatch mode is
    active (c10::impl::dispatch_mode_enabled()), so the trace shows `old + new` (aten.add.Tensor): a new
    storage, then the old one released at once. Here such an add during backward whose first operand has the
    result's shape and dtype, and whose storage dies before the next allocation, is rewritten as the in-place
    add CUDA performs: no new allocation, and the old storage lives on as the result.
    """

    acts_on = frozenset({aten.add.Tensor})
    name = "in-place-grad-accumulation"
    summary = ("gradients reaching a tensor more than once are summed in place on CUDA (out of place under the "
               "tracing dispatch mode): the out-of-place sum's allocation is folded into the old gradient")
    source = "torch/csrc/autograd/input_buffer.cpp accumulate; torch/csrc/autograd/functions/accumulate_grad.h"
    storage_maps = ("candidates",)  # {gradient storage: the storage its in-place sum folds into}

    def __init__(self):
        self.candidates: dict[int, int] = {}  # result storage id -> first operand's storage id
        self.folded = 0

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is not aten.add.Tensor or tracker.phase != "backward" or kwargs.get("alpha", 1) != 1:
            return
        old, new = args[0], args[1]
        if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
            return
        if old.shape != out.shape or old.dtype != out.dtype or not old.is_contiguous():
            return
        out_sid, old_sid = tracker.storage_id(out), tracker.storage_id(old)
        if out_sid is not None and old_sid is not None:
            self.candidates[out_sid] = old_sid

    def rewrite(self, events: list) -> list:
        """The stream with each qualifying out-of-place accumulation made in place."""
        alias: dict[int, int] = {}  # folded result id -> the storage it lives in
        drop: set[int] = set()  # indices of the old gradients' releases that no longer happen
        result = []
        for i, ev in enumerate(events):
            if i in drop:
                continue
            if ev.kind is ALLOC and ev.sid in self.candidates:
                old = alias.get(self.candidates[ev.sid], self.candidates[ev.sid])
                for j in range(i + 1, len(events)):
                    later = events[j]
                    if later.kind is ALLOC:
                        break
                    if later.kind is FREE and alias.get(later.sid, later.sid) == old:
                        alias[ev.sid] = old
                        drop.add(j)
                        self.folded += 1
                        break
                if ev.sid in alias:
                    continue
            if ev.kind is FREE and ev.sid in alias:
                ev = renamed(ev, alias[ev.sid])
            result.append(ev)
        return result



CONV_OPS = frozenset({aten.convolution.default, aten.convolution_backward.default})


class ConvWorkspaceBound(Rule):
    """Not modelled, only bounded: the cuDNN workspace of each convolution (ViT: the patch embedding).

    A kernel's own scratch (allocated and freed inside the op) is invisible at dispatch level. On CUDA,
    torch (benchmark off, the default) takes cuDNN's heuristic engine list and allocates the first one's
    workspace from the caching allocator, moving to the next engine if that allocation fails
    (aten/src/ATen/native/cudnn/Conv_v8.cpp try_plans); the size depends on the engine cuDNN picks, and
    torch caps it only if CUDNN_CONV_WSCAP_DBG is set. The bound used here is an estimate, not a guarantee:
    the explicit-GEMM (im2col) matrix, B * C_in * kh * kw * H_out * W_out elements, plus a layout-transformed
    copy of every operand (forward: input, weight; backward: grad_output, input, weight). Each workspace is
    released when its op returns, so the largest over the run is reported.
    """

    acts_on = CONV_OPS
    name = "cudnn-conv-workspace-bound"
    summary = ("convolution workspaces are not modelled; bounded by im2col + one copy of each operand, reported "
               "in `unmodelled` and the prediction's upper band")
    source = ("aten/src/ATen/native/cudnn/Conv_v8.cpp try_plans (next engine when the workspace allocation fails); "
              "torch docs, CUDA environment variables: CUDNN_CONV_WSCAP_DBG")

    def __init__(self):
        self.bound_bytes = 0
        self.ops = 0

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func not in CONV_OPS:
            return
        if func is aten.convolution.default:
            inp, weight, result = args[0], args[1], out
            operands = (inp, weight)
        else:
            grad_out, inp, weight = args[0], args[1], args[2]
            result = grad_out
            operands = (grad_out, inp, weight)
        if weight.dim() < 3:
            return
        kernel = 1
        for k in weight.shape[2:]:
            kernel *= k
        spatial_out = 1
        for d in result.shape[2:]:
            spatial_out *= d
        im2col = inp.shape[0] * inp.shape[1] * kernel * spatial_out * inp.element_size()
        bound = im2col + sum(t.numel() * t.element_size() for t in operands)
        self.ops += 1
        self.bound_bytes = max(self.bound_bytes, bound)

    def metrics(self) -> dict:
        if not self.ops:
            return {}
        return {"unmodelled": [{"what": f"cuDNN convolution workspace (largest of {self.ops} convolution ops; "
                                        "the engine cuDNN's heuristics pick decides the real size)",
                                "bound_bytes": self.bound_bytes, "source": self.source}]}


PAGED_MIN_NUMEL = 100_000  # bitsandbytes get_state_buffer: smaller states are never paged


class Bitsandbytes8bit(Rule):
    """bitsandbytes 8-bit optimizers on fake tensors, as they allocate on CUDA.

    State creation runs bitsandbytes' own `init_state` (uint8 states shaped like the parameter, fp32 absmax
    per 256-element block, fp32 states below `min_8bit_size`), so a bitsandbytes change shows up. Its
    quantization maps are built on the host and moved to the device at the first `init_state`: counted
    then, once per map. The update is one in-place kernel with no temporaries, which cannot run on fake
    tensors (a data-dependent .item()): it is skipped. Paged optimizers put states of 100k elements or
    more in CUDA managed memory (cudaMallocManaged), which torch's allocator never sees: they are taken out
    of the stream and reported as `paged_state_bytes`, outside the allocator.
    """

    name = "bitsandbytes-8bit"
    summary = ("8-bit states from bitsandbytes' own init_state; quantization maps moved to the device once; the "
               "in-place update kernel allocates nothing; paged states live outside torch's allocator")
    source = "bitsandbytes/optim/optimizer.py Optimizer2State.init_state, get_state_buffer, fill_qmap"

    def __init__(self):
        self.paged_bytes = 0
        self.active = False

    def attach(self, tracker, optimizer) -> None:
        if not type(optimizer).__module__.startswith("bitsandbytes"):
            return
        self.active = True
        init_state, paged = optimizer.init_state, getattr(optimizer, "is_paged", False)

        def traced_init_state(group, p, gindex, pindex):
            with warnings.catch_warnings():  # "paged optimizers are not supported on CPU": we model CUDA here
                warnings.simplefilter("ignore")
                init_state(group, p, gindex, pindex)
            st = optimizer.state[p]
            for key in ("qmap1", "qmap2"):
                if key in st and tracker.storage_id(st[key]) is None:
                    tracker.register(st[key], f"bitsandbytes {key} .to(device)")
            if paged and p.numel() >= PAGED_MIN_NUMEL:
                for key in ("state1", "state2"):
                    if key in st:
                        self.paged_bytes += st[key].untyped_storage().nbytes()
                        tracker.treat_as_host(st[key])

        optimizer.init_state = traced_init_state
        optimizer.update_step = lambda group, p, gindex, pindex: None

    def metrics(self) -> dict:
        return {"paged_state_bytes": self.paged_bytes} if self.active else {}




# --- mixed precision ----------------------------------------------------------------------------------

AUTOCAST_LISTS = ("AT_FORALL_LOWER_PRECISION_FP", "AT_FORALL_FP32", "AT_FORALL_FP32_SET_OPT_DTYPE",
                  "AT_FORALL_PROMOTE")
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def cuda_autocast_lists(header: str | None = None) -> dict[str, list[str]]:
    """CUDA's autocast op lists as the installed torch compiled them: the four macros of ATen/autocast_mode.h
    (autocast_mode.cpp expands them for the Autocast(CUDA) key; the CPU's lists are written out separately
    there). Each entry is `name` or `name.overload`."""
    import os
    import re

    path = header or os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "autocast_mode.h")
    with open(path) as fh:
        text = fh.read()
    out = {}
    for macro in AUTOCAST_LISTS:
        m = re.search(rf"#define {macro}\(_\)(.*?)(?:\n\s*\n|\n#)", text, re.S)
        if not m:
            raise RuntimeError(f"{path}: no {macro}: this torch's autocast lists cannot be read")
        out[macro] = [a + (f".{b}" if b else "") for a, b in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", m.group(1))]
    return out


def _op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


class CudaAutocastPolicy(Rule):
    """Fake CPU tensors follow CPU autocast (AutocastCPU key); CUDA's policy differs. This rule makes CPU
    autocast apply CUDA's, op by op, as autocast_mode.cpp does for the Autocast(CUDA) key.

    While active it registers a Python kernel at the AutocastCPU key for every op on CUDA's four lists (read
    from the installed ATen/autocast_mode.h) and a fallthrough for every op that has a CPU autocast kernel but
    no CUDA one (e.g. cross_entropy_loss, which CUDA leaves to its parts: a low-precision log_softmax is saved
    and nll_loss casts it to fp32). The kernels, as in autocast_mode.cpp:
    - lower precision (linear, addmm, matmul, bmm, conv2d, SDPA, ...): each eligible argument (floating point,
      not float64) not already in the autocast dtype is cast to it; a cast of an fp32 leaf that requires grad
      and is not a view (a weight) goes into the cast cache and is reused until the outermost autocast region
      exits (`cached_cast`, `clear_autocast_cache`): one low-precision copy per weight per region;
    - fp32 (layer_norm, native_layer_norm, nll_loss, ...): eligible arguments are cast to float32 (CPU
      autocast runs layer_norm in the input dtype);
    - fp32 with an optional dtype (softmax, log_softmax, sum, cumsum, ...): when the first argument is
      eligible and no dtype is given, dtype=float32 is passed;
    - promote (addcmul, index_put, ...): every eligible argument is cast to the widest of the autocast dtype
      and the arguments' dtypes.
    Ops with a CUDA autocast kernel outside the four lists (norm, binary_cross_entropy, cudnn_*, _cudnn_rnn)
    keep the CPU behaviour; none of them runs in a ViT. The kernels are removed when the rule's mode exits.
    """

    forward_only = True
    name = "cuda-autocast-policy"
    summary = ("autocast follows CUDA's op lists (autocast_mode.h), not the CPU's: low-precision matmuls/convs/"
               "SDPA with one cached cast per weight per region; layer_norm, softmax, nll_loss in fp32; "
               "cross_entropy_loss unlisted (its log_softmax is low precision)")
    source = "aten/src/ATen/autocast_mode.h AT_FORALL_*; aten/src/ATen/autocast_mode.cpp cached_cast, set_opt_dtype"
    emptied_each_step = ("cache",)  # the cast cache lives for one autocast region

    def __init__(self):
        self.cache: dict[int, tuple] = {}
        self.cache_hits = 0
        self.casts = 0

    # the policies ---------------------------------------------------------------------------------
    @staticmethod
    def eligible(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64

    def cast(self, t, dtype):
        if not self.eligible(t) or t.dtype == dtype:
            return t
        cacheable = (dtype == torch.get_autocast_dtype("cpu") and t.dtype == torch.float32 and t.requires_grad
                     and t.is_leaf and not t._is_view() and torch.is_autocast_cache_enabled())
        if cacheable:
            hit = self.cache.get(id(t))
            if hit is not None and hit[0] is t:
                self.cache_hits += 1
                return hit[1]
        out = t.to(dtype)
        self.casts += 1
        if cacheable:
            self.cache[id(t)] = (t, out)
        return out

    def _map(self, values, fn):
        return [[fn(u) for u in v] if isinstance(v, (list, tuple)) else fn(v) for v in values]

    def kernel(self, op, policy: str):
        dtype_arg = next(((i, a.kwarg_only) for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

        def run(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                if policy == "lower":
                    low = torch.get_autocast_dtype("cpu")
                    args = self._map(args, lambda t: self.cast(t, low))
                    kwargs = dict(zip(kwargs, self._map(kwargs.values(), lambda t: self.cast(t, low))))
                elif policy == "fp32":
                    args = self._map(args, lambda t: self.cast(t, torch.float32))
                    kwargs = dict(zip(kwargs, self._map(kwargs.values(), lambda t: self.cast(t, torch.float32))))
                elif policy == "fp32_set_opt_dtype":
                    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                    if self.eligible(first) and dtype_arg is not None:
                        i, kw_only = dtype_arg
                        if kw_only or i >= len(args):
                            kwargs = {**kwargs, "dtype": kwargs.get("dtype") or torch.float32}
                        elif args[i] is None:
                            args = list(args)
                            args[i] = torch.float32
                else:  # promote
                    widest = torch.get_autocast_dtype("cpu")
                    for t in [*args, *kwargs.values()]:
                        for u in t if isinstance(t, (list, tuple)) else (t,):
                            if self.eligible(u):
                                widest = torch.promote_types(widest, u.dtype)
                    args = self._map(args, lambda t: self.cast(t, widest))
                    kwargs = dict(zip(kwargs, self._map(kwargs.values(), lambda t: self.cast(t, widest))))
                return op(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def mode(self):
        lists = cuda_autocast_lists()
        policies = {"AT_FORALL_LOWER_PRECISION_FP": "lower", "AT_FORALL_FP32": "fp32",
                    "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype", "AT_FORALL_PROMOTE": "promote"}
        cuda_ops = {name: policies[macro] for macro, names in lists.items() for name in names}
        cpu_only = [n.removeprefix("aten::") for n in _cpu_autocast_ops()
                    if n.removeprefix("aten::") not in cuda_ops]
        lib = torch.library.Library("aten", "IMPL")
        original_clear = torch.clear_autocast_cache

        def clear():
            self.cache.clear()
            original_clear()

        try:
            with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
                warnings.simplefilter("ignore")
                for name, policy in cuda_ops.items():
                    lib.impl(name, self.kernel(_op(name), policy), "AutocastCPU")
                for name in cpu_only:
                    lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
            torch.clear_autocast_cache = clear
            yield
        finally:
            torch.clear_autocast_cache = original_clear
            self.cache.clear()
            lib._destroy()

    def metrics(self) -> dict:
        return {"autocast_casts": self.casts, "autocast_cache_hits": self.cache_hits}

    def idle(self) -> bool:
        return not self.casts and not self.cache_hits


_CPU_AUTOCAST_OPS: list[str] = []


def _cpu_autocast_ops() -> list[str]:
    """Every op with a CPU autocast kernel (from the dispatcher, once per process)."""
    if not _CPU_AUTOCAST_OPS:
        _CPU_AUTOCAST_OPS.extend(n for n in torch._C._dispatch_get_all_op_names()
                                 if n.startswith("aten::")
                                 and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU"))
    return _CPU_AUTOCAST_OPS


def math_composite(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """The math path op by op: aten's composite `_scaled_dot_product_attention_math`, its output."""
    return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                             scale=scale)[0]


def rng_state_on_device(seed) -> bool:
    """Whether flash attention's RNG state is a device tensor in the installed torch: since its "BC breaking
    change to flash seed/offset" (flash_api.cpp mha_fwd) the state is `rng_state`, 2 uint64 on the CUDA device,
    and `_unused`, 1 uint64 there too, both saved for the backward (two 512 B blocks per attention call); its
    shape function says so with a (2,) uint64 seed. Before (and on ROCm) they were host scalars (a () long)."""
    return isinstance(seed, torch.Tensor) and tuple(seed.shape) == (2,) and seed.dtype == torch.uint64


CUDNN_PREFERRED_ABOVE = 91500  # check_prefer_cudnn_attention: cudnnGetVersion() > 91500 (9.15.0 does not qualify)


def cudnn_preferred(cc, cudnn_version: int | None, torch_version: str = torch.__version__) -> bool:
    """Whether SDPA tries cuDNN attention first on a card of compute capability `cc` (sdp_utils.cpp
    check_prefer_cudnn_attention, read in the torch 2.11.0 and 2.14.1 cu130 wheels): an sm90 or sm100-family card,
    a runtime cuDNN newer than 9.15.0 (the wheels bundle 9.19.0 and 9.24.0) and TORCH_CUDNN_SDPA_DEPRIORITIZED
    unset; 2.11 also asks for minor 0 or 3 (2.14.1 does not; versions between are taken as 2.11). The order is
    then cudnn > flash > efficient > math."""
    if cc is None or cudnn_version is None or cudnn_version <= CUDNN_PREFERRED_ABOVE or cc[0] not in (9, 10):
        return False
    if os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return torch.torch_version.TorchVersion(torch_version) >= "2.14" or cc[1] in (0, 3)


CUDNN_UNKNOWN_NOTE = ("this torch has no cuDNN, so which attention kernel this sm90/sm100 card runs is unknown here: "
                      "torch's CUDA wheels bundle a cuDNN newer than 9.15 and run cuDNN attention; flash is predicted")


def cudnn_eligible(head_dim: int, kv_len: int, dropout_p: float) -> bool:
    """can_use_cudnn_attention's checks that a ViT can fail (sdp_utils.cpp; fp16/bf16 and 4-D are given here, a
    mask is allowed): enabled (torch.backends.cuda.enable_cudnn_sdp, sdpa_kernel), not under strict deterministic
    algorithms, head dim a multiple of 8 and at most 128 (the d256 path of newer cuDNN is not modelled: flash is
    predicted there), a key length other than 1, dropout a multiple of 1/16."""
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    return (torch.backends.cuda.cudnn_sdp_enabled() and not strict and head_dim % 8 == 0 and head_dim <= 128
            and kv_len != 1 and float(dropout_p * 16).is_integer())


class HalfPrecisionAttention(Rule):
    """Which kernel CUDA's scaled_dot_product_attention runs for fp16/bf16 inputs, from the card's compute
    capability and the installed torch's cuDNN (sdp_utils.cpp select_sdp_backend, order flash > efficient > math,
    or cudnn first where `cudnn_preferred`):
    - sm90/sm100 with cuDNN newer than 9.15: cuDNN attention where `cudnn_eligible`. Its meta function gives
      what it allocates (attention.cu _cudnn_attention_forward): the output laid out as q when q is dense, else
      contiguous [B, H, L, K] (alloc_with_matching_layout), an fp32 logsumexp [B, H, L, 1] when an input needs a
      gradient (the meta makes it always: un-counted otherwise), and philox seed and offset, two 8 B device
      tensors even without dropout (two 512 B blocks, saved for the backward). A bool mask becomes an additive
      one in the query's dtype first (attention.cpp convert_boolean_attn_mask_cudnn);
    - sm80 and newer: flash attention (fp16/bf16, no attention mask, head dim <= 256). It saves q, k, v, the
      output (laid out [B, L, H, K] like q) and an fp32 logsumexp [B, H, L] (its meta function gives both),
      plus its RNG state (on the device since torch's seed/offset change: `rng_state_on_device`);
    - older cards: the memory-efficient kernel for fp16 (as MemEfficientAttention does for fp32); bf16 is not
      among its dtypes below sm80 (less_than_sm80_mem_efficient_dtypes: half, float), so the math path runs,
      which upcasts q, k, v to fp32 and keeps fp32 scores and probabilities [B, H, L, S].
    Under autocast fp32 inputs are cast to the autocast dtype first (SDPA is on the lower-precision list).
    """

    forward_only = True
    acts_on = frozenset({aten._scaled_dot_product_flash_attention.default,
                         aten._scaled_dot_product_cudnn_attention.default})
    name = "half-precision-attention"
    summary = ("fp16/bf16 SDPA: cuDNN attention first on sm90/sm100 with cuDNN > 9.15, else flash on sm80+ (fp32 "
               "logsumexp [B,H,L]); below sm80 the memory-efficient kernel for fp16 and the math path (fp32 scores) "
               "for bf16")
    source = ("aten/src/ATen/native/transformers/cuda/sdp_utils.cpp; attention.cu _cudnn_attention_forward; "
              "torch/_meta_registrations.py flash and cuDNN attention")

    def __init__(self, device: DeviceProfile, cudnn_version: int | None = None):
        cc = device.compute_capability
        self.flash = cc is not None and cc >= (8, 0)
        version = torch.backends.cudnn.version() if cudnn_version is None else cudnn_version
        self.cudnn_first = cudnn_preferred(cc, version)
        self.cudnn_unknown = version is None and cc is not None and cc[0] in (9, 10)  # a torch built without cuDNN
        self.kernels: dict[str, int] = {}

    def backend(self, dtype, head_dim: int, masked: bool, kv_len: int = 2, dropout_p: float = 0.0,
                mask_grad: bool = False, four_d: bool = True) -> str:
        """The kernel CUDA selects, among those enabled (torch.nn.attention.sdpa_kernel and
        torch.backends.cuda.enable_cudnn_sdp / enable_flash_sdp / enable_mem_efficient_sdp switch them off; math
        is what is left, and all that takes q/k/v other than 4-D: `fused_shapes`)."""
        if not four_d:
            return "math"
        if self.cudnn_first and cudnn_eligible(head_dim, kv_len, dropout_p) and not mask_grad:
            # (a mask that requires grad, e.g. Swin's relative position bias: derivatives.yaml makes
            # _scaled_dot_product_cudnn_attention not differentiable in attn_bias, so it cannot be CUDA's choice)
            return "cudnn"
        if self.flash and not masked and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled():
            return "flash"
        if (dtype == torch.float16 or (self.flash and dtype == torch.bfloat16)) \
                and torch.backends.cuda.mem_efficient_sdp_enabled():
            return "efficient"
        return "math"

    @contextlib.contextmanager
    def mode(self):
        original = F.scaled_dot_product_attention

        @batched_3d
        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if query.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
                low = torch.get_autocast_dtype("cpu")
                query, key, value = (t.to(low) for t in (query, key, value))
            if query.dtype not in (torch.float16, torch.bfloat16) or enable_gqa:
                return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
            # SDPA's autocast kernel redispatches with autocast excluded: the kernel's own ops (the math path's
            # matmuls and softmax) run in the dtype they are given
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return self._run(query, key, value, attn_mask, dropout_p, is_causal, scale)

        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original

    def _run(self, query, key, value, attn_mask, dropout_p, is_causal, scale):
        kind = self.backend(query.dtype, query.size(-1), attn_mask is not None, key.size(-2), dropout_p,
                            attn_mask is not None and attn_mask.requires_grad, fused_shapes(query, key, value))
        self.kernels[kind] = self.kernels.get(kind, 0) + 1
        if kind == "cudnn":
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # where(~mask, -65504, 0) in q's dtype
                keep = attn_mask.logical_not()
                attn_mask = torch.zeros_like(keep, dtype=query.dtype).masked_fill_(keep, -65504.0)
                del keep
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return aten._scaled_dot_product_cudnn_attention(query, key, value, attn_mask, lse, dropout_p, is_causal,
                                                            False, scale=scale)[0]
        if kind == "flash":
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if kind == "efficient":
            return efficient_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)
        attn_mask = additive_mask(attn_mask, query.dtype)
        tracker = current_tracker()
        if tracker is not None and tracker.math_attention is not None:  # a shortcut stands for the composite
            return tracker.math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale)
        return math_composite(query, key, value, attn_mask, dropout_p, is_causal, scale)

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is aten._scaled_dot_product_cudnn_attention.default:
            if not args[4] and isinstance(out[1], torch.Tensor):  # compute_log_sumexp off: the kernel makes none
                tracker.treat_as_host(out[1])
            return
        if func is aten._scaled_dot_product_flash_attention.default and not rng_state_on_device(out[6]):
            for rng_state in out[6:8]:  # the older layout: host scalars unless dropout runs under a CUDA graph
                if isinstance(rng_state, torch.Tensor):
                    tracker.treat_as_host(rng_state)


    def idle(self) -> bool:
        return not self.kernels

    def metrics(self) -> dict:
        if not self.kernels:
            return {}
        out = {"attention_kernels": dict(sorted(self.kernels.items()))}
        if self.cudnn_unknown and "flash" in self.kernels:
            out["notes"] = [CUDNN_UNKNOWN_NOTE]
        return out


class FlashAttentionBackward(Rule):
    """What the flash backward allocates besides the gradients its shape function returns: contiguous copies
    of the incoming gradient and of the output, [B, L, H, D], where their transposes are strided
    (attention_backward.cu _flash_attention_backward: a batch above 1 under nn.MultiheadAttention); softmax_d,
    fp32 [B, H, ceil(L/128)*128], and the fp32 dq accumulator [B, ceil(L/128)*128, H, D rounded up to 32 (64
    when D > 128)] (flash_api.cpp mha_bwd); all are released when the op returns."""

    acts_on = frozenset({aten._scaled_dot_product_flash_attention_backward.default})
    name = "flash-attention-backward-temporaries"
    summary = ("the flash backward holds contiguous copies of a strided grad_out / out, fp32 softmax_d [B,H,L128] "
               "and dq_accum [B,L128,H,D32] while it runs")
    source = "aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp mha_bwd (unpinned copy)"

    def __init__(self):
        self.backwards = 0

    def idle(self) -> bool:
        return not self.backwards

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is not aten._scaled_dot_product_flash_attention_backward.default:
            return
        self.backwards += 1
        b, h, m, d = args[1].shape
        m128 = -(-m // 128) * 128
        d_round = -(-d // 64) * 64 if d > 128 else -(-d // 32) * 32
        # _flash_attention_backward (attention_backward.cu): "CUDA code assumes that dout is contiguous", so
        # grad_out.transpose(1, 2) and out.transpose(1, 2) are copied with .contiguous() where they are strided
        copies = [tracker.synthetic_alloc(t.numel() * t.element_size(), f"flash backward contiguous {name}")
                  for name, t in (("grad_out", args[0]), ("out", args[4])) if not _transposed_contiguous(t)]
        softmax_d = tracker.synthetic_alloc(b * h * m128 * 4, "flash backward softmax_d")
        dq_accum = tracker.synthetic_alloc(b * m128 * h * d_round * 4, "flash backward dq_accum")
        tracker.free_synthetic(dq_accum)
        tracker.free_synthetic(softmax_d)
        for sid in reversed(copies):
            tracker.free_synthetic(sid)


CUDNN_FORWARD_WORKSPACE_ESTIMATE = 1 << 20  # the engine's plan workspace: no source gives it (a guess)


class CudnnAttentionWorkspace(Rule):
    """What cuDNN attention's backward allocates besides the gradients its meta function returns
    (attention_backward.cu _cudnn_attention_backward, MHA.cpp run_cudnn_SDP_bprop): a contiguous copy of the
    incoming gradient only when its last stride is not 1 (permute_to_matching_layout; the output is never copied),
    and one caching-allocator workspace released when the op returns, whose cudnn-frontend part is exact: fp32
    dQ_accum [B, H, L, K] and softmax_sum [B, H, L] (CompositeSDPABackwardNode get_fe_workspace_size_node, no
    dBias, not deterministic). The engine's plan workspaces (forward and backward) cannot be known offline:
    predicted as 0, each call's estimate (forward 1 MiB; backward dQ_accum's size again) in `unmodelled` and the
    upper band, an estimate, not a guarantee."""

    acts_on = frozenset({aten._scaled_dot_product_cudnn_attention.default,
                         aten._scaled_dot_product_cudnn_attention_backward.default})
    name = "cudnn-attention-workspace"
    summary = ("cuDNN attention's backward holds fp32 dQ_accum [B,H,L,K] + softmax_sum [B,H,L] (and a copy of a "
               "grad_out whose last stride is not 1) while it runs; plan workspaces unmodelled, estimated")
    source = ("aten/src/ATen/native/transformers/cuda/attention_backward.cu _cudnn_attention_backward; "
              "aten/src/ATen/native/cudnn/MHA.cpp; cudnn-frontend scaled_dot_product_flash_attention.h")

    def __init__(self):
        self.estimate_bytes = 0
        self.calls = 0

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is aten._scaled_dot_product_cudnn_attention.default:
            self.calls += 1
            self.estimate_bytes = max(self.estimate_bytes, CUDNN_FORWARD_WORKSPACE_ESTIMATE)
            return
        grad_out, query = args[0], args[1]
        b, h, m, d = query.shape
        copy = tracker.synthetic_alloc(grad_out.numel() * grad_out.element_size(),
                                       "cudnn backward contiguous grad_out") if grad_out.stride(-1) != 1 else None
        workspace = tracker.synthetic_alloc(4 * b * h * m * (d + 1), "cudnn backward workspace (dQ_accum, softmax_sum)")
        tracker.free_synthetic(workspace)
        if copy is not None:
            tracker.free_synthetic(copy)
        self.estimate_bytes = max(self.estimate_bytes, 4 * b * h * m * d)

    def metrics(self) -> dict:
        if not self.calls:
            return {}
        return {"unmodelled": [{"what": f"cuDNN attention plan workspaces ({self.calls} calls; the engine cuDNN "
                                        "picks decides the size: an estimate, not a bound)",
                                "bound_bytes": self.estimate_bytes, "source": self.source}]}


def _transposed_contiguous(t: torch.Tensor) -> bool:
    """Whether t.transpose(1, 2) is contiguous (dimensions of size 1 impose nothing, as in c10's check), read
    from the sizes and strides alone (no op dispatched)."""
    sizes, strides = list(t.shape), list(t.stride())
    sizes[1], sizes[2], strides[1], strides[2] = sizes[2], sizes[1], strides[2], strides[1]
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class FakeGradScalerStep(Rule):
    """GradScaler's non-fused `step` reads found_inf with `.item()` to decide whether to step; fake tensors
    have no value. Here the step always runs (found_inf is zero, the case whose memory matters: a skipped
    step allocates a subset). Everything else of the scaler runs as written: its scale and growth tracker,
    inv_scale and found_inf scalars, the in-place unscale (_amp_foreach_non_finite_check_and_unscale_)."""

    name = "grad-scaler-fake-step"
    summary = "GradScaler.step on fake tensors assumes no inf/nan was found (.item() has no value); the rest runs"
    source = "torch/amp/grad_scaler.py _maybe_opt_step"

    def __init__(self):
        self.steps = 0

    def idle(self) -> bool:
        return not self.steps

    @contextlib.contextmanager
    def mode(self):
        from torch.amp import grad_scaler

        original = grad_scaler.GradScaler._maybe_opt_step

        def maybe_opt_step(scaler, optimizer, optimizer_state, *args, **kwargs):
            self.steps += 1
            return optimizer.step(*args, **kwargs)

        grad_scaler.GradScaler._maybe_opt_step = maybe_opt_step
        try:
            yield
        finally:
            grad_scaler.GradScaler._maybe_opt_step = original


def resize_storage(tracker, tensor: torch.Tensor, nbytes: int) -> None:
    """Count `tensor`'s just-registered storage at `nbytes` (a kernel allocates it in another dtype than the
    fake tensor's shape function says)."""
    sid = tracker.storage_id(tensor)
    if sid is not None:
        tracker.resize(sid, nbytes)


class LayerNormStatsFp32(Rule):
    """native_layer_norm's saved mean and rstd are float32 for fp16/bf16 inputs on CUDA (layer_norm_kernel.cu:
    acc_type of the input) and on the CPU when the weight's dtype differs from the input's (the mixed-type
    kernel, e.g. bf16 activations with fp32 weights under CPU autocast); the reference shape function used
    on fake tensors gives them the input's dtype. `on_cpu` applies the CPU condition, else CUDA's."""

    acts_on = frozenset({aten.native_layer_norm.default})
    name = "layer-norm-stats-fp32"
    summary = "layer_norm's saved mean/rstd are fp32 for half inputs on CUDA (and for mixed dtypes on the CPU)"
    source = "aten/src/ATen/native/cuda/layer_norm_kernel.cu; aten/src/ATen/native/cpu/layer_norm_kernel.cpp"

    def __init__(self, on_cpu: bool = False):
        self.on_cpu = on_cpu
        self.resized = 0

    def idle(self) -> bool:
        return not self.resized

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is not aten.native_layer_norm.default:
            return
        x, weight = args[0], args[2] if len(args) > 2 else None
        if x.dtype not in (torch.float16, torch.bfloat16):
            return
        if self.on_cpu and (weight is None or weight.dtype == x.dtype):
            return
        for stat in out[1:3]:
            if stat.dtype != torch.float32:
                self.resized += 1
                resize_storage(tracker, stat, stat.numel() * 4)


class CudaDeviceBranches(Rule):
    """Operations whose implementation depends on the device take CUDA's branch (memprof.simulation.branches).

    Fake CPU tensors make every CompositeImplicitAutograd body that asks `is_cuda()` take the CPU's branch, and an
    op whose CPU slot is a composite while CUDA has a kernel (`_fused_rms_norm`) decompose. While active, the
    rule registers each `branches.BRANCHES` kernel at the AutogradCPU key: training dropout runs the fused
    native_dropout (a 1-byte bool mask saved, not a mask of the input's dtype: Dropout.cpp), rms_norm the fused
    kernel and its own autograd node (layer_norm.cpp), fp16 softmax/log_softmax with dtype=float32 the
    half_to_float kernel (SoftMax.cpp), one_hot zeros + scatter_ (Onehot.cpp). After an op, what CUDA's shape
    function gives and the CPU's does not: log_sigmoid_forward keeps no buffer on CUDA (an empty tensor;
    LogSigmoid.cu), and native_batch_norm keeps its saved mean and inverse std in fp32 for a half input
    (Normalization.cu batch_norm_cuda: the accumulate type; cudnn_batch_norm: the weight's fp32). Every such
    difference, and each op audited and found alike, is listed in docs/device-branching-ops.md.
    """

    forward_only = True
    acts_on = frozenset({aten.log_sigmoid_forward.default, aten.native_batch_norm.default, aten.index.Tensor,
                         aten.embedding_dense_backward.default, aten._embedding_bag.default,
                         aten.grid_sampler_2d.default})
    name = "cuda-device-branches"
    summary = ("ops that branch on the device take CUDA's branch: training dropout keeps a 1-byte mask "
               "(native_dropout), rms_norm runs the fused kernel, fp16 softmax with dtype=float32 no fp32 copy, "
               "one_hot zeros+scatter_; log_sigmoid keeps no buffer, batch norm fp32 stats for half inputs")
    source = ("aten/src/ATen/native/Dropout.cpp dropout; layer_norm.cpp rms_norm_symint; SoftMax.cpp softmax; "
              "Onehot.cpp one_hot; cuda/LogSigmoid.cu; cuda/Normalization.cu batch_norm_cuda")

    def __init__(self):
        self.taken: dict[str, int] = {}  # branch -> times CUDA's branch was taken

    def _count(self, name: str) -> None:
        self.taken[name] = self.taken.get(name, 0) + 1

    @contextlib.contextmanager
    def mode(self):
        from memprof.simulation.branches import BRANCHES

        lib = torch.library.Library("aten", "IMPL")
        try:
            for branch in BRANCHES:
                lib.impl(branch.op, functools.partial(branch.kernel, self._count), "AutogradCPU")
            yield
        finally:
            lib._destroy()

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        if func is aten.log_sigmoid_forward.default:
            buffer = out[1]
            if buffer.numel():  # LogSigmoid.cu: the CUDA kernel returns `at::empty({0}, ...)` as its buffer
                self._count("log_sigmoid_forward")
                tracker.treat_as_host(buffer)
        elif func is aten.native_batch_norm.default:
            if args[0].dtype in (torch.float16, torch.bfloat16):
                for stat in out[1:3]:
                    if stat.dtype != torch.float32 and stat.numel():
                        self._count("native_batch_norm")
                        resize_storage(tracker, stat, stat.numel() * 4)
        elif func is aten.index.Tensor:
            # an index made on the host (a literal: lift_fresh, never counted) is copied to the device for the op
            for index in args[1]:
                if isinstance(index, torch.Tensor) and tracker.storage_id(index) is None and index.numel():
                    self._count("host index copied")
                    tracker.free_synthetic(tracker.synthetic_alloc(index.numel() * index.element_size(),
                                                                   "index copied to the device"))
        elif func is aten.grid_sampler_2d.default:
            if args[2] == 0 and args[3] == 0 and args[4]:  # bilinear, zeros, align_corners: cond_cudnn_grid_sampler
                self._count("grid_sampler_2d (cuDNN)")
        elif func in (aten.embedding_dense_backward.default, aten._embedding_bag.default):  # CUDA's bookkeeping, said
            self._count(func.__name__.split(".")[0])

    def idle(self) -> bool:
        return not self.taken

    def metrics(self) -> dict:
        from memprof.simulation.branches import NOTES

        if not self.taken:
            return {}
        notes = [NOTES[k] for k in self.taken if k in NOTES]
        return {"cuda_branches": dict(sorted(self.taken.items())), **({"notes": notes} if notes else {})}


RULES = {r.name: r for r in (CachingAllocator, ForeachOptimizer, HostLiterals, MemEfficientAttention,
                             CublasWorkspace, EfficientAttentionBackward, TimmForeachChunks, ConvWorkspaceBound,
                             InPlaceGradAccumulation, Bitsandbytes8bit, CudaAutocastPolicy, HalfPrecisionAttention,
                             FlashAttentionBackward, CudnnAttentionWorkspace, FakeGradScalerStep, LayerNormStatsFp32,
                             CudaDeviceBranches, IndexPutAccumulate)}


def cuda_rules(device: DeviceProfile, spec=None) -> list[Rule]:
    """Fresh rule instances for one simulated run of `spec` on `device` (several keep per-run state); the
    precision rules join only for a spec that trains in reduced precision, so fp32 runs list what they did."""
    rules = [CachingAllocator(), ForeachOptimizer(), HostLiterals(), MemEfficientAttention(),
             CublasWorkspace(device), EfficientAttentionBackward(device), TimmForeachChunks(device),
             ConvWorkspaceBound(), InPlaceGradAccumulation(), Bitsandbytes8bit(), CudaDeviceBranches(),
             IndexPutAccumulate()]
    precision = getattr(spec, "precision", "fp32")
    if precision != "fp32":
        attention = HalfPrecisionAttention(device)
        rules += [attention, FlashAttentionBackward(), LayerNormStatsFp32()]
        if attention.cudnn_first:
            rules.append(CudnnAttentionWorkspace())
    if precision.endswith("-amp"):
        rules.append(CudaAutocastPolicy())
    if precision == "fp16-amp":
        rules.append(FakeGradScalerStep())
    return rules
