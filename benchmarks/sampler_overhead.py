"""Overhead of the 5 ms NVML sampler thread on training-step time, measurable without a GPU.

The sampler takes the GIL every period; a GPU training loop is Python launching kernels, so the cost shows
as slower steps. Here a CPU training loop (the test model, micro-batch 1) runs with no sampler and with
one whose read() blocks 50 us without holding the GIL (as pynvml's ctypes calls do; about an NVML process +
memory query); the GPU check measures the real thing with NVML (scripts/gpu_check.sh). Usage: python benchmarks/sampler_overhead.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

from memprof.harness import prepare
from memprof.backends.nvml import Sampler
from memprof.optims import build_optimizer
from memprof.spec import RunSpec


def step_times(steps: int, sampler: bool) -> list[float]:
    torch.manual_seed(0)
    prepared = prepare(RunSpec("test-vit", "adamw", batch_size=8))
    model = prepared.model
    opt = build_optimizer(prepared.optim_info, list(model.parameters()))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def read():
        time.sleep(50e-6)  # a foreign call: the GIL is released
        return 1, 2

    s = Sampler(read, 0.005).start() if sampler else None
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        out.append(1000 * (time.perf_counter() - t))
    if s:
        s.stop()
    return out[5:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    rounds = {False: [], True: []}
    for _ in range(3):
        for on in (False, True):
            rounds[on].append(statistics.median(step_times(200, on)))
    off, on = statistics.median(rounds[False]), statistics.median(rounds[True])
    print(f"median step: {off:.3f} ms without sampler, {on:.3f} ms with a 5 ms sampler ({100 * (on - off) / off:+.2f}%)")
