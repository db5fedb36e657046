"""How tensors reach, leave and are made on the simulated device: what the user's code calls, seen before dispatch
by a TorchFunctionMode (`DeviceCalls`), and the same seen at dispatch (`dispatch_factory`) for what bypasses it.

- **made on the device**: a factory of torch's (`torch.utils._device._device_constructors()`: empty, zeros, full,
  arange, tensor, rand, ...), a `*_like` function or a `Tensor.new_*` method given `device="cuda"` (or under
  `torch.set_default_device("cuda")` / `with torch.device("cuda")`) makes a fake tensor, an allocation. Nothing
  else is a factory: `Module.to(device="cuda")` asks `torch._C._nn._parse_to(device="cuda")`, which only parses.
  Code that torch runs with its own mode popped (a Python functional dispatched through __torch_function__, such as
  `multi_head_attention_forward`'s `torch.zeros(..., device=k.device)`) reaches dispatch instead: an op there that
  names the CUDA device is the device's too. (C++ composites that branch on the device, `F.one_hot` among them,
  take CUDA's branch by the engine's rule, memprof.simulation.branches.)
- **moved to the device**: `Tensor.cuda()`, `.to("cuda" | device=... | other)`, `Module.to / cuda / to_empty`: a fake
  copy of the CPU tensor, laid out as `memory_format` asks; a module keeps each Parameter object (torch's
  swap-on-conversion, with the weak references FakeTensorMode keeps dropped first, and the hooks re-installed).
- **moved off it**: `Module.cpu()` / `.to("cpu")` swap each parameter for a real CPU tensor of stand-in values
  (memprof.script.standins; a large one filled only when read), so the card's copy is freed, as on CUDA; a tensor's
  own `.cpu()` / `.to("cpu")` / `.item()` / `.tolist()` / `print` / `.numpy()` read back stand-ins.
- **CUDA's own refusals**: another device ordinal than 0 ("invalid device ordinal"), `.numpy()` of a device tensor.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

from memprof.script.files import meta_twin
from memprof.script.standins import LIMIT, materialise, value_of
from memprof.script.state import (CUDA0, CudaError, check_ordinal, from_torch, internal, is_cpu_device,  # noqa: F401
                                  is_cuda_device, is_sim, under_module_apply)


_ADDRESS_BASE, _ADDRESS_ALIGN = 0x7F0000000000, 512  # where the simulated card's (unique) addresses begin


def _descriptor(name: str):
    return torch._C.TensorBase.__dict__[name]


def factories() -> frozenset:
    """torch's tensor factories that take a `device` (the functions torch.set_default_device redirects, the
    `*_like` functions and the `Tensor.new_*` methods)."""
    from torch.utils._device import _device_constructors

    like = (getattr(torch, n) for n in dir(torch) if n.endswith("_like") and callable(getattr(torch, n)))
    new = (getattr(torch.Tensor, n) for n in dir(torch.Tensor) if n.startswith("new_"))
    return frozenset((*_device_constructors(), *like, *new))


class DeviceCalls(TorchFunctionMode):
    """The user's calls before dispatch: moves, factories, read-backs (see the module docstring)."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim
        self.factories = factories()
        self.constructors = frozenset(f for f in self.factories if not getattr(f, "__name__", "").endswith("_like")
                                      and not getattr(f, "__name__", "").startswith("new_"))
        T = torch.Tensor
        self.handlers = {T.cuda: self._cuda, T.to: self._to, T.cpu: self._cpu, T.item: self._item,
                         T.tolist: self._tolist, T.numpy: self._numpy, T.__float__: self._item, T.__int__: self._item,
                         T.__bool__: self._item, T.__index__: self._item, T.__repr__: self._repr,
                         T.__format__: self._format, T.__array__: self._numpy, T.get_device: self._get_device,
                         T.pin_memory: self._pin_memory, T.is_pinned: self._is_pinned,
                         T.record_stream: self._record_stream, T.__reduce_ex__: self._reduce,
                         T.__deepcopy__: self._deepcopy, T.data_ptr: self._data_ptr}
        self.getters = {_descriptor("is_cuda"): lambda t: True, _descriptor("is_cpu"): lambda t: False}
        self._addresses, self._next_address = {}, _ADDRESS_BASE

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        getter = self.getters.get(getattr(func, "__self__", None))
        if getter is not None:
            if args and is_sim(args[0]):
                return getter(args[0])
            return func(*args, **kwargs)
        if func in self.factories:
            dev = kwargs.get("device")
            if dev is None and self.sim.default_cuda and func in self.constructors:
                dev = CUDA0  # torch.set_default_device("cuda")
            if dev is not None and is_cuda_device(dev):
                return self.factory(func, args, kwargs, dev)
        return func(*args, **kwargs)

    # --- moves -----------------------------------------------------------------------------------------------
    @staticmethod
    def parse_to(args, kwargs):
        """(device, dtype, copy, memory_format) of a Tensor.to call; device "sim", "cpu", None or another."""
        rest, kw = list(args[1:]), dict(kwargs)
        other = kw.pop("other", None)
        if other is None and rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
        device = kw.pop("device", None)
        dtype = kw.pop("dtype", None)
        if other is not None:
            device, dtype = ("sim" if is_sim(other) else other.device), other.dtype
        else:
            if rest and (rest[0] is None or isinstance(rest[0], (str, torch.device, int))) \
                    and not isinstance(rest[0], bool):
                device = rest.pop(0)  # to(device, dtype, ...), Module.to passes a None device positionally
                if rest and (rest[0] is None or isinstance(rest[0], torch.dtype)):
                    dtype = rest.pop(0)
            elif rest and isinstance(rest[0], torch.dtype):
                dtype = rest.pop(0)
        if rest:
            rest.pop(0)  # non_blocking
        copy = kw.pop("copy", rest.pop(0) if rest else False)
        memory_format = kw.pop("memory_format", torch.preserve_format)
        if device is not None and device != "sim":
            if is_cuda_device(device):
                check_ordinal(device)
                device = "sim"
            elif is_cpu_device(device):
                device = "cpu"
        return device, dtype, copy, memory_format

    def _to(self, func, args, kwargs):
        t = args[0]
        device, dtype, copy, memory_format = self.parse_to(args, kwargs)
        if is_sim(t):
            if device == "cpu":
                if under_module_apply(3):
                    return self.off_device(t, dtype)  # Module.cpu() / Module.to("cpu"): the card's copy goes
                if from_torch():
                    device = None  # torch's own code moving a tensor to the device it grouped it by (its real one)
                else:
                    return self.stand_in(t, dtype)
            if device in ("sim", None):
                if dtype in (None, t.dtype) and not copy and memory_format == torch.preserve_format:
                    return t
                return torch.Tensor.to(t, dtype=dtype or t.dtype, copy=copy, memory_format=memory_format)
            return func(*args, **kwargs)
        if device == "sim":
            return self.to_device(t, dtype, memory_format=memory_format)
        return func(*args, **kwargs)

    def _cuda(self, func, args, kwargs):
        t = args[0]
        device = args[1] if len(args) > 1 else kwargs.get("device")
        if device is not None:
            check_ordinal(device if not isinstance(device, int) else f"cuda:{device}")
        return t if is_sim(t) else self.to_device(t, op="Tensor.cuda()")

    def _cpu(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        if under_module_apply(3):
            return self.off_device(t)
        return self.stand_in(t)

    # --- what each move makes ---------------------------------------------------------------------------------
    def to_device(self, t: torch.Tensor, dtype=None, op: str = "Tensor.to(cuda)",
                  memory_format=torch.preserve_format) -> torch.Tensor:
        """A fake device copy of real (or meta) tensor `t` (an allocation of its size), laid out as `memory_format`
        asks; it keeps `t`'s values when they are few (memprof.script.standins)."""
        from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

        sim = self.sim
        dtype = dtype or t.dtype
        stride = None if t.is_contiguous() or not is_non_overlapping_and_dense(t) else t.stride()  # preserve_format
        with internal(), sim.fake_mode:
            if memory_format not in (None, torch.preserve_format):
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu", memory_format=memory_format)
            elif stride is None:
                out = torch.empty(tuple(t.shape), dtype=dtype, device="cpu")
            else:
                out = torch.empty_strided(tuple(t.shape), stride, dtype=dtype, device="cpu")
        sim.data_alloc()
        sim.tracker.register(out, op)
        if t.device.type == "cpu" and t.untyped_storage()._cdata not in sim.deferred.pending:
            sim.standins.copied(out, t)  # (not a tensor whose random fill is still queued: that would run it)
        if t.requires_grad and torch.is_grad_enabled() and (out.is_floating_point() or out.is_complex()):
            out.requires_grad_(True)
            sim.note("grad-move", f"a tensor that requires grad was moved to the device at {sim.where()}: its copy "
                                  "is a new leaf (gradients do not flow back to the CPU tensor)")
        return out

    def factory(self, func, args, kwargs, device):
        """A torch factory given the CUDA device: a fake tensor (an allocation). A `*_like` / `new_*` factory's
        CPU or meta template is given as its meta twin (FakeTensorMode would keep a weak reference to it)."""
        sim = self.sim
        check_ordinal(device)
        kwargs = {**kwargs, "device": "cpu", **({"pin_memory": False} if kwargs.get("pin_memory") else {})}
        if args and isinstance(args[0], torch.Tensor) and type(args[0]) is not FakeTensor:
            args = (meta_twin(args[0]), *args[1:])
        with internal(), sim.fake_mode:
            out = func(*args, **kwargs)
        sim.data_alloc()
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                sim.tracker.register(t, f"torch.{getattr(func, '__name__', func)}(device=cuda)")
        sim.standins.made(func, args, kwargs, out)
        return out

    def off_device(self, t, dtype=None) -> torch.Tensor:
        """Module.cpu() / Module.to("cpu"): a real CPU tensor of stand-in values in the parameter's place (the card's
        copy is freed when the parameter is swapped)."""
        self.sim.note("off-device", f"parameters moved off the device at {self.sim.where()} (Module.cpu / to('cpu')) "
                                    f"hold stand-in values; the card's memory they held is freed")
        return self.host_stand_in(t, dtype)

    def host_stand_in(self, t, dtype=None, value=None) -> torch.Tensor:
        """A real CPU tensor of `t`'s shape holding its stand-in values (`value`, else what is known of `t`); a
        large one is filled only when read (an optimizer's state moved to the CPU at teardown is never touched)."""
        from memprof.script.deferred import stand_in_fill

        dtype = dtype or t.dtype
        value = value if value is not None else value_of(t) if type(t) is FakeTensor else None
        if t.numel() <= LIMIT or isinstance(value, torch.Tensor):
            return materialise(value, t).to(dtype)
        out = torch.empty(tuple(t.shape), dtype=dtype)
        fill = value.value if value is not None else (False if dtype == torch.bool else 1)
        self.sim.deferred.defer(stand_in_fill, out, (fill,), {})
        return out

    def stand_in(self, t, dtype=None) -> torch.Tensor:
        """What the script reads back from device tensor `t` (memprof.script.standins), as a real CPU tensor."""
        return self.host_stand_in(t, dtype, self.sim.standins.counted(t))

    def address(self, storage) -> int:
        """A device storage's data pointer: unique and 512-aligned, as the caching allocator's are (sharing checks
        such as safetensors' and transformers' tell storages apart by it)."""
        sid = self.sim.tracker.id_of_storage(storage)
        if sid is None:
            return 0
        address = self._addresses.get(sid)
        if address is None:
            address = self._addresses[sid] = self._next_address
            self._next_address += -(-max(storage.nbytes(), 1) // _ADDRESS_ALIGN) * _ADDRESS_ALIGN
        return address

    # --- read-backs --------------------------------------------------------------------------------------------
    def _item(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        return func(self.stand_in(t), *args[1:], **kwargs)

    def _tolist(self, func, args, kwargs):
        t = args[0]
        if is_sim(t):
            return self.stand_in(t).tolist()
        self.sim.settled()
        return func(*args, **kwargs)

    def _numpy(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            self.sim.settled()
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first.")  # (CUDA's own message)
        return self.stand_in(t).numpy()

    def _repr(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        text = repr(self.stand_in(t))
        return text[:-1] + ", device='cuda:0')" if text.endswith(")") else text

    def _format(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        stand_in = self.stand_in(t)
        return format(stand_in.item(), *args[1:]) if stand_in.dim() == 0 else self._repr(func, args[:1], {})

    def _get_device(self, func, args, kwargs):
        return 0 if is_sim(args[0]) else func(*args, **kwargs)

    def _pin_memory(self, func, args, kwargs):
        self.sim.note("pin", "pin_memory(): page-locked host memory is host memory, not the card's (not counted)")
        return args[0]

    def _is_pinned(self, func, args, kwargs):
        return False

    def _record_stream(self, func, args, kwargs):
        return None

    def _data_ptr(self, func, args, kwargs):
        t = args[0]
        if not is_sim(t):
            return func(*args, **kwargs)
        return self.address(t.untyped_storage()) + t.storage_offset() * t.element_size()

    def _deepcopy(self, func, args, kwargs):
        """copy.deepcopy of a device tensor (an EMA model, a best-weights copy): a new device tensor of its size,
        as on CUDA (torch's own deepcopy would copy the fake mode with it)."""
        t, memo = args[0], args[1] if len(args) > 1 else kwargs.get("memo", {})
        if not is_sim(t):
            return func(*args, **kwargs)
        if id(t) in memo:
            return memo[id(t)]
        with torch.no_grad():
            new = t.clone()
        if getattr(t, "_is_param", False):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            new.requires_grad_(t.requires_grad)
        memo[id(t)] = new
        if t.grad is not None:
            new.grad = self._deepcopy(func, (t.grad, memo), {})
        return new

    def _reduce(self, func, args, kwargs):
        if is_sim(args[0]):
            if self.sim.saving:  # torch.save: its shape, strides and dtype, no values (memprof.script.files)
                return meta_twin(args[0]).__reduce_ex__(*args[1:], **kwargs)
            # (pickling outside torch.save: a multiprocessing queue, copy.copy)
            self.sim.refuse("pickling a tensor on cuda:0 outside torch.save (the simulation has no data)")
        self.sim.settled()
        return func(*args, **kwargs)


def dispatch_factory(sim, func, args, kwargs):
    """At dispatch, an op given no device tensor: its outputs, made on the device when the op names the CUDA device;
    None when it does not (a factory given no device, in Python code torch runs, is the CPU's on CUDA too)."""
    dev = kwargs.get("device")
    if dev is None or not is_cuda_device(dev):
        return None
    check_ordinal(dev)
    kwargs = {**kwargs, "device": torch.device("cpu"), **({"pin_memory": False} if kwargs.get("pin_memory") else {})}
    with internal(), sim.fake_mode:
        return func(*args, **kwargs)
