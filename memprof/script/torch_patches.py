"""What the simulated device replaces in torch for its block, because torch's modes cannot reach it: each piece
installed through memprof.script.patches.Patches (restored on exit).

- FakeTensor.device reports cuda:0 outside dispatch (memprof.script.state);
- Module.to / .cuda() / .cpu() keep each Parameter object (as CUDA's in-place `.data =` does): torch's
  swap-on-conversion path, with FakeTensorMode's weak memos dropped first and the tensor hooks re-installed;
- a device storage's data pointer is unique and 512-aligned (sharing checks tell storages apart by it);
- torch.cuda / torch.accelerator / torch.Generator(device="cuda") (memprof.script.cuda_api); torch.save / load and
  safetensors (memprof.script.files); torch.distributed's init, DDP and FSDP2 (memprof.script.parallel);
- CUDA's autocast state is CPU autocast's (the cuda-autocast-policy rule applies CUDA's op lists); optimizers take
  fake tensors for their foreach kernels; the DataLoader's pinning is a no-op;
- the CPU's random fills are queued until read (memprof.script.deferred), and the generator's readers settle them;
- torch.compile runs eager (said); torch.set_default_device("cuda") makes factories the device's; the SDPA switches
  a script sets end with it; threads the script starts run under the device's modes; os._exit ends the script as
  sys.exit would (this process only);
- FakeTensorMode's log of a meta kernel's refusal is quiet (the script's error is printed once, as Python prints it).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading

import torch
from torch._subclasses.fake_tensor import FakeTensor

from memprof.script import files, parallel
from memprof.script.cuda_api import CudaApi
from memprof.script.deferred import trunc_normal
from memprof.script.state import ACTIVE, CUDA0, INTERNAL, META, check_ordinal, is_cuda_device, is_sim

_FAKE_DEVICE_PROPERTY = FakeTensor.__dict__["device"]
_MODULE_APPLY = torch.nn.Module._apply.__code__
SDP_FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")


def sdp_flags() -> tuple:
    return tuple(getattr(torch.backends.cuda, f)() for f in SDP_FLAGS if hasattr(torch.backends.cuda, f))


def set_sdp_flags(flags: tuple) -> None:
    for name, on in zip((f for f in SDP_FLAGS if hasattr(torch.backends.cuda, f)), flags):
        getattr(torch.backends.cuda, "enable_" + name.removesuffix("_enabled"))(on)


def _sim_device(self):
    """FakeTensor.device while a simulated device is in force: `cuda:0` for its tensors, outside dispatch."""
    mode = self.fake_mode
    if mode.in_kernel_invocation:
        return META
    if INTERNAL.depth == 0 and ACTIVE and mode is ACTIVE[-1].fake_mode:
        return CUDA0
    return self.fake_device


def install(sim, patches) -> None:
    """Every replacement above, for simulated block `sim`."""
    patches.set(FakeTensor, "device", property(_sim_device, _FAKE_DEVICE_PROPERTY.fset))
    patches.callback(set_sdp_flags, sdp_flags())  # a script's enable_*_sdp(False) ends with it
    original_get_swap = torch.__future__.get_swap_module_params_on_conversion

    def get_swap_module_params_on_conversion():
        # Module._apply only: load_state_dict keeps its in-place copy_, as it does on CUDA
        return sys._getframe(1).f_code is _MODULE_APPLY or original_get_swap()

    patches.set(torch.__future__, "get_swap_module_params_on_conversion", get_swap_module_params_on_conversion)
    patches.wrap(torch.utils, "swap_tensors", lambda original: _swap_tensors(sim, original))
    original_data_ptr = torch._C.StorageBase.data_ptr

    def data_ptr(storage):
        if storage.device.type == "meta" and sim.tracker.id_of_storage(storage) is not None:
            return sim.calls.address(storage)
        return original_data_ptr(storage)

    patches.set(torch.UntypedStorage, "data_ptr", data_ptr)
    CudaApi(sim).install(patches)
    pin_mod = importlib.import_module("torch.utils.data._utils.pin_memory")
    patches.set(pin_mod, "pin_memory", lambda data, device=None: data)  # the loader's pinning thread
    _autocast_state(patches)
    from torch.optim import optimizer as optim_mod

    if FakeTensor not in optim_mod._foreach_supported_types:
        optim_mod._foreach_supported_types.append(FakeTensor)
        patches.callback(optim_mod._foreach_supported_types.remove, FakeTensor)
    files.install(sim, patches)
    patches.set(torch.nn.init, "trunc_normal_", trunc_normal(sim.deferred, torch.nn.init.trunc_normal_))
    for mod in (torch, torch.random):  # the CPU generator read or reset: the deferred fills run first
        for name in ("get_rng_state", "set_rng_state", "manual_seed", "seed"):
            if name in vars(mod):
                patches.wrap(mod, name, lambda original: _settling(sim, original))

    def compile_(model=None, **kwargs):
        sim.note("compile", "torch.compile runs eager here: compiled code's memory differs (predicted as eager)")
        return model if model is not None else (lambda fn: fn)

    patches.set(torch, "compile", compile_)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    patches.callback(fake_log.setLevel, fake_log.level)
    fake_log.setLevel(logging.CRITICAL)
    _default_device(sim, patches)
    patches.wrap(threading.Thread, "_bootstrap_inner", lambda original: _in_threads(sim, original))
    patches.wrap(os, "_exit", _os_exit)
    parallel.install(sim, patches)


def restricted_sdpa(sim, patches) -> None:
    """F.scaled_dot_product_attention, outermost (above the rules' own, which torch looks up at call time):
    torch.nn.attention.sdpa_kernel / torch.backends.cuda.enable_*_sdp choose SDPA's kernel on CUDA, and the
    simulation's attention rules select among the enabled kernels as CUDA does; a restricted choice is said."""
    import torch.nn.functional as F

    default = sdp_flags()

    def wrap(current):
        def scaled_dot_product_attention(*args, **kwargs):
            flags = sdp_flags()
            if flags != default:
                enabled = ", ".join(n.removesuffix("_sdp_enabled").replace("mem_", "memory-") for n, on in
                                    zip(SDP_FLAGS, flags) if on) or "none"
                sim.note(f"sdpa:{enabled}", f"the SDPA backends were restricted (torch.nn.attention.sdpa_kernel or "
                                            f"torch.backends.cuda.enable_*_sdp) to {enabled} at {sim.where()}: "
                                            f"attention is predicted with the kernel CUDA selects among those")
            return current(*args, **kwargs)

        return scaled_dot_product_attention

    patches.wrap(F, "scaled_dot_product_attention", wrap)


def _swap_tensors(sim, original):
    converter = sim.fake_mode.fake_tensor_converter
    memos = [converter.tensor_memo, converter.meta_converter.tensor_memo]
    describer = getattr(converter.meta_converter, "describer", None)
    if describer is not None:
        memos.append(describer.lookup_tensor)

    def swap_tensors(t1, t2):
        if not (is_sim(t1) or is_sim(t2)):
            return original(t1, t2)
        for memo in memos:  # FakeTensorMode's weak memos would make the swap refuse
            for key, value in list(memo.items()):
                if key is t1 or key is t2 or value is t1 or value is t2:
                    del memo[key]
        original(t1, t2)
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = getattr(t1, attr, None)
            if hooks:
                setattr(t1, attr, hooks)  # the setter installs them on t1's new implementation

    return swap_tensors


def _autocast_state(patches) -> None:
    original_enabled, original_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_autocast_enabled(device_type=None):  # CUDA's autocast state is the CPU's here
        if device_type is None or device_type == "cuda":
            return original_enabled("cpu")
        return original_enabled(device_type)

    def get_autocast_dtype(device_type):
        if device_type == "cuda" and original_enabled("cpu"):
            return original_dtype("cpu")
        return original_dtype(device_type)

    patches.set(torch, "is_autocast_enabled", is_autocast_enabled)
    patches.set(torch, "get_autocast_dtype", get_autocast_dtype)


def _default_device(sim, patches) -> None:
    original_set_default, original_get_default = torch.set_default_device, torch.get_default_device

    def set_default_device(device):
        sim.default_cuda = device is not None and is_cuda_device(device)
        if sim.default_cuda:
            check_ordinal(device)
        else:
            original_set_default(device)

    def get_default_device():
        return CUDA0 if sim.default_cuda else original_get_default()

    patches.set(torch, "set_default_device", set_default_device)
    patches.set(torch, "get_default_device", get_default_device)


def _settling(sim, original):
    def settled_first(*args, **kwargs):
        sim.settled()
        return original(*args, **kwargs)

    settled_first.__name__ = getattr(original, "__name__", "settled_first")
    return settled_first


def _in_threads(sim, original):
    """Threads started inside the block run on the simulated device too (torch's modes are per thread)."""
    def _bootstrap_inner(thread):
        if not sim.entered:
            return original(thread)
        with sim.tracker, sim.calls:
            return original(thread)

    return _bootstrap_inner


def _os_exit(original):
    """os._exit in the script ends it as sys.exit would, so the run still leaves a record (in this process only: a
    forked worker, a DataLoader's, ends as it always does)."""
    pid = os.getpid()

    def _exit(code):
        if os.getpid() != pid:
            original(code)
        raise SystemExit(code)

    return _exit
