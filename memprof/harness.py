"""The micro-batch training steps every backend runs: one code path, so what is predicted is what runs.

`prepare` builds the model for a spec (open_clip tower + head), applies gradient checkpointing and
freeze-embed, and checks pretrained weights; `train_steps` runs the steps. Backends wrap these: the
simulation under fake tensors with a tracker, real backends on a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memprof.models import (build_model, check_pretrained, freeze_embedding, input_size,
                            read_pretrained, resolve_model)
from memprof.optims import OptimInfo, REGISTRY as OPTIMS
from memprof.spec import RunSpec


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
    info, optim = resolve_model(spec.model, backend=None), OPTIMS[spec.optim]  # backends check their own names
    model = build_model(info, spec.num_classes)
    state = None
    if spec.pretrained:
        state = read_pretrained(info, spec.pretrained)
        check_pretrained(model, state, spec.pretrained)
        if load_weights:
            model.visual.load_state_dict(state)
    if spec.grad_ckpt:
        model.visual.set_grad_checkpointing(True)
    model.train()
    frozen = freeze_embedding(model, info) if optim.freeze_embed else []
    return Prepared(model, optim, frozen, state)


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


def train_steps(model, optimizer, spec: RunSpec, device, on_phase) -> None:
    """`spec.steps` steps at micro-batch `spec.batch_size`: a fresh batch is created on the device, forward
    and cross-entropy, backward, optimizer step, zero_grad(set_to_none=True). `on_phase(name, step)` is
    called as each of forward / backward / optimizer begins, and once with "done" at the end.
    """
    h, w = input_size(model)
    for step in range(spec.steps):
        on_phase("forward", step)
        images = torch.randn(spec.batch_size, 3, h, w, device=device)
        labels = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)
        loss = F.cross_entropy(model(images), labels)
        on_phase("backward", step)
        loss.backward()
        on_phase("optimizer", step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del images, labels, loss
    on_phase("done", spec.steps)
