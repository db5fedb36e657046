"""An independent referee for the `cpu` backend's live bytes: torch's own MemTracker
(torch.distributed._tools.mem_tracker), written without any of memprof's code, on real CPU tensors.

What this proves: memprof's tracker, live-peak and the training steps it wraps see the same peak of live
tensor bytes as torch's tracker over the same steps (model and optimizer built by memprof.harness and
memprof.optims, steps run by memprof.harness.train_steps), up to one explained constant: the optimizers'
step counters kept as 0-dim tensors (torch AdamW: one per parameter in its state; timm Lamb: one per
parameter group), created from Python literals outside any dispatched op, which memprof's dispatch
tracker never sees (they are host memory on CUDA, memprof's host-literals rule) and MemTracker counts as
optimizer state.
What it does not prove: anything about CUDA (caching allocator, rules), nor the breakdown categories;
frozen parameters are left out (MemTracker registers a gradient hook on every parameter and refuses
parameters that do not require gradients).
"""

import gc

import pytest
import torch

from memprof.backends import cpu as cpu_backend
from memprof.harness import prepare, train_steps
from memprof.optims import build_optimizer
from memprof.spec import RunSpec
from memprof.simulation.tracing import live_peak, trace
from memprof.simulation.events import FREE, PHASE

mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")


def referee(spec: RunSpec) -> tuple[int, int]:
    """(peak live CPU tensor bytes of `spec`'s training steps as torch's MemTracker counts them, bytes of
    the step-counter tensors the optimizer holds at the end)."""
    torch.manual_seed(0)
    was = gc.isenabled()
    gc.disable()  # as memprof traces: releases follow reference counts alone
    try:
        prepared = prepare(spec)
        trainable = [p for p in prepared.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(prepared.optim_info, trainable, spec.state_bits, spec.paged)
        tracker = mem_tracker.MemTracker()
        tracker.track_external(prepared.model, optimizer)

        def on_phase(phase, step):
            if phase == "forward":  # MemTracker keeps per-module stats for one iteration only
                tracker.reset_mod_stats()

        with tracker:
            train_steps(prepared.model, optimizer, spec, "cpu", on_phase)
        peaks = tracker.get_tracker_snapshot("peak")
        holders = [*optimizer.state.values(), *optimizer.param_groups]
        counters = sum(h["step"].nbytes for h in holders if isinstance(h.get("step"), torch.Tensor))
    finally:
        if was:
            gc.enable()
    return peaks[torch.device("cpu")]["Total"], counters


@pytest.mark.parametrize("optim, batch", [("adamw", 1), ("sgd", 1), ("adamw", 4), ("lamb", 2)])
def test_cpu_peak_live_bytes_agree_with_torch_memtracker(optim, batch):
    spec = RunSpec("test-vit", optim, batch_size=batch, budget="device")
    status, measured = cpu_backend.measure(spec)
    assert status == "ok"
    peak, counters = referee(spec)
    assert counters == {"adamw": 4 * 34, "sgd": 0, "lamb": 4}[optim]  # test-vit: 34 trainable tensors, 1 group
    assert peak == measured["peak_live_bytes"] + counters


def test_the_referee_rejects_a_tracker_that_misses_releases():
    """Negative control: memprof's own stream with the backward phase's releases dropped (a tracker that
    misses frees) gives a peak the referee does not accept."""
    spec = RunSpec("test-vit", "sgd", budget="device")
    t = trace(spec, rules=(), fake=False)
    phase, kept = "setup", []
    for ev in t.events:
        if ev[0] == PHASE:
            phase = ev[1]
        if not (ev[0] == FREE and phase == "backward"):
            kept.append(ev)
    sound = live_peak(t).peak_bytes
    t.events = kept
    broken = live_peak(t).peak_bytes
    peak, counters = referee(spec)
    assert peak == sound + counters
    assert broken > sound and peak != broken + counters
