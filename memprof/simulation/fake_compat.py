"""Building a model for the simulation: constructors on the meta device, then fake CPU storage.

Why: constructors compute small host-side values from real tensors (timm's drop-path schedules
`torch.linspace(0, rate, depth).tolist()`, rotary-embedding tables, relative-position indices). Under
FakeTensorMode such a value has no data and `.item()` raises DataDependentOutputException. Built outside
the fake mode on the `meta` device, every constructor runs with real host values where it asks for them
(explicit `device='cpu'` tensors) and allocates nothing else; then each parameter and buffer is replaced by
a fake CPU tensor of the same shape, stride, dtype and `requires_grad`, exactly what building under the
fake mode gives, so the prediction sees the same parameters. Shared parameters stay shared.
"""

from __future__ import annotations

import torch


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor shaped like `t` (to be called inside the FakeTensorMode)."""
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")


def fake_storage(model: torch.nn.Module) -> None:
    """Give every meta (or real) parameter, buffer and plain tensor attribute of `model` fake CPU storage,
    in place. Call inside the FakeTensorMode; tensors that are already fake are kept."""
    from torch._subclasses.fake_tensor import FakeTensor

    memo: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            return t
        if id(t) not in memo:
            new = _fake_like(t)
            if isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                new.requires_grad_(t.requires_grad)
            memo[id(t)] = new
        return memo[id(t)]

    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = convert(p)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = convert(b)
        # tensors kept as plain attributes (caches some towers build in __init__) must be fake too
        for key, v in list(vars(module).items()):
            if isinstance(v, torch.Tensor) and not key.startswith("_"):
                setattr(module, key, convert(v))


# --- in-place fused optimizer kernels without a meta kernel ----------------------------------------------
# FakeTensorMode runs an op that has no meta kernel on real zero-filled CPU copies of its inputs
# (`maybe_run_unsafe_fallback`): for fused SGD on ViT-H/14 that is 2.5 GB of parameters, gradients and momenta
# made real, 16 s and 8 GiB of host memory, to learn what the schema already says (these ops write in place
# and return nothing). On CUDA they allocate nothing either (one multi_tensor_apply launch per chunk).
FUSED_IN_PLACE = ("_fused_sgd_", "_fused_adam_", "_fused_adamw_", "_fused_adagrad_")
_LIBRARY: list = []  # the torch.library handle that keeps the registrations alive


def _nothing(*args, **kwargs) -> None:
    return None


def register_meta_kernels() -> list[str]:
    """Give every overload of FUSED_IN_PLACE that lacks one a meta kernel that returns nothing (what the
    schema's `-> ()` says), once per process; returns the overloads registered."""
    if _LIBRARY:
        return _LIBRARY[0][1]
    library, done = torch.library.Library("aten", "IMPL"), []
    for name in FUSED_IN_PLACE:
        packet = getattr(torch.ops.aten, name, None)
        for overload in (packet.overloads() if packet is not None else ()):
            op = getattr(packet, overload)
            if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"):
                continue
            library.impl(f"{name}.{overload}" if overload != "default" else name, _nothing, "Meta")
            done.append(f"{name}.{overload}")
    _LIBRARY.append((library, done))
    return done
