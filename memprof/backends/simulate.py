"""Backend `simulate`: the engine's prediction (memprof.simulation.simulate) of what torch.cuda would report,
with the files a prediction leaves beside a run: its timeline (memprof.reports.timeline) and, asked for, its
predicted allocator snapshot (memprof.reports.snapshot), both made from the Prediction. Every figure is a
prediction."""

from __future__ import annotations


from memprof.reports.artifacts import write_artifacts
from memprof.backends.base import PREDICTED, Backend, Outcome
from memprof.errors import UsageError


class SimulateBackend(Backend):
    name = "simulate"
    source = PREDICTED
    isolation = "pooled"  # a worker keeps its forward traces for the next optimizer (memprof.simulation.shared)
    exclusive = False
    default_budget = "titan-x"
    takes = frozenset({"snapshot"})

    def device_name(self) -> str:
        return "cpu-simulated"

    def describe(self) -> str:
        return "every figure is predicted, not measured"

    def check(self, opts: dict, notes: list) -> None:
        if opts.get("budget") == "device":
            raise UsageError("--budget device: the simulation predicts for a named card; give one, e.g. titan-x",
                             option="budget")

    def check_model(self, name: str) -> None:
        from memprof.models import check_simulatable

        check_simulatable(name)

    def worker_options(self, opts: dict) -> dict:
        return {"snapshot_dir": opts["snapshot"]} if opts.get("snapshot") else {}

    def affinity(self, spec):
        from memprof.spec import forward_group

        return forward_group(spec)

    def run(self, spec, out_dir: str | None = None, snapshot_dir: str | None = None, **_) -> Outcome:
        """The prediction of `spec`; with `out_dir` its timeline goes to out_dir/timelines/, with `snapshot_dir`
        its predicted snapshot of the budget card's replay goes there, named by the record key."""
        from memprof.simulation.simulate import prediction

        switches = _sdpa_switches()
        p = prediction(spec, history=out_dir is not None, capped_history=snapshot_dir is not None)
        return Outcome(p.status, {**p.metrics, **switches}, write_artifacts(spec, p, out_dir, snapshot_dir))

    def probe(self, spec, **options):
        """Probes by prediction in this process; once three batch sizes (2 or more) of the configuration's
        forward group are traced and agree on a line, the forward at other batches is synthesized from it
        (memprof.simulation.batch_scaling), exactly as a trace would give it."""
        from dataclasses import replace

        from memprof.simulation.memo import MEMO
        from memprof.simulation.simulate import prediction

        _sdpa_switches()

        def probe(batch: int) -> Outcome:
            with MEMO.scaling_in_batch():
                p = prediction(replace(spec, batch_size=batch), memo=MEMO)
            return Outcome(p.status, p.metrics)

        return probe

    def device(self, budget: str | None = None, *, steps: int | None = None, user_file: str | None = None,
               label: str | None = None, world_size: int | None = None):
        """The simulated card (memprof.script.device.SimulatedCuda)."""
        from memprof.script.device import SimulatedCuda

        return SimulatedCuda(budget or self.default_budget, steps=steps, user_file=user_file, label=label,
                             world_size=world_size)

    def run_step(self, build, step, batch, *, budget: str | None, steps: int, label: str | None,
                 rules: str = "cuda"):
        """rules="cuda": on the simulated card (Backend.run_step); rules="cpu": peak live tensor bytes under the CPU's
        rules, on fake tensors (the quantity the cpu backend measures)."""
        if rules == "cpu":
            from memprof.script.steps import cpu_rules_step

            return cpu_rules_step(build, step, batch, steps=steps, budget=budget, label=label, fake=True)
        if rules != "cuda":
            raise UsageError(f"rules '{rules}': use cuda (predicts torch.cuda) or cpu (live tensor bytes)")
        return super().run_step(build, step, batch, budget=budget, steps=steps, label=label)



def _sdpa_switches() -> dict:
    """The attention kernels MEMPROF_CUDA_SDPA_DISABLE turns off, off here too (the cuda backend measures with the
    same switch: memprof.harness.sdpa_kernels); the record names them only when one is off."""
    from memprof.harness import sdpa_kernels

    enabled = sdpa_kernels()
    return {} if all(enabled.values()) else {"sdpa_kernels_enabled": enabled}


