"""The cuDNN workspaces of the ViT patch embedding, measured on the GPU at hand (the GPU check's first stage).

    python scripts/conv_probe.py [--out FILE]

Why: the predictions of Raschka's half-precision runs come in low by about one bf16 copy of the weights in reserved
memory (docs/reserved-half-precision.md), and the one allocation on their path whose size the source cannot give is
the workspace of the cuDNN convolution: with cudnn.benchmark off, torch runs the first engine cuDNN's heuristics
return and allocates that engine's workspace from the caching allocator for the length of the op
(aten/src/ATen/native/cudnn/Conv_v8.cpp: run_single_conv -> get_configs_from_heuristics -> try_configs ->
run_conv_plan, `CUDACachingAllocator::get()->allocate(plan.getWorkspaceSize())`). A transient larger than every free
block the cache holds makes a new segment that stays reserved, so a workspace of a few hundred MB would move
max_memory_reserved by about that much while leaving max_memory_allocated as it was.

What: for each problem (torchvision's conv_proj, Conv2d(3, E, kernel 16, stride 16) on 224x224 images: vit_b_16 at
batch 16 and vit_l_16 at batch 32, as the validation rows run them; bfloat16, float16 and float32 with TF32 as
torch's defaults leave cuDNN), the forward convolution and the weight-gradient backward (aten.convolution_backward
with the input gradient off: the images need none, as in training) are each run twice (the first call picks the
engine, the second reuses the cached plan), and what the op held beyond what it left allocated is read from the
caching allocator: max_memory_allocated after a peak reset, less memory_allocated once the op has returned. That
difference is the op's transients: the workspace, plus any copy cuDNN's layout needs. Prints (and with --out
writes) one JSON object: torch and cuDNN versions, the device, and the bytes per problem, op and call.
"""

from __future__ import annotations

import argparse
import json
import sys

PATCH = 16
IMAGE = 224
# (model, batch, embedding width E): torchvision vit_b_16 / vit_l_16 conv_proj, at the validation rows' batches
MODELS = (("vit_b_16", 16, 768), ("vit_l_16", 32, 1024))
DTYPES = ("bfloat16", "float16", "float32")


def problems() -> list[dict]:
    """Every (model, batch, width, dtype) the probe measures, with its tensors' shapes."""
    out = []
    for model, batch, width in MODELS:
        for dtype in DTYPES:
            out.append({"model": model, "batch": batch, "dtype": dtype,
                        "input": [batch, 3, IMAGE, IMAGE], "weight": [width, 3, PATCH, PATCH],
                        "output": [batch, width, IMAGE // PATCH, IMAGE // PATCH]})
    return out


def transient_bytes(torch, fn) -> tuple[int, object]:
    """What `fn()` held on the device beyond what it left allocated: (max_memory_allocated during the call less
    memory_allocated after it, its result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated(), result


def measure(problem: dict) -> dict:
    import torch

    dtype = getattr(torch, problem["dtype"])
    x = torch.randn(problem["input"], device="cuda", dtype=dtype)
    w = torch.randn(problem["weight"], device="cuda", dtype=dtype, requires_grad=False)
    b = torch.zeros(problem["weight"][0], device="cuda", dtype=dtype)
    stride, padding, dilation = [PATCH, PATCH], [0, 0], [1, 1]
    row = dict(problem)
    for call in (1, 2):
        fwd, y = transient_bytes(torch, lambda x=x, w=w, b=b: torch.nn.functional.conv2d(x, w, b, stride=PATCH))
        grad = torch.randn_like(y)
        del y
        wgrad, grads = transient_bytes(torch, lambda grad=grad, x=x, w=w: torch.ops.aten.convolution_backward(
            grad, x, w, [problem["weight"][0]], stride, padding, dilation, False, [0, 0], 1, [False, True, True]))
        del grads, grad
        row[f"forward_transient_bytes_call{call}"] = fwd
        row[f"wgrad_transient_bytes_call{call}"] = wgrad
    del x, w, b
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("conv_probe: no CUDA device here; the probe measures a real GPU's cuDNN (nothing to predict)",
              file=sys.stderr)
        return 2
    # the validation scripts' setting (matmul only; cuDNN's TF32 switch is left at torch's default, as there)
    torch.set_float32_matmul_precision("medium")
    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "device": torch.cuda.get_device_name(0), "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "problems": []}
    for problem in problems():
        try:
            report["problems"].append(measure(problem))
        except Exception as exc:  # one problem failing (an engine error) leaves the others measured
            report["problems"].append({**problem, "error": f"{type(exc).__name__}: {exc}"})
    text = json.dumps(report)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
