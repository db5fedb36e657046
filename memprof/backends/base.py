"""The Backend protocol: what the runner, the worker, fit, the API and the pytest plugin ask of a backend.

A backend is an object with these attributes and methods (memprof.backends.registry finds it by name):

- `name`; `source`: PREDICTED or MEASURED, what its figures are;
- `isolation`: where a configuration runs: "in-process" (the caller's process), "pooled" (worker processes
  that serve many configurations; in the caller when one job is asked and the device is not exclusive) or
  "fresh-process" (a new worker process per configuration); `exclusive`: one configuration at a time (a
  device that measures);
- `default_budget`: the `--budget` it takes when none is given; `takes`: the run options it accepts beyond
  the common ones (e.g. "snapshot", "nvml_period_ms"); `gpus`: GPUs a configuration needs; `fit_refusal`:
  why `memprof fit` cannot search with it (None: it can);
- `unavailable()`: why it cannot run here (None: it can); `device_name()`; `describe()`: the line that
  announces it;
- `check(opts, notes)`: validate what is backend-specific in a run's options (budget, parallelism, models),
  raising memprof.errors.UsageError, adding notes; `worker_options(opts)`: the keywords `run` takes;
- `run(spec, out_dir=None, **options) -> Outcome` (`out_dir`: where a run's files may go); `device_total_bytes()`:
  what budget `device` means; `affinity(spec)`: configurations with the same value go to the same
  pooled worker (None: any); `probe(spec)`: a callable batch -> Outcome for `memprof fit`'s search, run
  where the backend runs;
- `device(budget, steps=, user_file=, label=, world_size=)`: a context that runs user code (`memprof script`,
  `memprof.simulated_cuda`) on its device, whose `result` is a record as `run`'s are (simulate: the simulated card,
  memprof.script.device; cuda: the GPU, memprof.script.measure; the default refuses in one line), and
  `run_step(build, step, batch, ...)`: a user's own step on it (memprof.api, the pytest plugin).

`Backend` below gives the defaults; a third-party backend subclasses it (or provides the same attributes)
and registers through the `memprof.backends` entry-point group or memprof.backends.registry.register.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from memprof.vocabulary import Source

PREDICTED, MEASURED = Source.PREDICTED, Source.MEASURED  # backends declare their source with these


@dataclass
class Outcome:
    """What one configuration gave: status (ok, oom), metrics (units in the names) and artifacts (files written,
    by kind: timeline_file, snapshot_file), which a record keeps among its metrics."""
    status: str
    metrics: dict
    artifacts: dict = field(default_factory=dict)


class Backend:
    name = ""
    source = PREDICTED
    isolation = "in-process"
    exclusive = False
    default_budget = "titan-x"
    takes: frozenset = frozenset()
    fit_refusal: str | None = None  # why `memprof fit` cannot search with it (None: it can)
    gpus = 0  # GPUs a configuration needs (a Ray task asks for them)

    def unavailable(self) -> str | None:
        return None

    def device_name(self) -> str:
        return self.name

    def describe(self) -> str:
        return "every figure is predicted, not measured" if self.source == PREDICTED else f"measuring on {self.device_name()}"

    def check(self, opts: dict, notes: list) -> None:
        """Backend-specific validation of a run's options (the common ones are memprof.plan's)."""
        from memprof.errors import UsageError

        if opts.get("parallel", "none") not in ("none", None):
            raise UsageError(f"--parallel {opts['parallel']}: the {self.name} backend has no parallel runs",
                             option="parallel")

    def check_model(self, name: str) -> None:
        """A UsageError for a model this backend cannot run (by name, before anything is built)."""

    def worker_options(self, opts: dict) -> dict:
        return {}

    def device_total_bytes(self) -> int | None:
        """What budget `device` means: the device's memory (None: no limit, e.g. host memory)."""
        return None

    def affinity(self, spec):
        return None

    def run(self, spec, **options) -> Outcome:
        raise NotImplementedError

    def device(self, budget: str | None = None, *, steps: int | None = None, user_file: str | None = None,
               label: str | None = None, world_size: int | None = None):
        """A context manager that runs user code on this backend's device (a script, `memprof.simulated_cuda`, a
        step of memprof.api or the pytest plugin); after the block its `result` is the record, as a grid
        configuration's. `budget`: the card the verdict is for; `steps`: stop after that many optimizer steps;
        `user_file`: the script whose lines errors name; `world_size`: a torchrun script's ranks."""
        from memprof.errors import UsageError

        raise UsageError(f"the {self.name} backend runs no user code (a script or a step): use simulate (predicts "
                         f"on a simulated card) or cuda (measures on a GPU)")

    def run_step(self, build, step, batch, *, budget: str | None, steps: int, label: str | None,
                 rules: str = "cuda"):
        """The Result of a user's own training step (memprof.api.predict_step / measure_step, the pytest plugin):
        `steps` steps of step(model, optimizer, batch()) after build(), on this backend's device."""
        from memprof.errors import UsageError
        from memprof.script.steps import run_user_steps, step_label

        if rules != "cuda":
            raise UsageError(f"rules={rules!r}: the {self.name} backend predicts with the CUDA rules only")
        return run_user_steps(self.device(budget, label=step_label(build, label)), build, step, batch, steps)

    def probe(self, spec, **options):
        """batch size -> Outcome, each a run of `spec` at that batch (memprof.planning.fit searches with it)."""
        return lambda batch: self.run(replace(spec, batch_size=batch), **options)


def as_outcome(result) -> Outcome:
    """A backend's answer as an Outcome (a (status, metrics) pair is accepted from simple backends)."""
    if isinstance(result, Outcome):
        return result
    status, metrics = result
    return Outcome(status, metrics)
