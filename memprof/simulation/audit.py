"""The audit of device-dependent operations: for each, what CUDA does (with its source), what the simulation did
before and does now, and the check that holds it. docs/device-branching-ops.md is `render()`'s output
(`python -m memprof.simulation.audit > docs/device-branching-ops.md`); tests/test_device_audit.py fails when the
page differs from it, when a row names a rule that does not exist or a test that does not, and when a row's probe,
run forward on fake CUDA tensors (the dispatch the installed torch takes for CUDA) and on fake CPU tensors under
the rules, gives other allocations (and, for a rule's row, the same ones without the rule: its negative control).

Rows cover families; `ops` names the aten ops a trace shows for a family (what benchmarks/zoo_sweep.py matches a
trace's ops against). Ops outside every row are covered by the OpInfo scan (benchmarks/device_branch_scan.py,
its result in docs/device-branching-scan.json): an aten op seen only in OpInfo samples that dispatch alike on both
fake devices is `same`. Everything else a trace shows is reported unaudited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SCAN_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs",
                         "device-branching-scan.json")

# what a row concludes: the rule that makes the simulation take CUDA's branch; the same allocations on both
# devices (checked by a probe or a test); a bound in `unmodelled`; a note in the record; a one-line refusal
VERDICTS = ("rule", "same", "bound", "flag", "refused")


@dataclass(frozen=True)
class Row:
    family: str
    calls: str  # how models reach it
    cuda: str  # what CUDA does
    source: str  # PyTorch source of CUDA's behaviour
    before: str  # the simulation before this audit
    verdict: str
    check: str  # the rule's name (rule, bound, flag) or the test (tests/FILE::NAME) that holds the row
    ops: tuple = ()  # aten ops (name.overload) a trace of this family shows
    opinfo: tuple = ()  # OpInfo names the scan reports as differing that this row explains
    probe: str | None = None  # a name in PROBES: fake CUDA vs fake CPU under the rules
    dtypes: tuple = ("float32",)
    torch_2_11: str = "same"


ROWS = (
    Row("dropout", "F.dropout, nn.Dropout (timm drop_rate, torchvision dropout=, HF hidden_dropout_prob)",
        "training, 0<p<1, non-empty: the fused native_dropout, a 1-byte bool mask saved (NativeDropoutBackward0); "
        "backward one gradient-sized tensor", "aten/src/ATen/native/Dropout.cpp dropout, is_fused_kernel_acceptable",
        "CPU composite: empty_like + bernoulli_ + div_ + mul, a mask of the input's dtype saved (4x for fp32)",
        "rule", "cuda-device-branches", ("aten.native_dropout.default", "aten.native_dropout_backward.default"),
        ("nn.functional.dropout",), "dropout", ("float32", "bfloat16")),
    Row("dropout, in place", "F.dropout(inplace=True), nn.Dropout(inplace=True)",
        "the composite on every device (only `dropout` asks is_fused_kernel_acceptable): a mask of the input's dtype",
        "aten/src/ATen/native/Dropout.cpp dropout_", "the same composite", "same",
        "tests/test_device_branches.py::test_in_place_and_feature_dropout_are_alike_on_both_devices",
        ("aten.empty_like.default", "aten.bernoulli_.float", "aten.div_.Scalar", "aten.mul_.Tensor"),
        probe="dropout_"),
    Row("feature dropout", "F.dropout1d/2d/3d, nn.Dropout2d (feature_dropout)",
        "the composite on every device: a noise tensor [N, C, 1, ...] of the input's dtype",
        "aten/src/ATen/native/Dropout.cpp feature_dropout, make_feature_noise", "the same composite", "same",
        "tests/test_device_branches.py::test_in_place_and_feature_dropout_are_alike_on_both_devices",
        ("aten.new_empty.default", "aten.bernoulli_.float"), probe="dropout2d"),
    Row("alpha dropout", "F.alpha_dropout, F.feature_alpha_dropout (SELU nets)",
        "the composite on every device (noise and its affine b, input's dtype)",
        "aten/src/ATen/native/Dropout.cpp alpha_dropout, feature_alpha_dropout", "the same composite", "same",
        "tests/test_device_audit.py::test_probes_alike", probe="alpha_dropout"),
    Row("drop-path (stochastic depth)", "timm.layers.drop_path, torchvision StochasticDepth",
        "Python code: x.new_empty((B, 1, ...)).bernoulli_(keep), div_, x * mask; no device branch",
        "timm/layers/drop.py drop_path; torchvision/ops/stochastic_depth.py", "the same ops", "same",
        "tests/test_device_audit.py::test_probes_alike", ("aten.new_empty.default", "aten.bernoulli_.float",
                                                         "aten.div_.Scalar", "aten.mul.Tensor"), probe="drop_path"),
    Row("attention dropout", "F.scaled_dot_product_attention(dropout_p>0)",
        "the fused kernels draw the mask from a Philox seed/offset (no mask tensor); cuDNN needs p a multiple of 1/16",
        "aten/src/ATen/native/transformers/cuda/sdp_utils.cpp; attention.cu", "CPU flash kernel",
        "rule", "half-precision-attention", tuple(f"aten._scaled_dot_product_{k}_attention{b}.default"
                                                  for k in ("efficient", "flash", "cudnn") for b in ("", "_backward"))
        + ("aten._scaled_dot_product_attention_math.default",),
        ("nn.functional.scaled_dot_product_attention", "nn.functional.multi_head_attention_forward")),
    Row("batch norm, fp32 (and fp16 with fp32 weights)", "nn.BatchNorm*, F.batch_norm, instance_norm",
        "cudnn_batch_norm: output, save_mean / save_var (inverse std) fp32 [C], a reserve space sized by "
        "cudnnGetBatchNormalizationTrainingExReserveSpaceSize (0 in torch's meta function; not known offline, "
        "taken as 0); CudnnBatchNormBackward0 saves what the native node saves",
        "aten/src/ATen/native/Normalization.cpp _batch_norm_impl_index; native/cudnn/BatchNorm.cpp",
        "native_batch_norm: the same bytes (output, two fp32 [C])", "same",
        "tests/test_device_audit.py::test_batch_norm_fp32_keeps_what_cudnn_keeps",
        ("aten.native_batch_norm.default", "aten.native_batch_norm_backward.default", "aten.cudnn_batch_norm.default",
         "aten.cudnn_batch_norm_backward.default", "aten._native_batch_norm_legit_functional.default"),
        ("native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update", "nn.functional.batch_norm",
         "nn.functional.instance_norm"), "batch_norm", torch_2_11="same (cudnn_batch_norm, reserve from cuDNN)"),
    Row("batch norm, half input", "conv (bf16 under autocast) -> BatchNorm with fp32 weights; pure bf16 nets",
        "cuDNN is not used for bf16; batch_norm_cuda keeps save_mean / save_invstd in the accumulate type (fp32)",
        "aten/src/ATen/native/cuda/Normalization.cu batch_norm_cuda",
        "CPU kernel keeps them in the input's dtype", "rule", "cuda-device-branches",
        ("aten.native_batch_norm.default",), probe="batch_norm", dtypes=("bfloat16",)),
    Row("layer norm", "nn.LayerNorm, F.layer_norm (every ViT)",
        "native_layer_norm: mean / rstd [.., 1] in fp32 for half inputs (acc type); input dtype for fp32",
        "aten/src/ATen/native/cuda/layer_norm_kernel.cu", "CPU: stats in the input's dtype for half inputs",
        "rule", "layer-norm-stats-fp32", ("aten.native_layer_norm.default", "aten.native_layer_norm_backward.default"),
        ("native_layer_norm", "nn.functional.layer_norm"), "layer_norm", dtypes=("float32", "bfloat16")),
    Row("group norm", "nn.GroupNorm, F.group_norm (ConvNeXt-style, ResNet-GN)",
        "native_group_norm: mean / rstd [N, G] in the input's dtype on both devices",
        "aten/src/ATen/native/cuda/group_norm_kernel.cu; native/group_norm.cpp", "the same", "same",
        "tests/test_device_audit.py::test_probes_alike",
        ("aten.native_group_norm.default", "aten.native_group_norm_backward.default"), probe="group_norm",
        dtypes=("float32", "bfloat16")),
    Row("rms norm", "F.rms_norm, nn.RMSNorm (timm RmsNorm where torch has it)",
        "rms_norm calls _fused_rms_norm, which has a CUDA kernel and its own node (FusedRmsNormBackward0: input, "
        "rstd fp32, weight); channels-last, complex or a weight of another dtype take the composite",
        "aten/src/ATen/native/layer_norm.cpp rms_norm_symint; native_functions.yaml _fused_rms_norm",
        "the CPU slot of _fused_rms_norm is the composite: pow, mean, rsqrt, two muls saved (and fp32 copies of a "
        "half input)", "rule", "cuda-device-branches", ("aten._fused_rms_norm.default",
                                                        "aten._fused_rms_norm_backward.default"),
        ("nn.functional.rms_norm",), "rms_norm", ("float32", "bfloat16")),
    Row("softmax / log_softmax to fp32", "softmax(x, dim, dtype=torch.float32) on fp16 (autocast fp16's softmax)",
        "an fp16 input with dtype=float32 runs the half_to_float kernel: no fp32 copy of the input (bf16 is copied)",
        "aten/src/ATen/native/SoftMax.cpp softmax, log_softmax", "toType(float32) copy, then the kernel",
        "rule", "cuda-device-branches", ("aten._softmax.default", "aten._log_softmax.default",
                                         "aten._softmax_backward_data.default", "aten._log_softmax_backward_data.default"),
        ("_softmax_backward_data",), "softmax_h2f", ("float16",)),
    Row("cross-entropy", "F.cross_entropy (label smoothing too)",
        "cross_entropy_loss composite: log_softmax in the input's dtype, nll_loss; no device branch",
        "aten/src/ATen/native/LossNLL.cpp cross_entropy_loss", "the same", "same",
        "tests/test_device_audit.py::test_probes_alike", ("aten._log_softmax.default", "aten.nll_loss_forward.default",
                                                         "aten.nll_loss_backward.default"),
        probe="cross_entropy", dtypes=("float32", "bfloat16")),
    Row("log-sigmoid", "F.logsigmoid (SigLIP's loss, multilabel soft margin)",
        "log_sigmoid_forward returns an empty buffer on CUDA (the backward recomputes)",
        "aten/src/ATen/native/cuda/LogSigmoid.cu log_sigmoid_forward_cuda",
        "CPU keeps a buffer the input's size until the backward", "rule", "cuda-device-branches",
        ("aten.log_sigmoid_forward.default", "aten.log_sigmoid_backward.default"),
        ("nn.functional.logsigmoid", "nn.functional.multilabel_soft_margin_loss"), "logsigmoid"),
    Row("convolution", "nn.Conv*d (patch embeddings, CNNs)",
        "the same op (convolution / convolution_backward); cuDNN picks an engine whose workspace it allocates from "
        "the caching allocator inside the op", "aten/src/ATen/native/cudnn/Conv_v8.cpp try_plans",
        "the op's outputs only", "bound", "cudnn-conv-workspace-bound",
        ("aten.convolution.default", "aten.convolution_backward.default"), probe="conv2d",
        dtypes=("float32", "bfloat16")),
    Row("one_hot", "F.one_hot(t, num_classes)",
        "zeros int64 [..., C] and scatter_, no min()/max() read back (num_classes >= 1 checked); num_classes=-1 "
        "reads max().item() on every device", "aten/src/ATen/native/Onehot.cpp one_hot",
        "the fake-tensor variant: arange, eq (a bool [..., C]), an int64 copy", "rule", "tests/test_device_branches.py::test_one_hot_is_zeros_and_scatter",
        ("aten.zeros.default", "aten.scatter_.value")),
    Row("embedding", "nn.Embedding (text towers, token/position tables)",
        "forward: embedding (index_select), alike; backward: embedding_dense_backward sorts the indices (int64 "
        "temporaries of the indices' size) before accumulating", "aten/src/ATen/native/cuda/Embedding.cu",
        "the CPU's backward (no sort)", "flag", "cuda-device-branches",
        ("aten.embedding.default", "aten.embedding_dense_backward.default"), probe="embedding"),
    Row("embedding_bag", "nn.EmbeddingBag",
        "_embedding_bag keeps offset2bag [numel(indices)] and no max_indices (mode != max); int64 bookkeeping",
        "aten/src/ATen/native/cuda/EmbeddingBag.cu", "the CPU's bookkeeping sizes", "flag", "cuda-device-branches",
        ("aten._embedding_bag.default", "aten._embedding_bag_backward.default"), ("nn.functional.embedding_bag",)),
    Row("grid_sample", "F.grid_sample (deformable attention, STNs)",
        "bilinear, zeros padding, align_corners=True, 4-D and cuDNN acceptable: cudnn_grid_sampler (outputs of the "
        "same sizes; contiguous copies of strided input and grid); otherwise grid_sampler_2d as on the CPU",
        "aten/src/ATen/native/GridSampler.cpp grid_sampler, cond_cudnn_grid_sampler",
        "grid_sampler_2d", "flag", "cuda-device-branches",
        ("aten.grid_sampler_2d.default", "aten.grid_sampler_2d_backward.default"), ("nn.functional.grid_sample",)),
    Row("interpolate", "F.interpolate (bilinear, bicubic, antialias), nn.Upsample",
        "upsample_* ops, alike on both devices", "aten/src/ATen/native/UpSample*.cpp; cuda/UpSample*.cu",
        "the same", "same", "tests/test_device_audit.py::test_probes_alike",
        ("aten.upsample_bilinear2d.vec", "aten.upsample_bicubic2d.vec", "aten._upsample_bicubic2d_aa.default",
         "aten.upsample_nearest2d.vec", "aten.upsample_nearest2d.default"), probe="interpolate"),
    Row("ctc_loss", "F.ctc_loss",
        "cuDNN's CTC when its conditions hold (int32 targets on the host, blank 0, ...), else _ctc_loss; both size "
        "their buffers from the target lengths' values", "aten/src/ATen/native/LossCTC.cpp ctc_loss; "
        "native/cudnn/LossCTC.cpp", "data-dependent output on fake tensors", "refused",
        "tests/test_device_audit.py::test_ctc_loss_is_refused_in_one_line", ("aten._ctc_loss.default",)),
    Row("RNN / LSTM / GRU", "nn.LSTM, nn.GRU, nn.RNN",
        "cuDNN (_cudnn_rnn): weights flattened into one buffer, a reserve space for the backward sized by "
        "cudnnGetRNNTempSpaceSizes (not known offline)", "aten/src/ATen/native/RNN.cpp (lstm_cudnn_stub); "
        "native/cudnn/RNN.cpp _cudnn_rnn", "the CPU's mkldnn_rnn_layer (LSTM) or cell-by-cell composite (GRU, RNN)",
        "flag", "cuda-device-branches", ("aten.mkldnn_rnn_layer.default",)),
    Row("activations", "gelu (tanh too), silu / hardswish / mish, in place or not",
        "elementwise kernels, the same outputs and saved tensors on both devices",
        "aten/src/ATen/native/Activation.cpp", "the same", "same", "tests/test_device_audit.py::test_probes_alike",
        ("aten.gelu.default", "aten.gelu_backward.default", "aten.silu.default", "aten.silu_.default",
         "aten.silu_backward.default", "aten.hardswish.default", "aten.mish.default"), probe="activations",
        dtypes=("float32", "bfloat16")),
    Row("linear / matmul", "nn.Linear, @ on 3-D inputs", "matmul folds batch dims into mm/addmm on both devices; "
        "cuBLAS keeps a workspace per handle and stream", "aten/src/ATen/native/LinearAlgebra.cpp matmul; "
        "aten/src/ATen/cuda/CublasHandlePool.cpp", "the same ops, no workspace", "rule", "cublas-workspace",
        ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten._unsafe_view.default"), probe="linear",
        dtypes=("float32", "bfloat16")),
    Row("optimizer step", "torch.optim Adam/AdamW/SGD (foreach=None, fused=None), timm's optimizers",
        "CUDA parameters take the foreach implementation (multi-tensor kernels; full-size temporaries such as "
        "sqrt(exp_avg_sq)); fused only when asked", "torch/optim/optimizer.py _default_to_fused_or_foreach",
        "fake CPU parameters took the for-loop", "rule", "foreach-optimizer", ("aten._foreach_*", "aten._fused_*")),
    Row("pooling, shuffles, reductions", "max/avg/adaptive pooling, pixel_shuffle, topk, cumsum, unfold / fold "
        "(col2im, also unfold's backward), reflection padding, roll, gather, normalize, cdist, BCE with logits", "the same ops on both devices",
        "aten/src/ATen/native (OpInfo scan)", "the same", "same", "tests/test_device_audit.py::test_probes_alike",
        ("aten.max_pool2d_with_indices.default", "aten.max_pool2d_with_indices_backward.default",
         "aten._adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d_backward.default",
         "aten.avg_pool2d.default", "aten.avg_pool2d_backward.default", "aten.col2im.default",
         "aten.reflection_pad2d.default", "aten.reflection_pad2d_backward.default"), probe="pooling"),
    Row("elementwise arithmetic and comparisons", "addcmul (timm's LayerScale / optimizers' Python code), ~mask, "
        "clamp, x // y (div rounding_mode), x > 0, x >= 0, 2 ** x, 1 - x, ReLU's backward (threshold_backward), "
        "arange(start, end) (position ids made on the device)",
        "TensorIterator kernels: one output of the broadcast shape and promoted dtype on both devices, no workspace; "
        "autograd saves what derivatives.yaml names, device-independent",
        "aten/src/ATen/native/PointwiseOps.cpp, BinaryOps.cpp, UnaryOps.cpp, TensorCompare.cpp, Activation.cpp "
        "(threshold_backward); cuda/*.cu kernels", "the same", "same", "tests/test_device_audit.py::test_probes_alike",
        ("aten.addcmul.default", "aten.bitwise_not.default", "aten.clamp.default", "aten.div.Tensor_mode",
         "aten.gt.Scalar", "aten.ge.Scalar", "aten.pow.Scalar", "aten.rsub.Scalar", "aten.threshold_backward.default",
         "aten.arange.start"),
        probe="elementwise", dtypes=("float32", "bfloat16")),
    Row("index_put, accumulate", "the backward of advanced indexing (IndexBackward0: a relative-position bias "
        "table gathered by an index, Swin / SAM / BEiT / TinyViT), x.index_put_(idx, v, accumulate=True)",
        "accumulate=True takes index_put_with_sort_kernel: linear index, arange, sorted and original indices (int64 "
        "x N) and cub radix-sort alternate buffers (2 x 8N), released when the op returns; without accumulate the "
        "TensorIterator kernel as on the CPU", "aten/src/ATen/native/cuda/Indexing.cu index_put_with_sort_kernel; "
        "native/TensorAdvancedIndexing.cpp index_put_impl_", "the CPU's in-place accumulation: no temporaries",
        "rule", "index-put-accumulate-sort", ("aten.index_put.default", "aten.index_put_.default",
                                              "aten._unsafe_index_put.default", "aten._index_put_impl_.default")),
    Row("attention on q/k/v other than 4-D", "F.scaled_dot_product_attention on [B*H, L, K] (SAM) or "
        "[B, H, windows, L, K] (NesT, Hiera)", "every fused kernel requires 4-D q/k/v (check_tensor_shapes): 5-D "
        "runs the math path; 3-D gets a singleton batch dimension first where the front end has "
        "normalize_unbatched_input (torch 2.14; math on 2.11); a bool mask becomes additive first (every kernel "
        "but cuDNN)", "aten/src/ATen/native/transformers/sdp_utils_cpp.h check_tensor_shapes, "
        "normalize_unbatched_input; attention.cpp scaled_dot_product_attention",
        "the fused ops were called on any rank (their shape functions read [B, H, L, K]: wrong shapes, errors)",
        "rule", "tests/test_zoo_rules.py::test_non_4d_attention_is_the_math_path_as_on_the_cpu",
        torch_2_11="3-D: the math path"),
    Row("an index made on the host", "x[torch.tensor([...])] (a literal index)",
        "the index is copied to the device (one block of 512 B or a few)", "aten/src/ATen/native/TensorAdvancedIndexing.cpp",
        "host literal, not counted", "rule", "cuda-device-branches", ("aten.index.Tensor",),
        ("masked.sum", "masked.prod", "masked.amax", "masked.amin", "masked.argmax", "masked.argmin", "masked.mean",
         "masked.median", "masked.norm", "masked.softmax", "masked.log_softmax", "masked.softmin", "masked.logaddexp",
         "masked.logsumexp")),
)

def _probes():
    """name -> fn(device, dtype): a small forward of the family, on fake tensors of `device` (made inside)."""
    import torch
    import torch.nn.functional as F

    def t(d, dt, *shape):
        return torch.randn(*shape, device=d, dtype=dt, requires_grad=True) * 1  # not a leaf: in place allowed

    def drop_path(d, dt):
        from timm.layers import drop_path as timm_drop_path
        return timm_drop_path(t(d, dt, 4, 16, 32), 0.1, True)

    def batch_norm(d, dt):
        return F.batch_norm(t(d, dt, 4, 16, 8, 8), torch.zeros(16, device=d), torch.ones(16, device=d),
                            torch.ones(16, device=d, requires_grad=True), torch.zeros(16, device=d, requires_grad=True),
                            training=True)

    def affine(d, dt, n):
        return torch.ones(n, device=d, dtype=dt, requires_grad=True), torch.zeros(n, device=d, dtype=dt,
                                                                                  requires_grad=True)

    return {
        "dropout": lambda d, dt: F.dropout(t(d, dt, 64, 128), 0.1),
        "dropout_": lambda d, dt: F.dropout(t(d, dt, 64, 128), 0.1, inplace=True),
        "dropout2d": lambda d, dt: F.dropout2d(t(d, dt, 4, 16, 8, 8), 0.1),
        "alpha_dropout": lambda d, dt: (F.alpha_dropout(t(d, dt, 64, 128), 0.1, True),
                                        F.feature_alpha_dropout(t(d, dt, 4, 16, 8), 0.1, True)),
        "drop_path": drop_path,
        "batch_norm": batch_norm,
        "layer_norm": lambda d, dt: F.layer_norm(t(d, dt, 4, 197, 64), (64,), *affine(d, dt, 64)),
        "group_norm": lambda d, dt: F.group_norm(t(d, dt, 4, 16, 8, 8), 4, *affine(d, torch.float32, 16)),
        "rms_norm": lambda d, dt: F.rms_norm(t(d, dt, 4, 197, 64), (64,), affine(d, dt, 64)[0]),
        "softmax_h2f": lambda d, dt: (torch.softmax(t(d, dt, 8, 64), -1, dtype=torch.float32),
                                      torch.log_softmax(t(d, dt, 8, 64), -1, dtype=torch.float32)),
        "cross_entropy": lambda d, dt: F.cross_entropy(t(d, dt, 8, 10), torch.zeros(8, dtype=torch.long, device=d),
                                                       label_smoothing=0.1),
        "logsigmoid": lambda d, dt: F.logsigmoid(t(d, dt, 64, 128)),
        "conv2d": lambda d, dt: F.conv2d(t(d, dt, 2, 3, 32, 32), t(d, dt, 8, 3, 4, 4), stride=4),
        "embedding": lambda d, dt: F.embedding(torch.zeros(4, 8, dtype=torch.long, device=d), t(d, dt, 100, 16)),
        "interpolate": lambda d, dt: (F.interpolate(t(d, dt, 2, 3, 8, 8), scale_factor=2, mode="bilinear"),
                                      F.interpolate(t(d, dt, 2, 3, 8, 8), size=(5, 5), mode="bicubic", antialias=True),
                                      F.interpolate(t(d, dt, 2, 3, 8, 8), scale_factor=2, mode="nearest")),
        "elementwise": lambda d, dt: (torch.addcmul(t(d, dt, 8, 64), t(d, dt, 8, 64), t(d, dt, 8, 64), value=0.5),
                                      ~(t(d, dt, 8, 64) > 0), t(d, dt, 8, 64).clamp(-1, 1),
                                      torch.div(t(d, dt, 8, 64), t(d, dt, 8, 64), rounding_mode="floor"),
                                      torch.pow(2.0, t(d, dt, 8, 64)), 1 - t(d, dt, 8, 64),
                                      torch.ops.aten.threshold_backward(t(d, dt, 8, 64), t(d, dt, 8, 64), 0.0),
                                      t(d, dt, 8, 64) >= 0, torch.arange(2, 66, device=d)),
        "activations": lambda d, dt: (F.gelu(t(d, dt, 8, 64), approximate="tanh"), F.silu(t(d, dt, 8, 64), inplace=True),
                                      F.hardswish(t(d, dt, 8, 64)), F.mish(t(d, dt, 8, 64)), F.gelu(t(d, dt, 8, 64))),
        "linear": lambda d, dt: (F.linear(t(d, dt, 2, 5, 8), t(d, dt, 4, 8), t(d, dt, 4)), t(d, dt, 2, 5, 8) @ t(d, dt, 8, 4)),
        "pooling": lambda d, dt: (F.max_pool2d(t(d, dt, 2, 3, 8, 8), 2), F.adaptive_avg_pool2d(t(d, dt, 2, 3, 8, 8), 1),
                                  F.avg_pool2d(t(d, dt, 2, 3, 8, 8), 2), F.pixel_shuffle(t(d, dt, 2, 4, 8, 8), 2),
                                  torch.topk(t(d, dt, 4, 8), 3)[0], torch.cumsum(t(d, dt, 4, 8), -1),
                                  F.unfold(t(d, dt, 2, 3, 8, 8), 3), F.fold(t(d, dt, 2, 27, 36), (8, 8), 3),
                                  F.pad(t(d, dt, 2, 3, 8, 8), (1, 1, 1, 1), mode="reflect"),
                                  torch.roll(t(d, dt, 2, 3, 8, 8), 1, 2),
                                  F.normalize(t(d, dt, 4, 8), dim=-1),
                                  F.binary_cross_entropy_with_logits(t(d, dt, 4, 8), torch.rand(4, 8, device=d))),
    }


PROBES = _probes()

# OpInfo entries the scan finds device-dependent that no training step of a vision model reaches: named, not audited
NOT_IN_TRAINING = {
    "sparse.sampled_addmm": "sparse CSR: CUDA only",
    "sparse.mm.reduce": "sparse CSR matmul reductions",
    "geqrf": "QR (linear algebra, MAGMA/cuSOLVER)",
    "ormqr": "QR (linear algebra)",
    "histogram": "CPU only",
    "histogramdd": "CPU only",
    "to_sparse": "sparse layouts",
}


def rows_by_verdict() -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {v: [] for v in VERDICTS}
    for row in ROWS:
        out[row.verdict].append(row)
    return out


def read_scan(path: str = SCAN_FILE) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def audited_ops(scan: dict | None = None) -> dict[str, str]:
    """aten op (name.overload, as a trace's origin writes it; a row may end a name with `*`) -> the row that covers
    it, or `same (OpInfo scan)`."""
    scan = read_scan() if scan is None else scan
    out = {op: "same (OpInfo scan)" for op in scan["same"]}
    for row in ROWS:
        for op in row.ops:
            out[op] = row.family
    return out


def _forward_of(op: str) -> str | None:
    """`aten.x_backward.overload` -> `aten.x` (the backward of an op whose forward is audited follows it: autograd's
    formula is the same on both devices, its kernel's own outputs come from its shape function)."""
    name = op.split(".")[1] if op.count(".") >= 2 else ""
    for suffix in ("_backward_data", "_backward"):
        if name.endswith(suffix):
            return f"aten.{name[:-len(suffix)]}"
    return None


def unaudited(ops, scan: dict | None = None) -> list[str]:
    """The ops of a trace (`aten.x.overload` strings; anything else, e.g. a rule's workspace, is ignored) that no
    row and no alike op of the scan covers; a backward is covered by its forward."""
    covered = audited_ops(scan)
    prefixes = tuple(op[:-1] for op in covered if op.endswith("*"))
    bases = {op.rsplit(".", 1)[0] for op in covered}

    def audited(op):
        forward = _forward_of(op)
        return op in covered or op.startswith(prefixes) or (forward is not None and forward in bases)

    return sorted({op for op in ops if op.startswith("aten.") and not audited(op)})


def render(scan: dict | None = None) -> str:
    """docs/device-branching-ops.md."""
    scan = read_scan() if scan is None else scan
    lines = [
        "# Operations whose CUDA implementation differs from the CPU's",
        "",
        "Generated by `python -m memprof.simulation.audit > docs/device-branching-ops.md` from "
        "`memprof/simulation/audit.py`; `tests/test_device_audit.py` fails when this page, a rule or a probe drifts.",
        "",
        "The simulation runs on fake CPU tensors: a composite whose C++ body asks `is_cuda()` takes the CPU's branch, "
        "an op whose CPU slot is a composite decomposes, a shape function may size an output by device. Each row: what "
        "CUDA does (torch 2.14.1; the source named), what the simulation did before, and what holds it now: a rule "
        "(`memprof/simulation/rules.py`), the same allocations on both devices (a probe run forward on fake CUDA and "
        "fake CPU tensors under the rules, or a test by hand-computed bytes), a bound in the record's `unmodelled`, a "
        "note in the record's `notes`, or a one-line refusal. Probes and tests with a rule also run without it "
        "(negative control). Fake CUDA tensors run forward only: backward and kernel-internal allocations (workspaces, "
        "reserve spaces) come from the source.",
        "",
        "| family | reached by | CUDA (source) | before | now | held by | torch 2.11 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        check = f"`{row.check}`" if row.check else ""
        probe = f" (probe `{row.probe}`, {'/'.join(row.dtypes)})" if row.probe else ""
        lines.append(f"| {row.family} | {row.calls} | {row.cuda} (`{row.source}`) | {row.before} | **{row.verdict}** "
                     f"| {check}{probe} | {row.torch_2_11} |")
    differ = scan["differ"]
    lines += [
        "",
        "## Every other op: the OpInfo scan",
        "",
        f"`benchmarks/device_branch_scan.py` runs the first two samples of every OpInfo in torch's own database "
        f"(torch {scan['torch']}, {', '.join(scan['dtypes'])}) forward on fake CPU and fake CUDA tensors and compares "
        f"the aten ops dispatched with their outputs' dtypes and shapes: {len(scan['same'])} aten ops appear only in "
        f"samples alike on both devices (`docs/device-branching-scan.json`, `same`). {len(differ)} OpInfo entries "
        f"differ; each is explained by a row above or named here as outside a vision model's training step. "
        f"{len(scan.get('errors', []))} raise on both fake devices (data-dependent outputs: `nonzero`, `unique`, "
        f"`.item()`; a trace that reaches one is refused in one line), {len(scan.get('host-scalar', []))} differ only by "
        "a 0-dim host operand copied to the device (at most one 512 B block, which the tracker counts as host memory).",
        "",
    ]
    explained = {name: row.family for row in ROWS for name in row.opinfo}
    for entry in sorted(differ):
        base = entry.rsplit(" (", 1)[0]
        why = explained.get(base) or NOT_IN_TRAINING.get(base) or "UNEXPLAINED"
        lines.append(f"- `{entry}`: {why}")
    lines += ["", "A trace's op that no row names and the scan did not find alike is reported unaudited by "
                  "`benchmarks/zoo_sweep.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
