"""memprof from Python: predict or measure the memory of a model's training step.

`predict` and `measure` take a registry name (`vit-b-16`, `timm:convnext_base`, `py:pkg.mod:factory`) or a
zero-argument factory returning an nn.Module, and run exactly what `memprof run` runs: the options are
validated by memprof.plan.plan_run and the configuration executed by memprof.plan.execute (the simulation
in-process; a measurement in a fresh worker process, as the CLI does). `predict_step` traces a user's own
training step (build, batch, step) through the same tracer, CUDA rules and allocator replay as `predict`
(memprof.simulation.tracing.trace_step, memprof.simulation.simulate.predict_traced); the harness's own step is one user of that
path (memprof.harness.run_steps). Every result says whether its figures are predicted or measured.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from memprof.errors import UsageError

from memprof.backends.base import MEASURED, PREDICTED
from memprof.options import OPTIONS, SUITE

# the keywords predict/measure take beyond their named parameters: every grid option of the table
RUN_KEYWORDS = tuple(o.name for o in OPTIONS if SUITE in o.commands and o.name not in ("models", "optims", "backend"))
from memprof.results import Result  # noqa: F401  (memprof.Result)


def _model_name(model: str | Callable[[], Any]) -> str:
    from memprof.model_sources.py import factory_name

    if isinstance(model, str):
        if "," in model or model == "paper":
            raise UsageError(f"model '{model}': give one model (for a grid use `memprof run --models`)")
        return model
    if type(model).__module__.startswith("torch.nn") or hasattr(model, "named_parameters"):
        raise UsageError(f"model: a {type(model).__name__} instance; pass a zero-argument factory that builds it "
                         f"(e.g. `lambda: MyModel()`), a registry name, or predict your own step with "
                         f"memprof.predict_step / memprof.simulated_cuda")
    if callable(model):
        return factory_name(model)
    raise UsageError(f"model {model!r}: give a model name or a zero-argument factory returning an nn.Module")


def plan_one(model, optimizer, backend: str, source: str, out: str, **options):
    """The validated plan of one configuration: the options checked against the table (memprof.options) by
    plan_run, as `memprof run` and a suite's [[run]] are."""
    from memprof.backends.registry import get
    from memprof.executors.runner import runs_in_caller
    from memprof.models import local_only
    from memprof.plan import plan_run, run_options

    chosen = get(backend)
    if chosen.source != source:
        raise UsageError(f"backend '{backend}' gives {chosen.source} figures: use memprof."
                         f"{'predict' if chosen.source == PREDICTED else 'measure'}()")
    if not isinstance(optimizer, str) or "," in optimizer or optimizer in ("paper", "all"):
        raise UsageError(f"optimizer {optimizer!r}: give one optimizer name (`memprof list optims`)")
    name = _model_name(model)
    if not runs_in_caller(chosen, 1, 1) and local_only(name):
        raise UsageError(f"model {getattr(model, '__qualname__', model)}: a measurement runs in a fresh process, "
                         f"which can only import a module-level factory; define it at the top level of a module")
    unknown = sorted(set(options) - set(RUN_KEYWORDS))  # (typed values go as they are: each row parses its own)
    if not unknown:
        from memprof.options import parse

        for key, value in options.items():
            parsed = parse(key, value)
            if isinstance(parsed, list) and len(parsed) > 1:
                raise UsageError(f"{key}={value!r}: give one value (a grid is `memprof run`'s)", option=key)
    if unknown:
        from memprof.errors import unknown_name

        raise unknown_name("keyword", unknown[0], RUN_KEYWORDS, "help(memprof.predict)")
    return plan_run(run_options(models=name, optims=optimizer, backend=backend, out=out, progress=False, **options))


def _run_one(model, optimizer, backend: str, source: str, out: str | None, **options) -> Result:
    """One configuration through plan_one and execute (the CLI's path, the same option table and checks), into
    `out` or a temporary directory, on a backend whose figures are `source` (predicted or measured)."""
    from memprof.plan import execute

    with tempfile.TemporaryDirectory(prefix="memprof-api-") as tmp:
        records = execute(plan_one(model, optimizer, backend, source, out or os.path.join(tmp, "run"), **options))
    return Result(records[-1])


def predict(model: str | Callable[[], Any], optimizer: str = "adamw", batch_size: int = 1, precision: str = "fp32",
            grad_ckpt: bool = False, budget: str = "titan-x", *, backend: str = "simulate", out: str | None = None,
            **options) -> Result:
    """Predict (no GPU needed) what torch.cuda would report for one training configuration on `budget`: the
    `simulate` backend of `memprof run` (or another predicting backend), in this process. Every option of
    `memprof run` is a keyword here (state_bits, steps, optim_impl, optim_in_backward, parallel, world_size,
    freeze, input_shape, ...), with the same checks. `out`: keep results.jsonl there."""
    return _run_one(model, optimizer, backend, PREDICTED, out, batch_size=batch_size, precision=precision,
                    grad_ckpt=grad_ckpt, budget=budget, **options)


def measure(model: str | Callable[[], Any], optimizer: str = "adamw", batch_size: int = 1, precision: str = "fp32",
            grad_ckpt: bool = False, budget: str = "device", *, backend: str = "cuda", out: str | None = None,
            **options) -> Result:
    """Measure one configuration in a fresh worker process, as `memprof run` does: on a CUDA GPU
    (torch.cuda and NVML; `budget` emulates a smaller card) or with backend="cpu" (live tensor bytes). Every
    option of `memprof run` is a keyword here, as for `predict`."""
    return _run_one(model, optimizer, backend, MEASURED, out, batch_size=batch_size, precision=precision,
                    grad_ckpt=grad_ckpt, budget=budget, **options)


def predict_step(build: Callable[[], tuple], step: Callable[[Any, Any, Any], Any], batch: Callable[[], Any], *,
                 budget: str = "titan-x", steps: int = 2, rules: str = "cuda", label: str | None = None,
                 backend: str = "simulate") -> Result:
    """Predict the memory of a user's own training step without a GPU.

    `build()` returns (model, optimizer), `batch()` the inputs, `step(model, optimizer, inputs)` runs one step.
    rules="cuda": the prediction of torch.cuda's peaks on `budget`, on the predicting backend's device (simulate:
    the simulated card, memprof.script.device.SimulatedCuda, through the engine's entrance as `predict`): build() runs
    on the meta device (constructors allocate nothing) and may call `.cuda()`, `.to("cuda")` or use `device="cuda"`;
    the model is then moved to the device (each Parameter object kept, so the optimizer and any hook build()
    registered stay attached), optimizers resolve foreach/fused as on CUDA, `torch.autocast("cuda")` follows
    CUDA's op lists, and the inputs batch() returns are moved to the device. The record's key and fields say
    what was detected (batch size, precision, optimizer and its implementation, checkpointing).
    rules="cpu": peak live tensor bytes under CPU rules, the quantity `measure_step(..., backend="cpu")` measures."""
    return _step(build, step, batch, backend, PREDICTED, budget=budget, steps=steps, label=label, rules=rules)


def measure_step(build: Callable[[], tuple], step: Callable[[Any, Any, Any], Any], batch: Callable[[], Any], *,
                 backend: str = "cpu", budget: str | None = None, steps: int = 2, label: str | None = None) -> Result:
    """Measure a user's own training step in this process on a measuring backend's device: backend="cpu": peak live
    tensor bytes on real CPU tensors through the simulation's tracker (equal to predict_step(rules="cpu") on the same
    step); backend="cuda": torch.cuda's peaks per phase on the GPU (memprof.script.measure.MeasuredCuda: the model
    built on the GPU by build(), so its parameters count)."""
    return _step(build, step, batch, backend, MEASURED, budget=budget, steps=steps, label=label)


def run_step(build: Callable[[], tuple], step: Callable[[Any, Any, Any], Any], batch: Callable[[], Any], *,
             backend: str, budget: str | None = None, steps: int = 2, label: str | None = None) -> Result:
    """A user's own training step on any backend's device (the pytest plugin's door): predicted or measured as the
    backend's figures are."""
    from memprof.backends.registry import get

    return _step(build, step, batch, backend, get(backend).source, budget=budget, steps=steps, label=label)


def _step(build, step, batch, backend: str, source: str, *, budget, steps: int, label, rules: str = "cuda") -> Result:
    """A user's step on `backend` (memprof.backends.base.Backend.run_step), whose figures must be `source`'s."""
    from memprof.backends.registry import get
    from memprof.spec import MIN_STEPS

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise UsageError(f"steps {steps}: use at least {MIN_STEPS}, so a step runs with optimizer state present")
    chosen = get(backend)
    if chosen.source != source:
        raise UsageError(f"backend '{backend}' gives {chosen.source} figures: use memprof."
                         f"{'predict_step' if chosen.source == PREDICTED else 'measure_step'}()")
    return chosen.run_step(build, step, batch, budget=budget, steps=steps, label=label, rules=rules)


