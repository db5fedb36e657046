"""What a script's run did, seen from global hooks the same way on the simulated device
(memprof.script.device.SimulatedCuda) and the measured one (memprof.script.measure.MeasuredCuda): the phases and
steps, and the setup (batch size, autocast dtypes, GradScaler, optimizers and the implementation they resolve,
checkpointing, optimizer-in-backward), and how much of a training step ran (forwards, backwards, optimizer steps).

- forward: the outermost module call (a global forward pre hook); its positional and keyword inputs give the batch
  size (the first device tensor of at least one dimension, looked for in tuples, lists and mappings: a dict batch,
  `model(pixel_values=x)`, an HF BatchFeature);
- backward: `torch.autograd.backward`, wrapped (a backward inside another, a reentrant checkpoint's recompute, is
  part of the outer one);
- optimizer: from the optimizer step pre hook, or, when the step is given a closure (Lightning, LBFGS), from the
  moment the closure returns (the closure's forward and backward are theirs);
- a step is a backward followed by an optimizer step (it ends with the optimizer's post hook), or a backward in
  which optimizers stepped from gradient hooks (optimizer-in-backward: it ends with the backward). After
  `max_steps` steps the code is stopped with StopSimulation (a BaseException: `except Exception` does not catch it).

The class using the mixin gives `_phase(name)` (a phase boundary), `max_steps`, and may override `_on_root`,
`_on_batch_tensor`, `_on_optimizer_pre`, `_on_optimizer_post` and `_autocast_device`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping

import torch


class StopSimulation(BaseException):
    """Raised after the requested number of optimizer steps (a BaseException: the user's `except Exception`
    does not catch it); the runner ends the script there."""


def new_detected() -> dict:
    return {"batch_size": None, "autocast_dtypes": [], "grad_scaler": False, "checkpointing": False,
            "optimizers": [], "steps": 0, "forwards": 0, "backwards": 0, "optimizer_in_backward": False,
            "parallel": "none", "bucket_cap_mb": None, "grad_as_bucket_view": False, "reshard_after_forward": True,
            "peft": None}


def first_batched(value, is_device) -> torch.Tensor | None:
    """The first device tensor (`is_device(t)`) of at least one dimension in a call's inputs."""
    if isinstance(value, torch.Tensor):
        return value if value.dim() >= 1 and is_device(value) else None
    if isinstance(value, Mapping):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return None
    for v in value:
        found = first_batched(v, is_device)
        if found is not None:
            return found
    return None


class Detection:
    """Mixin: the hooks above, installed through a memprof.script.patches.Patches (see the module docstring)."""

    def _start_detection(self) -> None:
        self.detected = new_detected()
        self.error = None  # the script's own error, as the record says it (the runner sets it)
        self._in_backward, self._since_backward, self._stepped_in_backward = 0, False, False
        self._depth = 0
        self._device_root = False  # whether the outermost module running is the device's
        self._in_step = 0
        self._roots = weakref.WeakSet()
        self._param_info: dict = {}  # id(parameter) -> (name, numel, element size, requires_grad, dtype)
        self._described: set = set()

    def _install_detection(self, patches) -> None:
        from torch.amp import autocast_mode, grad_scaler
        from torch.nn.modules import module as module_mod
        from torch.optim import optimizer as optim_mod

        patches.wrap(autocast_mode.autocast, "__init__", self._autocast_init)
        patches.wrap(grad_scaler.GradScaler, "scale", self._scale)
        patches.wrap(torch.autograd, "backward", self._backward)
        patches.hooks(optim_mod.register_optimizer_step_pre_hook(self._optimizer_pre),
                      optim_mod.register_optimizer_step_post_hook(self._optimizer_post),
                      module_mod.register_module_forward_pre_hook(self._forward_pre),
                      module_mod.register_module_forward_hook(self._forward_post, with_kwargs=True,
                                                              always_call=True))

    # --- what a subclass may add -----------------------------------------------------------------------------
    def _on_root(self, module) -> None:
        """The first forward of a root module (one called outside any other module)."""

    def _is_device_tensor(self, t) -> bool:
        return t.is_cuda or getattr(t, "_local_tensor", t).is_cuda  # (an FSDP parameter: a DTensor)

    def _on_optimizer_pre(self, optimizer, params) -> None:
        pass

    def _on_optimizer_post(self, optimizer) -> None:
        pass

    def _autocast_device(self, device_type: str) -> str:
        return device_type

    # --- forward -----------------------------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        if self._depth == 0:
            self._device_root = False
            if self._in_backward:
                self.detected["checkpointing"] = True  # a forward rerun inside backward: a checkpoint's recompute
            else:
                first = next(module.parameters(), None)
                if first is not None and self._is_device_tensor(first) or \
                        first is None and first_batched(args, self._is_device_tensor) is not None:
                    self._device_root = True  # (not a CPU module: a data transform, a CPU copy of the model)
                    self.detected["forwards"] += first is not None  # a model's forward (not a loss module's)
                    self._enter_forward()
                    if module not in self._roots:
                        self._roots.add(module)
                        self._record_params(module)
                        self._on_root(module)
        elif self._in_backward:
            self.detected["checkpointing"] = True
        self._depth += 1

    def _enter_forward(self) -> None:
        self._phase("forward")

    def _forward_post(self, module, args, *kwargs_output):
        # (module, args, kwargs, output); torch calls an always_call hook as (module, args, output) when the forward
        # raised (a non-reentrant checkpoint's recompute stops early that way)
        kwargs = kwargs_output[0] if len(kwargs_output) == 2 else {}
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._device_root and not self._in_backward and self.detected["batch_size"] is None:
            first = first_batched((args, kwargs), self._is_device_tensor)
            if first is not None:
                self.detected["batch_size"] = int(first.shape[0])

    def _record_params(self, module) -> None:
        from memprof.adapters import detect

        if self.detected["peft"] is None:  # a model the script wrapped with peft (LoRA, DoRA, ...)
            self.detected["peft"] = detect(module)
        for name, p in module.named_parameters():
            if id(p) not in self._param_info:  # what the model holds, as its first forward finds it
                self._param_info[id(p)] = (name, p.numel(), p.element_size(), p.requires_grad, str(p.dtype))

    # --- backward ----------------------------------------------------------------------------------------------
    def _backward(self, original):
        """torch.autograd.backward, wrapped: the backward phase, and the end of an optimizer-in-backward step."""
        detection = self

        def backward(*args, **kwargs):
            outer = detection._in_backward == 0
            if outer:
                detection._phase("backward")
                detection._stepped_in_backward = False
            detection._in_backward += 1
            try:
                out = original(*args, **kwargs)
            finally:
                detection._in_backward -= 1
            if outer:
                detection.detected["backwards"] += 1
                detection._since_backward = True
                if detection._stepped_in_backward:  # optimizer-in-backward: the step ends with the backward
                    detection._step_done()
            return out

        return backward

    # --- optimizer ---------------------------------------------------------------------------------------------
    def _optimizer_pre(self, optimizer, args, kwargs):
        self._in_step += 1
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if id(optimizer) not in self._described:
            self._described.add(id(optimizer))
            self.detected["optimizers"].append(describe_optimizer(optimizer, params))
        self._on_optimizer_pre(optimizer, params)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # (args[0] is the optimizer)
        if closure is None or self._in_backward:
            if not self._in_backward:
                self._phase("optimizer")
            return None

        def closure_then_update(*c_args, **c_kwargs):  # the closure's forward and backward, then the update
            loss = closure(*c_args, **c_kwargs)
            self._phase("optimizer")
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_update}
        return (args[0], closure_then_update, *args[2:]), kwargs

    def _optimizer_post(self, optimizer, args, kwargs):
        self._in_step = max(0, self._in_step - 1)
        self._on_optimizer_post(optimizer)
        if self._in_backward:  # optimizer-in-backward: the step ends with the backward
            self._stepped_in_backward = True
            self.detected["optimizer_in_backward"] = True
        elif self._since_backward:
            self._since_backward = False
            self._step_done()

    def _step_done(self) -> None:
        self.detected["steps"] += 1
        if self.max_steps is not None and self.detected["steps"] >= self.max_steps:
            raise StopSimulation(self.detected["steps"])

    # --- autocast and GradScaler -------------------------------------------------------------------------------
    def _autocast_init(self, original):
        detection = self

        def __init__(ac, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cuda":
                dtype = dtype if dtype is not None else torch.get_autocast_dtype("cuda")
                if enabled and dtype not in detection.detected["autocast_dtypes"]:
                    detection.detected["autocast_dtypes"].append(dtype)
            return original(ac, detection._autocast_device(device_type), dtype=dtype, enabled=enabled,
                            cache_enabled=cache_enabled)

        return __init__

    def _scale(self, original):
        detection = self

        def scale(scaler, outputs):
            if scaler.is_enabled():
                detection.detected["grad_scaler"] = True
            return original(scaler, outputs)

        return scale

    # --- what ran ----------------------------------------------------------------------------------------------
    def param_dtypes(self) -> list[str]:
        return list(dict.fromkeys(d for *_, d in self._param_info.values()))

    def precision(self) -> str:
        """fp32, bf16-amp, fp16-amp (autocast seen), bf16 / fp16 (the parameters in that dtype)."""
        dtypes = self.detected["autocast_dtypes"]
        if torch.float16 in dtypes:
            return "fp16-amp"
        if torch.bfloat16 in dtypes:
            return "bf16-amp"
        pd = self.param_dtypes()
        if "torch.bfloat16" in pd:
            return "bf16"
        if "torch.float16" in pd:
            return "fp16"
        return "fp32"

    def incomplete(self, used_device: bool) -> str | None:
        """Why the run is not a training step's prediction (None: at least one optimizer step ran)."""
        d = self.detected
        if self.detected["steps"]:
            return None
        if not used_device:
            return "the script put nothing on the CUDA device"
        ran = f"{d['forwards']} forward{'s' * (d['forwards'] != 1)}, {d['backwards']} backward" \
              f"{'s' * (d['backwards'] != 1)}"
        return f"no training step completed ({ran}, no optimizer step after a backward)"


def describe_optimizer(optimizer, params) -> dict:
    """The optimizer's class and the implementation its step runs, resolved as torch resolves it on CUDA."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        impl = "fused"
    elif foreach is None and "foreach" in group:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            impl = "foreach" if _default_to_fused_or_foreach(params, bool(group.get("differentiable")))[1] \
                else "forloop"
    elif foreach:
        impl = "foreach"
    elif "foreach" in group:
        impl = "forloop"
    else:
        impl = "own"
    cls = type(optimizer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "name": cls.__name__, "implementation": impl,
            "params": len(params)}
