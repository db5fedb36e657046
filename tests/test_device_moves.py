"""Every way a tensor or a module reaches, leaves or is made on the simulated device behaves as on CUDA
(memprof.script.moves): the table of call forms x tensor/module x direction, each checked for the device it lands on,
the card's memory it takes or frees, and (modules) the Parameter objects it keeps. Negative controls: the old
classification of `_parse_to` as a factory, and a move off the device that leaves the copy on the card."""

import pytest
import torch

from memprof.script import simulated_cuda
from memprof.script.moves import DeviceCalls
from memprof.script.state import CudaError

NBYTES = 16 * 32 * 4 + 32 * 4  # Linear(16, 32) in fp32: weight and bias


def _linear():
    return torch.nn.Linear(16, 32)


# (name, what it does with x, a CPU tensor of 64 fp32 elements): the device copy it returns
TENSOR_TO = {
    "x.cuda()": lambda x: x.cuda(),
    "x.cuda(0)": lambda x: x.cuda(0),
    "x.to('cuda')": lambda x: x.to("cuda"),
    "x.to('cuda:0')": lambda x: x.to("cuda:0"),
    "x.to(device='cuda')": lambda x: x.to(device="cuda"),
    "x.to(torch.device('cuda'))": lambda x: x.to(torch.device("cuda")),
    "x.to('cuda', non_blocking=True)": lambda x: x.to("cuda", non_blocking=True),
    "x.to(device='cuda', dtype=float16)": lambda x: x.to(device="cuda", dtype=torch.float16),
    "x.to(other)": lambda x: x.to(torch.empty(1, device="cuda")),
}
TENSOR_MADE = {
    "torch.zeros(device='cuda')": lambda: torch.zeros(64, device="cuda"),
    "torch.empty(device=torch.device('cuda', 0))": lambda: torch.empty(64, device=torch.device("cuda", 0)),
    "torch.full(device='cuda')": lambda: torch.full((64,), 2.0, device="cuda"),
    "torch.zeros_like(cpu, device='cuda')": lambda: torch.zeros_like(torch.ones(64), device="cuda"),
    "cpu.new_zeros(device='cuda')": lambda: torch.ones(1).new_zeros(64, device="cuda"),
    "with torch.device('cuda')": lambda: _in_device_context(),
    "torch.tensor(list, device='cuda')": lambda: torch.tensor([1.0] * 64, device="cuda"),
}
TENSOR_OFF = {
    "x.cpu()": lambda x: x.cpu(),
    "x.to('cpu')": lambda x: x.to("cpu"),
    "x.to(device='cpu')": lambda x: x.to(device="cpu"),
    "x.to(torch.device('cpu'))": lambda x: x.to(torch.device("cpu")),
}
MODULE_TO = {
    "m.cuda()": lambda m: m.cuda(),
    "m.to('cuda')": lambda m: m.to("cuda"),
    "m.to(device='cuda')": lambda m: m.to(device="cuda"),
    "m.to(torch.device('cuda'))": lambda m: m.to(torch.device("cuda")),
    "m.to(device='cuda', dtype=float32)": lambda m: m.to(device="cuda", dtype=torch.float32),
}
MODULE_OFF = {
    "m.cpu()": lambda m: m.cpu(),
    "m.to('cpu')": lambda m: m.to("cpu"),
    "m.to(device='cpu')": lambda m: m.to(device="cpu"),
}


def _in_device_context():
    with torch.device("cuda"):
        return torch.zeros(64)


def _check_tensor_to(form) -> str | None:
    with simulated_cuda("a100-80g"):
        x = torch.ones(64)
        before = torch.cuda.memory_allocated()
        y = form(x)
        grew = torch.cuda.memory_allocated() - before
        if not y.is_cuda or y.device != torch.device("cuda", 0):
            return f"lands on {y.device}"
        if grew < y.numel() * y.element_size():
            return f"takes {grew} B of the card"
    return None


def _check_tensor_made(form) -> str | None:
    with simulated_cuda("a100-80g"):
        y = form()
        if not y.is_cuda or torch.cuda.memory_allocated() < 64 * y.element_size():
            return f"lands on {y.device}, {torch.cuda.memory_allocated()} B on the card"
    return None


def _check_tensor_off(form) -> str | None:
    with simulated_cuda("a100-80g"):
        x = torch.full((64,), 3.0, device="cuda")
        y = form(x)
        if y.is_cuda or type(y) is not torch.Tensor:
            return f"stays on {y.device}"
        if y.tolist() != [3.0] * 64:  # a known value reads back exactly
            return f"reads {y[:2].tolist()}"
    return None


def _check_module_to(form) -> str | None:
    with simulated_cuda("a100-80g"):
        m = _linear()
        params = list(m.parameters())
        before = torch.cuda.memory_allocated()
        out = form(m)
        grew = torch.cuda.memory_allocated() - before
        if out is not m or any(p is not q for p, q in zip(params, m.parameters())):
            return "replaced the Parameter objects"
        if not all(p.is_cuda for p in m.parameters()) or grew < NBYTES:
            return f"parameters on {m.weight.device}, {grew} B on the card"
        m(torch.randn(2, 16, device="cuda")).sum().backward()  # and it runs there
    return None


def _check_module_off(form) -> str | None:
    with simulated_cuda("a100-80g"):
        m = _linear().cuda()
        m(torch.randn(2, 16, device="cuda")).sum().backward()  # after a forward and a backward, as Lightning
        m.zero_grad(set_to_none=True)
        on_card = torch.cuda.memory_allocated()
        params = list(m.parameters())
        form(m)
        freed = on_card - torch.cuda.memory_allocated()
        if any(p.is_cuda for p in m.parameters()) or any(p is not q for p, q in zip(params, m.parameters())):
            return "parameters stay on the device (or were replaced)"
        if freed < NBYTES:
            return f"frees {freed} B of the card"
        m(torch.randn(2, 16)).sum().backward()  # a real CPU module now
    return None


TABLE = [*((f"tensor to: {k}", _check_tensor_to, f) for k, f in TENSOR_TO.items()),
         *((f"tensor made: {k}", _check_tensor_made, f) for k, f in TENSOR_MADE.items()),
         *((f"tensor off: {k}", _check_tensor_off, f) for k, f in TENSOR_OFF.items()),
         *((f"module to: {k}", _check_module_to, f) for k, f in MODULE_TO.items()),
         *((f"module off: {k}", _check_module_off, f) for k, f in MODULE_OFF.items())]


@pytest.mark.parametrize("name,check,form", TABLE, ids=[t[0] for t in TABLE])
def test_each_call_form_behaves_as_on_cuda(name, check, form):
    assert check(form) is None, name


def test_to_empty_after_meta_init_materialises_on_the_device():
    _cold_caches()
    with simulated_cuda("a100-80g"):
        with torch.device("meta"):
            m = _linear()
        params = list(m.parameters())
        m.to_empty(device="cuda")
        assert all(p.is_cuda for p in m.parameters()) and list(m.parameters())[0] is params[0]
        assert torch.cuda.memory_allocated() >= NBYTES
        with torch.no_grad():
            m.weight.normal_()  # then initialised in place, as torchtitan does
        m(torch.randn(2, 16, device="cuda")).sum().backward()


def _cold_caches():
    """As a script's process starts: with warm dispatch caches (FakeTensorMode's, the engine's front cache) a meta
    tensor is never converted, so nothing holds it and the swap would pass without the fix."""
    from memprof.simulation.memo import MEMO

    MEMO.clear(front=True)
    torch._subclasses.fake_tensor.FakeTensorMode.cache_clear()


def test_negative_control_a_swap_that_keeps_fake_tensor_memos_refuses_to_empty(monkeypatch):
    """Without the weak memos dropped before the swap, to_empty after meta init (and, below, cpu() after a forward)
    fail as they did ("Couldn't swap")."""
    from memprof.script import torch_patches

    monkeypatch.setattr(torch_patches, "_swap_tensors", lambda sim, original: original)
    with pytest.raises(RuntimeError, match="swap"):
        test_to_empty_after_meta_init_materialises_on_the_device()


def test_negative_control_a_swap_that_keeps_fake_tensor_memos_refuses_cpu_after_a_forward(monkeypatch):
    from memprof.script import torch_patches

    monkeypatch.setattr(torch_patches, "_swap_tensors", lambda sim, original: original)
    _cold_caches()
    with pytest.raises(RuntimeError, match="swap"):
        _check_module_off(MODULE_OFF["m.cpu()"])


def test_another_ordinal_is_refused_as_cuda_refuses_it():
    with simulated_cuda("a100-80g"):
        for form in (lambda: torch.ones(2).to("cuda:1"), lambda: torch.zeros(2, device="cuda:1"),
                     lambda: torch.ones(2).cuda(1), lambda: torch.Generator(device="cuda:1")):
            with pytest.raises(CudaError, match="invalid device ordinal"):
                form()
        g = torch.Generator(device="cuda")  # cuda:0 is there
        assert g.device == torch.device("cuda", 0) and isinstance(g, torch.Generator)
        assert torch.randn(4, generator=g.manual_seed(1), device="cuda").is_cuda


def test_negative_control_parse_to_as_a_factory_leaves_the_module_on_the_cpu(monkeypatch):
    """The old classification (every call given device='cuda' a factory) fails the keyword form of Module.to."""
    original = DeviceCalls.__init__

    def broken(self, sim):
        original(self, sim)
        self.factories = self.factories | {torch._C._nn._parse_to}

    monkeypatch.setattr(DeviceCalls, "__init__", broken)
    assert _check_module_to(MODULE_TO["m.to(device='cuda')"]) is not None
    assert _check_module_to(MODULE_TO["m.to('cuda')"]) is None  # the positional form never asked it


def test_negative_control_a_move_off_that_keeps_the_copy_is_caught(monkeypatch):
    monkeypatch.setattr(DeviceCalls, "off_device", lambda self, t, dtype=None: t)  # as before: a no-op
    assert _check_module_off(MODULE_OFF["m.cpu()"]) is not None
