"""Files a script writes and reads back on the simulated device, which has no data.

`torch.save` writes a real file, small: each device tensor in it is saved as a meta tensor (its shape, strides and
dtype, no values), so the same code can `os.replace` it, `torch.load` it and `load_state_dict` it back. Under the
simulation `torch.load` turns those meta tensors into stand-ins: device tensors (an allocation) with a CUDA
`map_location`, CPU tensors of stand-in values (memprof.script.standins; a large one filled only when read)
otherwise. safetensors' `save_file` / `save` / `load_file` (HF `save_pretrained`, accelerate's `save_state`) do the
same: the file is a torch.save placeholder of meta tensors, which safetensors' own readers outside memprof do not
read. CPU tensors are saved as they are. Every save is said in the record's notes.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from memprof.script.state import is_cuda_device, is_sim

PLACEHOLDER = "memprof-simulated-safetensors"


def meta_twin(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with `t`'s shape, strides and dtype (what a placeholder file holds for a device tensor)."""
    return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")


class _Flat:
    """safetensors' flattened tensors, for a dict that held device tensors: written as a placeholder."""

    def __init__(self, tensors: dict):
        self.tensors = {k: meta_twin(v) if is_sim(v) else v for k, v in tensors.items()}


def install(sim, patches) -> None:
    """torch.save / torch.load, and safetensors' writers and reader when it is installed, for block `sim`."""
    original_save, original_load = torch.save, torch.load

    def save(obj, f, *args, **kwargs):
        sim.settled()
        if any(is_sim(t) for t in tree_flatten(obj)[0]) or sim.saving:
            sim.note(f"save:{sim.where()}", f"torch.save at {sim.where()}: device tensors saved as shapes without "
                                            f"values (a placeholder torch.load under memprof reads back)")
        sim.saving += 1  # device tensors met while pickling reduce to their meta twins (DeviceCalls._reduce)
        try:
            return original_save(obj, f, *args, **kwargs)
        finally:
            sim.saving -= 1

    def load(f, map_location=None, *args, **kwargs):
        on_device = map_location is not None and not callable(map_location) and not isinstance(map_location, dict) \
            and is_cuda_device(map_location)
        obj = original_load(f, *args, map_location="cpu" if on_device else map_location, **kwargs)
        return stand_ins(sim, obj, on_device, "torch.load")

    patches.set(torch, "save", save)
    patches.set(torch, "load", load)
    try:
        import safetensors.torch as st
    except ImportError:
        return
    original_serialize_file, original_serialize, original_load_file = st.serialize_file, st.serialize, st.load_file

    def flattening(original):  # (safetensors' flattener: `_flatten` before 0.6, `_flatten_as_ptr` after)
        def flatten(tensors, *args, **kwargs):
            if any(is_sim(v) for v in tensors.values()):
                sim.note(f"safetensors:{sim.where()}", f"safetensors save at {sim.where()}: written as a placeholder "
                                                       f"of shapes without values (memprof reads it back)")
                return _Flat(tensors)
            return original(tensors, *args, **kwargs)

        return flatten

    def serialize_file(flat, filename, metadata=None):
        if isinstance(flat, _Flat):
            return original_save({PLACEHOLDER: flat.tensors, "metadata": metadata}, filename)
        return original_serialize_file(flat, filename, metadata=metadata)

    def serialize(flat, metadata=None):
        if isinstance(flat, _Flat):
            import io

            buffer = io.BytesIO()
            original_save({PLACEHOLDER: flat.tensors, "metadata": metadata}, buffer)
            return buffer.getvalue()
        return original_serialize(flat, metadata=metadata)

    def load_file(filename, device="cpu", **kwargs):
        with open(filename, "rb") as fh:  # (a file object: torch.load hands a *.safetensors path to safetensors)
            obj = original_load(fh, map_location="cpu", weights_only=True) if fh.read(2) == b"PK" and \
                fh.seek(0) == 0 else None  # a placeholder is a torch.save zip; a real safetensors file is not
        if not (isinstance(obj, dict) and PLACEHOLDER in obj):
            return original_load_file(filename, device=device, **kwargs)
        return stand_ins(sim, obj[PLACEHOLDER], is_cuda_device(device), "safetensors load_file")

    for name in ("_flatten", "_flatten_as_ptr"):
        if hasattr(st, name):
            patches.wrap(st, name, flattening)
    patches.set(st, "serialize_file", serialize_file)
    patches.set(st, "serialize", serialize)
    patches.set(st, "load_file", load_file)


def stand_ins(sim, obj, on_device: bool, op: str):
    """`obj` as loaded, its meta tensors (a placeholder's) made stand-ins and, `on_device`, every tensor copied to
    the device."""
    def one(t):
        if t.device.type == "meta":
            return sim.calls.to_device(t, op=f"{op}(map_location=cuda)") if on_device else sim.calls.host_stand_in(t)
        return sim.calls.to_device(t, op=f"{op}(map_location=cuda)") if on_device else t

    return tree_map_only(torch.Tensor, one, obj)
