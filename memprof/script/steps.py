"""memprof.predict_step on the simulated CUDA device: a user's build / batch / step, run as a script would
run them (memprof.script.device.SimulatedCuda), through the engine's predict_traced."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from memprof.errors import UsageError


def _to_device(value):
    return value.cuda() if isinstance(value, torch.Tensor) else value


def _remaining_meta(model, sim) -> None:
    """Plain tensor attributes a constructor left on the meta device (caches some towers build in __init__):
    `Module.to` does not move them, so they get device storage here, as memprof's registry path gives them."""
    for module in model.modules():
        for key, v in list(vars(module).items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta" and not key.startswith("_"):
                setattr(module, key, sim._to_sim(v, op="Module.to (plain tensor attribute)"))


def predict_step_simulated(build, step, batch, *, budget: str, steps: int, label: str):
    """The Result (predicted) of `steps` calls of step(model, optimizer, batch()) after build(); build returns
    (model, optimizer, frozen names) (memprof.api._user_build)."""
    from memprof.harness import run_steps
    from memprof.script.device import SimulatedCuda

    sim = SimulatedCuda(budget, label=label)
    with sim:
        with torch.device("meta"):  # constructors allocate nothing; device="cuda" and .cuda() still reach the device
            model, optimizer, _frozen = build()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"build() returned a {type(model).__name__} as the model: return (nn.Module, optimizer)")
        model.cuda()  # a no-op for what build() already put there
        _remaining_meta(model, sim)
        run_steps(model, optimizer, lambda: tree_map(_to_device, batch()), step, steps, lambda *_: None)
        del model, optimizer
    return sim.result
