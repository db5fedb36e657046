"""The micro-batch training steps every backend runs: one code path, so what is predicted is what runs.

`prepare` builds the model for a spec (open_clip tower + head), applies gradient checkpointing and
freeze-embed, and checks pretrained weights; `train_steps` runs the steps. Backends wrap these: the
simulation under fake tensors with a tracker, real backends on a device.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from memprof import contrastive
from memprof.errors import UsageError
from memprof.model_sources.base import classification_loss
from memprof.models import (build_text_tower, build_model, check_pretrained, freeze_embedding, input_shape,
                            read_pretrained, resolve_model, train_only)
from memprof.optims import OptimInfo, REGISTRY as OPTIMS, step as optim_step
from memprof.spec import AMP_DTYPES, MODEL_DTYPES, RunSpec
from memprof.vocabulary import Phase


@dataclass
class Prepared:
    model: torch.nn.Module
    optim_info: OptimInfo
    frozen: list[str]
    pretrained_state: dict | None = None


def prepare(spec: RunSpec, load_weights: bool = True) -> Prepared:
    """Model for `spec` on the current default device, in train mode, embedding frozen if the optimizer asks.

    With `load_weights=False` pretrained weights are only checked against the architecture (the
    simulation: weights do not change memory).
    """
    if spec.objective != "classify":  # both CLIP towers, open_clip's loss (memprof.contrastive)
        model, frozen = contrastive.prepare(spec, OPTIMS[spec.optim])
        return Prepared(model, OPTIMS[spec.optim], frozen)
    info = resolve_model(spec.model, False, spec.freeze, spec.input_shape)  # backends check their own names
    optim = OPTIMS[spec.optim]
    model = build_model(info, spec.num_classes)
    state = None
    if spec.pretrained:
        state = read_pretrained(info, spec.pretrained)
        check_pretrained(model, state, spec.pretrained)
        if load_weights:
            model.visual.load_state_dict(state)
    if spec.grad_ckpt:
        model.visual.set_grad_checkpointing(True)
    if spec.resident == "clip":  # on the device with the model, frozen, never called
        model.text = build_text_tower(info)
    model.train()
    frozen = freeze_embedding(model, info) if optim.freeze_embed else []
    if spec.train != "all":  # partial fine-tuning: the rest gets no gradient (and so no optimizer state)
        frozen = sorted({*frozen, *train_only(model, info, spec.train)})
    if spec.peft != "off":  # peft's adapters: the base weights frozen, the adapters and the head train
        from memprof.adapters import apply_peft

        frozen = apply_peft(model, info, spec)
    return Prepared(model, optim, frozen, state)


def load_visual(model, state: dict) -> None:
    """The network's pretrained weights into a model, peft's adapters or not: a weight peft wrapped
    (`attn.base_layer.in_proj_weight`) takes the file's `attn.in_proj_weight`; the adapters keep their own."""
    own = model.visual.state_dict()
    if set(own) == set(state):
        model.visual.load_state_dict(state)
        return
    renamed = {k: state[k.replace(".base_layer.", ".")] for k in own if k.replace(".base_layer.", ".") in state}
    model.visual.load_state_dict(renamed, strict=False)


def materialize(model, device) -> None:
    """Give a model built on the meta device real storage on `device`, in `Module.to` order, and initialise it
    in place (each module's reset_parameters; N(0, 0.02) for bare parameters): no allocation beyond the
    parameters themselves, unlike building on the device (init temporaries) or on the CPU (minutes for
    ViT-H/14)."""
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


def model_dtype(spec: RunSpec) -> torch.dtype:
    """The dtype of weights, gradients and optimizer state: bfloat16 for `bf16`, else float32 (AMP keeps fp32
    master weights)."""
    return getattr(torch, MODEL_DTYPES.get(spec.precision, "float32"))


def autocast_dtype(spec: RunSpec) -> torch.dtype | None:
    name = AMP_DTYPES.get(spec.precision)
    return getattr(torch, name) if name else None


def apply_precision(model, spec: RunSpec) -> None:
    """Cast the model's floating-point parameters and buffers to its training dtype (only `bf16` changes
    anything), before anything is counted; each parameter keeps its requires_grad. (Rebinding instead of
    Module.to: fake parameters that a tracer holds weak references to cannot be swapped in place.)"""
    dtype = model_dtype(spec)
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point():
                    module._parameters[name] = torch.nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point():
                    module._buffers[name] = b.to(dtype)


def grad_scaler(spec: RunSpec, device):
    """torch.amp.GradScaler for fp16-amp (its scale tensors are created lazily, inside the first step), else None."""
    if spec.precision != "fp16-amp":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def train_steps(model, optimizer, spec: RunSpec, device, on_phase) -> None:
    """`spec.steps` steps at micro-batch `spec.batch_size`: a fresh batch is created on the device (in the
    model's dtype), forward and cross-entropy (under torch.autocast for *-amp), backward (of the scaled loss
    with fp16-amp's GradScaler, made here), optimizer step (scaler.step and scaler.update with one),
    zero_grad(set_to_none=True). `on_phase(name, step)` is called as each of forward / backward / optimizer
    begins, and once with "done" at the end. With optimizer-in-backward (`optimizer` an optims.InBackward)
    parameters are stepped and their gradients freed inside backward, so there is no optimizer phase and
    nothing left to zero. With `spec.grad_accum` N > 1 each optimizer step is N micro-steps (a fresh batch, forward
    and backward each, the gradients accumulating), then the step and the clear. The steps run through `run_steps`,
    the same path a user's own step function takes (memprof.api.predict_step).
    """
    if spec.objective != "classify":  # memprof.contrastive: image-text pairs, open_clip's loss
        batch, step = contrastive.steps(model, spec, device, autocast_dtype(spec), grad_scaler(spec, device),
                                        model_dtype(spec), getattr(optimizer, "optimizers", None) is not None)
        return run_steps(model, optimizer, batch, step, spec.steps, on_phase, grad_accum=spec.grad_accum)
    c, h, w = input_shape(model)
    device_type = torch.device(device).type
    step = functools.partial(classification_step, amp=autocast_dtype(spec), scaler=grad_scaler(spec, device),
                             device_type=device_type, in_backward=getattr(optimizer, "optimizers", None) is not None,
                             clear_grads=spec.clear_grads)

    def batch():
        return (torch.randn(spec.batch_size, c, h, w, device=device, dtype=model_dtype(spec)),
                torch.randint(0, spec.num_classes, (spec.batch_size,), device=device))

    run_steps(model, optimizer, batch, step, spec.steps, on_phase, grad_accum=spec.grad_accum)


def classification_step(model, optimizer, inputs, amp=None, scaler=None, device_type: str = "cpu",
                        in_backward: bool = False, clear_grads: str = "after-step", micro: int = 0,
                        micro_steps: int = 1):
    """One step of the paper's fine-tuning: forward and cross-entropy (under autocast with `amp`), backward (of the
    scaled loss with a GradScaler), optimizer step and zero_grad(set_to_none=True) (none with optimizer-in-backward);
    returns the loss. clear_grads="before-backward" calls zero_grad after the forward instead, as torchvision's
    reference script and Lightning's automatic optimization do (the previous step's gradients live through the
    forward). With gradient accumulation this is micro-step `micro` of `micro_steps`: the loss is divided by
    `micro_steps` (as accumulating code does), the gradients are kept for the next micro-step, and only the last
    steps the optimizer; before-backward clears before the first micro-step's backward only, as Lightning does
    with accumulate_grad_batches."""
    images, labels = inputs
    with torch.autocast(device_type, dtype=amp) if amp else contextlib.nullcontext():
        loss = classification_loss(model(images), labels)  # cross-entropy (main + auxiliary heads' where named)
    if micro_steps > 1:
        loss = loss / micro_steps
    if clear_grads == "before-backward" and not in_backward and micro == 0:
        optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if micro < micro_steps - 1:
        return loss
    if not in_backward:
        optim_step(optimizer, scaler)
        if clear_grads == "after-step":
            optimizer.zero_grad(set_to_none=True)
    return loss


def no_sync(model):
    """The context a micro-step that is not the last of its optimizer step runs in: DistributedDataParallel's
    no_sync() (no bucket reduction; the gradients accumulate locally), FSDP2's set_requires_gradient_sync(False)
    for the duration; nothing for a single-process model. (The simulation's DDP rule replaces this function for
    the run: its model is not wrapped, memprof.simulation.distributed.DDPBuckets.)"""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return unsynced()
    return contextlib.nullcontext()


def run_steps(model, optimizer, batch, step, steps: int, on_phase, grad_accum: int = 1) -> None:
    """`steps` calls of `step(model, optimizer, batch())`, with the phases marked for `on_phase(name, step)`:
    "forward" before batch() makes the inputs, "backward" as torch.autograd.backward begins (Tensor.backward
    calls it; wrapped for the duration), "optimizer" as optimizer.step begins (a step pre-hook), "done" at
    the end. The inputs are dropped after each step. With `grad_accum` N > 1 each step is N calls of
    `step(model, optimizer, batch(), micro=m, micro_steps=N)` (the step steps the optimizer at the last), each
    marked forward / backward with the same step number; all but the last run under `no_sync(model)`."""
    current = [0]
    original = torch.autograd.backward

    def backward(*args, **kwargs):
        on_phase(Phase.BACKWARD, current[0])
        return original(*args, **kwargs)

    hook = getattr(optimizer, "register_step_pre_hook", None)
    handle = hook(lambda *_: on_phase(Phase.OPTIMIZER, current[0])) if hook else None
    torch.autograd.backward = backward
    try:
        for i in range(steps):
            current[0] = i
            if grad_accum == 1:
                on_phase(Phase.FORWARD, i)
                inputs = batch()
                step(model, optimizer, inputs)
                del inputs
                continue
            for m in range(grad_accum):
                on_phase(Phase.FORWARD, i)
                inputs = batch()
                with no_sync(model) if m < grad_accum - 1 else contextlib.nullcontext():
                    step(model, optimizer, inputs, micro=m, micro_steps=grad_accum)
                del inputs
    finally:
        torch.autograd.backward = original
        if handle is not None:
            handle.remove()
    on_phase(Phase.DONE, steps)


SDPA_SWITCHES = {"cudnn": "enable_cudnn_sdp", "flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp",
                 "math": "enable_math_sdp"}
SDPA_DISABLE_ENV = "MEMPROF_CUDA_SDPA_DISABLE"  # e.g. "cudnn": measured and predicted with cuDNN attention off


def sdpa_kernels() -> dict:
    """With MEMPROF_CUDA_SDPA_DISABLE set (a comma list, perhaps empty), the attention kernels it names are off and
    the others on (torch.backends.cuda's switches, which the GPU's kernel choice and the simulation's rules both
    read); unset, the switches stay as they are. Returns which are enabled now."""
    raw = os.environ.get(SDPA_DISABLE_ENV)
    if raw is not None:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        unknown = [n for n in names if n not in SDPA_SWITCHES]
        if unknown:
            raise UsageError(f"{SDPA_DISABLE_ENV}={raw}: unknown kernel {unknown[0]} (use {', '.join(SDPA_SWITCHES)})")
        for name, switch in SDPA_SWITCHES.items():
            getattr(torch.backends.cuda, switch)(name not in names)
    return {"cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
