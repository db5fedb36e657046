"""A user's own training step (build, batch, step: memprof.api.predict_step / measure_step, the pytest plugin) on a
backend's device, run as a script's steps run on it.

`run_user_steps(device, ...)`: inside the device's block, build() makes the model and optimizer the way that device
builds them (the simulated card: on the meta device, then moved, so constructors allocate nothing; a GPU: under
`torch.device("cuda")`), batch() gives the inputs (moved to the device), and `steps` steps run through the harness's
own loop (memprof.harness.run_steps); the Result is the device's. `cpu_rules_step`: the same step traced under the
CPU's rules, on fake tensors (predicted) or real ones (measured): peak live tensor bytes, no allocator.
"""

from __future__ import annotations

import time

import torch
from torch.utils._pytree import tree_map

from memprof.errors import UsageError


def user_build(build):
    """build() checked to return (model, optimizer); as the harness's builds: (model, optimizer, frozen names)."""
    def wrapped():
        got = build()
        if not (isinstance(got, tuple) and len(got) == 2):
            raise UsageError("build() must return (model, optimizer)")
        model, optimizer = got
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"build() returned a {type(model).__name__} as the model: return (nn.Module, optimizer)")
        return model, optimizer, sorted(n for n, p in model.named_parameters() if not p.requires_grad)

    return wrapped


def step_label(build, label: str | None) -> str:
    return label or f"step:{getattr(build, '__module__', '?')}.{getattr(build, '__qualname__', 'build')}"


def to_cuda(value):
    """A batch's tensor moved to the CUDA device (what the simulated and the measured device do with inputs)."""
    return value.cuda() if isinstance(value, torch.Tensor) else value


def run_user_steps(device, build, step, batch, steps: int):
    """The Result of `steps` calls of step(model, optimizer, batch()) after build(), inside `device`'s block: the
    device builds the model (`build_user`) and moves each input (`move_input`)."""
    from memprof.harness import run_steps

    with device:
        model, optimizer, _frozen = device.build_user(user_build(build))
        run_steps(model, optimizer, lambda: tree_map(device.move_input, batch()), step, steps, lambda *_: None)
        del model, optimizer
    return device.result


def cpu_rules_step(build, step, batch, *, steps: int, budget: str | None, label: str | None, fake: bool):
    """The Result of the step traced under the CPU's rules: on fake tensors (`fake`, predicted) or real ones
    (measured on the CPU): peak live tensor bytes (memprof.simulation.simulate.cpu_rules_metrics)."""
    from memprof.harness import run_steps
    from memprof.results import Result, environment, make_record
    from memprof.vocabulary import Source
    from memprof.simulation.simulate import cpu_rules_metrics
    from memprof.simulation.tracing import trace_step
    from memprof.spec import RunSpec

    def run(model, optimizer, on_phase):
        run_steps(model, optimizer, batch, step, steps, on_phase)

    start = time.perf_counter()
    _, metrics = cpu_rules_metrics(trace_step(user_build(build), run, (), fake=fake))
    if budget is not None and fake:
        from memprof.budget import parse_budget

        device = parse_budget(budget)
        metrics.update(budget_device=device.label, budget_bytes=device.total_bytes)
    spec = RunSpec(model=step_label(build, label), optim="custom", steps=steps, budget=budget or "device")
    env = environment("simulate-cpu-rules", "cpu-simulated") if fake else environment("cpu", "cpu")
    return Result(make_record(spec, "ok", Source.PREDICTED if fake else Source.MEASURED, env, metrics,
                              elapsed_s=time.perf_counter() - start))


def remaining_meta(model, device) -> None:
    """Plain tensor attributes a constructor left on the meta device (caches some towers build in __init__):
    `Module.to` does not move them, so they get device storage here, as memprof's registry path gives them."""
    for module in model.modules():
        for key, v in list(vars(module).items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta" and not key.startswith("_"):
                setattr(module, key, device.calls.to_device(v, op="Module.to (plain tensor attribute)"))
