"""Host memory of predictions: repeated predictions in one process do not grow it, and no optimizer kernel is run
on real zero-filled copies of the model (FakeTensorMode's fallback for ops without a meta kernel, `run_fallback_kernel`)."""

import gc

import pytest

from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) * 1024


def growth_bytes(work, rounds: int = 6) -> int:
    """How much the resident set grew from after the second round of `work` to after the last: the first two
    rounds fill every bounded cache, so a bounded process holds still from there."""
    for _ in range(2):
        work()
    gc.collect()
    settled = rss_bytes()
    for _ in range(rounds - 2):
        work()
    gc.collect()
    return rss_bytes() - settled


SPECS = [RunSpec(model="test-vit", optim=o, grad_ckpt=c, optim_impl=impl, budget="rtx4090")
         for o in ("adamw", "sgd-fe") for c in (False, True) for impl in ("foreach", "fused")]


def test_repeated_predictions_do_not_grow_host_memory():
    def work():
        for spec in SPECS:  # 8 configurations, 4 forward groups
            predict(spec)

    assert growth_bytes(work, rounds=6) < 40 * MIB


def test_negative_control_growth_is_seen_when_something_accumulates():
    kept = []

    def leaky():
        predict(SPECS[0])
        kept.append(bytearray(16 * MIB))  # what a cache that never evicts does
        kept[-1][::4096] = b"x" * len(range(0, 16 * MIB, 4096))  # touched, so resident

    assert growth_bytes(leaky, rounds=6) >= 48 * MIB


@pytest.fixture
def fallbacks(monkeypatch):
    """The ops FakeTensorMode ran on real copies of their inputs (its unsafe fallback) while the test ran."""
    import torch._subclasses.fake_tensor as fake_tensor

    ran = []
    original = fake_tensor.run_fallback_kernel

    def recording(mode, func, *args, **kwargs):
        ran.append(str(func))
        return original(mode, func, *args, **kwargs)

    monkeypatch.setattr(fake_tensor, "run_fallback_kernel", recording)
    return ran


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_fused_optimizers_never_run_on_real_copies(fallbacks, optim):
    status, metrics = predict(RunSpec(model="test-vit", optim=optim, optim_impl="fused", budget="rtx4090"))
    assert status == "ok" and metrics["peak_reserved_bytes"] > 0
    assert not [f for f in fallbacks if "_fused_" in f], fallbacks


FUSED_SGD_UNDER_FAKE = """
import torch
import torch._subclasses.fake_tensor as fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
ran = []
original = fake_tensor.run_fallback_kernel
def recording(mode, func, *args, **kwargs):
    ran.append(str(func))
    return original(mode, func, *args, **kwargs)
fake_tensor.run_fallback_kernel = recording
def fused_sgd():
    with FakeTensorMode():
        x = torch.empty(4)
        torch.ops.aten._fused_sgd_.default([x], [x], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0,
                                           nesterov=False, maximize=False, is_first_step=True)
    return any("_fused_sgd_" in f for f in ran)
as_shipped = fused_sgd()
ran.clear()
from memprof.simulation.fake_compat import register_meta_kernels
register_meta_kernels()
print(as_shipped, fused_sgd())
"""


def test_fused_sgd_runs_on_real_copies_only_without_the_meta_kernel():
    """In a fresh process: torch as shipped runs fused SGD on real copies (the negative control: the recorder
    sees it); after register_meta_kernels it does not."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FUSED_SGD_UNDER_FAKE], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"], out
