"""CUDA's branch of the operations whose implementation depends on the device, for fake CPU tensors.

The simulation runs on fake *CPU* tensors, so a CompositeImplicitAutograd function whose C++ body asks
`input.is_cuda()` (or the device type) takes the CPU's branch, and an op whose CPU slot is a composite while
CUDA has a kernel of its own decomposes. Each `Branch` here names such an op, the CUDA source it follows, and
a kernel that does what CUDA does, in aten ops: registered at the AutogradCPU key while the rule
`cuda-device-branches` (memprof.simulation.rules.CudaDeviceBranches) is active, it runs for fake tensors only
(real CPU tensors, e.g. a script's data, keep the CPU's own composite). The differences that live in a kernel's
shape function (a buffer CUDA does not allocate, statistics kept in fp32) are corrected after the op
(`CudaDeviceBranches.after_op`). docs/device-branching-ops.md (memprof.simulation.audit) lists every operation
audited, these among them, and tests/test_device_branches.py checks each kernel against the dispatch that fake
*CUDA* tensors take on the installed torch (forward only: fake CUDA tensors cannot run backward without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

aten = torch.ops.aten
_DK = torch._C.DispatchKey
_CIA = _DK.CompositeImplicitAutograd
# the autograd kernel CUDA runs (VariableType's, registered for AutogradCUDA), then below autograd the Python key,
# where the dispatch modes (the tracker, FakeTensorMode) take over; PythonTLSSnapshot first, whose fallback records
# the mode stack the Python key reads (torch 2.11 asserts it was taken: PythonFallbackKernel.cpp tls_on_entry)
_CUDA_AUTOGRAD = (torch._C.DispatchKeySet(_DK.AutogradCUDA) | torch._C.DispatchKeySet(_DK.Python)
                  | torch._C.DispatchKeySet(_DK.PythonTLSSnapshot))


def composite(op, *args, **kwargs):
    """The op's own CompositeImplicitAutograd kernel (the C++ body), as the CPU runs it."""
    return op._op_dk(_CIA, *args, **kwargs)


def simulated(t) -> bool:
    return isinstance(t, FakeTensor)


@dataclass(frozen=True)
class Branch:
    op: str  # aten name, with its overload (`softmax.int`)
    source: str
    cuda: str  # what CUDA does, in one line
    kernel: object = None  # (counter, *args, **kwargs) -> result; counter(name) counts a branch taken

    @property
    def overload(self):
        base, _, overload = self.op.partition(".")
        return getattr(getattr(aten, base), overload or "default")


def dropout(taken, input, p, train):
    """Dropout.cpp `dropout`: `if (input.is_nested() || (train && is_fused_kernel_acceptable(input, p)))
    return std::get<0>(at::native_dropout(input, p, train));` where is_fused_kernel_acceptable is
    `(is_cuda() || is_xpu() || is_lazy() || is_privateuseone()) && p > 0 && p < 1 && sym_numel() > 0`."""
    if simulated(input) and train and 0 < p < 1 and input.numel() > 0:
        taken("dropout")
        return aten.native_dropout(input, p, train)[0]
    return composite(aten.dropout.default, input, p, train)


def fused_rms_norm(taken, input, normalized_shape, weight=None, eps=None):
    """`_fused_rms_norm` has a CUDA kernel with its own autograd node (FusedRmsNormBackward0: saves the input,
    rstd in fp32 and the weight); on the CPU its slot is the composite (pow, mean, rsqrt, mul, with fp32 copies
    of a half input saved). rms_norm (layer_norm.cpp rms_norm_symint) calls it unless the input is channels-last
    or complex or the weight's dtype differs from the input's: those conditions stay with rms_norm's own body."""
    if simulated(input):
        taken("rms_norm")
        return aten._fused_rms_norm.default.redispatch(_CUDA_AUTOGRAD, input, normalized_shape, weight, eps)
    return composite(aten._fused_rms_norm.default, input, normalized_shape, weight, eps)


def _half_to_float(name, private):
    def kernel(taken, input, dim, dtype=None):
        """SoftMax.cpp softmax / log_softmax (int, dtype): `if (input_.is_cuda() && input_.scalar_type() == Half
        && dtype == Float) return at::_softmax(input_, dim_, true);` (half_to_float: no fp32 copy of the input)."""
        if simulated(input) and input.dtype == torch.float16 and dtype == torch.float32:
            taken(name)
            return private(input, dim, True)
        return composite(getattr(aten, name).int, input, dim, dtype)

    return kernel


def one_hot(taken, input, num_classes=-1):
    """Onehot.cpp `one_hot`: for a fake tensor (Python key) the installed torch runs a functional variant
    (arange, eq: a bool [..., C], then its int64 copy); a CUDA tensor runs `zeros(shape + [C])` and
    `scatter_(-1, self.unsqueeze(-1), 1)` with no `.item()` check of the values (only `num_classes >= 1`).
    num_classes=-1 reads `self.max().item()` on every device: left to the composite (data the simulation lacks)."""
    if simulated(input) and num_classes >= 1 and input.numel() > 0 and input.dtype == torch.long:
        taken("one_hot")
        out = torch.zeros((*input.shape, num_classes), dtype=input.dtype, device=input.device)
        return out.scatter_(-1, input.unsqueeze(-1), 1)
    return composite(aten.one_hot.default, input, num_classes)


def _rnn(name):
    def kernel(taken, *args, **kwargs):
        """RNN.cpp: on CUDA with cuDNN acceptable the recurrent ops run _cudnn_rnn (weights flattened, a reserve
        space sized by cuDNN at run time); the CPU runs mkldnn_rnn_layer or the cell-by-cell composite. Traced as
        the CPU runs it, and said (the rule's notes)."""
        if args and simulated(args[0]):
            taken(f"{name} (cuDNN not modelled)")
        return composite(getattr(aten, name).input, *args, **kwargs)

    return kernel


BRANCHES = (
    Branch("dropout", "aten/src/ATen/native/Dropout.cpp dropout, is_fused_kernel_acceptable",
           "training dropout (0 < p < 1, non-empty input) runs the fused native_dropout: a 1-byte bool mask is "
           "saved (NativeDropoutBackward0), not a mask of the input's dtype (MulBackward0)", dropout),
    Branch("_fused_rms_norm", "aten/src/ATen/native/layer_norm.cpp rms_norm_symint; "
                              "native_functions.yaml _fused_rms_norm (CUDA kernel; the CPU's is the composite)",
           "rms_norm runs the fused kernel: saves the input, rstd [.., 1] fp32 and the weight "
           "(FusedRmsNormBackward0), not the composite's pow/mean/rsqrt/mul (and fp32 copies of a half input)",
           fused_rms_norm),
    Branch("softmax.int", "aten/src/ATen/native/SoftMax.cpp softmax(input, dim, dtype)",
           "an fp16 input with dtype=float32 runs _softmax(half_to_float=True): no fp32 copy of the input",
           _half_to_float("softmax", aten._softmax)),
    Branch("log_softmax.int", "aten/src/ATen/native/SoftMax.cpp log_softmax(input, dim, dtype)",
           "an fp16 input with dtype=float32 runs _log_softmax(half_to_float=True): no fp32 copy of the input",
           _half_to_float("log_softmax", aten._log_softmax)),
    Branch("one_hot", "aten/src/ATen/native/Onehot.cpp one_hot",
           "zeros(int64 [..., C]) and scatter_, no min()/max() read back; the fake-tensor variant's bool "
           "[..., C] intermediate does not exist", one_hot),
    *(Branch(f"{name}.input", "aten/src/ATen/native/RNN.cpp (cudnn_is_acceptable: lstm_cudnn_stub); "
                              "native/cudnn/RNN.cpp _cudnn_rnn",
             "cuDNN's RNN: packed weights and a reserve space (cudnnGetRNNTempSpaceSizes) not known offline: traced "
             "as the CPU runs it and said in the record's notes", _rnn(name))
      for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")),
)

# what the rule says in a record's notes when the branch it counts was taken (CUDA behaviour it does not model)
NOTES = {
    "lstm (cuDNN not modelled)": "an LSTM ran as the CPU runs it; CUDA runs cuDNN (_cudnn_rnn), whose reserve space "
                                 "(cudnnGetRNNTempSpaceSizes) is not modelled",
    "gru (cuDNN not modelled)": "a GRU ran as the CPU runs it; CUDA runs cuDNN (_cudnn_rnn), whose reserve space is "
                                "not modelled",
    "rnn_tanh (cuDNN not modelled)": "an RNN ran as the CPU runs it; CUDA's cuDNN reserve space is not modelled",
    "rnn_relu (cuDNN not modelled)": "an RNN ran as the CPU runs it; CUDA's cuDNN reserve space is not modelled",
    "embedding_dense_backward": "embedding backward: CUDA sorts the indices first (int64 temporaries a few times the "
                                "indices' size, Embedding.cu), not modelled",
    "_embedding_bag": "embedding_bag: CUDA's int64 bookkeeping (offset2bag the indices' size) is sized as the CPU's",
    "grid_sampler_2d (cuDNN)": "grid_sample (bilinear, zeros, align_corners=True) runs cuDNN's sampler on CUDA: the "
                               "same outputs; contiguous copies of a strided input or grid are not modelled",
}
