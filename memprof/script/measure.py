"""`memprof script --backend cuda`: the same script run for real on the GPU at hand, measured.

MeasuredCuda is the measuring twin of memprof.script.device.SimulatedCuda: the same detection (batch size, autocast
dtypes, GradScaler, optimizers and their resolved implementation, checkpointing, optimizer-in-backward, steps) and
the same phases (forward, backward, optimizer) from the same hooks, so its record's key equals the prediction's
(backend `cuda` instead of `simulate`) and the two sit side by side for `memprof fidelity`. At every phase boundary
the device is synchronised, the phase's torch.cuda.max_memory_allocated / max_memory_reserved are read and the peaks
reset (as the `cuda` backend of `memprof run` does, memprof.backends.cuda): the overall peak is the largest phase
peak. Figures are measured; a budget other than the card is only judged against (not emulated), and says so.
"""

from __future__ import annotations

import time

import torch

from memprof.errors import UsageError
from memprof.script.cuda_peaks import PhasePeaks
from memprof.script.detection import Detection, StopSimulation
from memprof.script.failures import user_frame
from memprof.script.patches import Patches



class MeasuredCuda(Detection):
    """Context manager: measure the code inside on the real CUDA device (see the module docstring)."""

    def __init__(self, budget: str | None = None, steps: int | None = None, user_file: str | None = None,
                 label: str | None = None, world_size: int | None = None):
        if world_size not in (None, 1):
            raise UsageError(f"--world-size {world_size}: one GPU measures world size 1 only; predict larger worlds "
                             f"on the simulated card (leave --backend out)")
        self.world_size = world_size
        self.budget = None if budget == "device" else budget  # (the card itself)
        self.max_steps = steps
        self.user_file = user_file
        if label is None:
            fr = user_frame()
            label = f"code:{fr[0].rsplit('/', 1)[-1]}:{fr[1]}" if fr else "code"
        self.label = label
        self.notes: dict[str, str] = {}
        self._start_detection()
        self._result = None

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, text)

    @staticmethod
    def move_input(value):
        """A user step's input, on the device (memprof.script.steps)."""
        from memprof.script.steps import to_cuda

        return to_cuda(value)

    def build_user(self, build):
        """A user's build() inside the block, on the GPU (memprof.script.steps)."""
        with torch.device("cuda"):
            return build()

    # --- phases and peaks (memprof.script.cuda_peaks) ----------------------------------------------------------
    def _phase(self, name: str) -> None:
        self.peaks.enter(name)

    def _enter_forward(self) -> None:
        if self.peaks.current != "forward":
            self._phase("forward")

    def _on_root(self, module) -> None:
        from memprof.script.parallel import parallel_of

        self.detected.update(parallel_of(module))  # DDP / FSDP2, as the simulated device records it

    def _on_optimizer_post(self, optimizer) -> None:
        self._state_bytes[id(optimizer)] = sum(
            t.untyped_storage().nbytes() for st in optimizer.state.values() for k, t in st.items()
            if isinstance(t, torch.Tensor) and t.is_cuda and k != "step")

    # --- enter / exit -----------------------------------------------------------------------------------------
    def __enter__(self) -> "MeasuredCuda":
        if not torch.cuda.is_available():
            raise UsageError("--backend cuda measures on a CUDA GPU and this machine has none: leave --backend out "
                             "to predict (the simulated card)")
        self._start = time.perf_counter()
        self._start_detection()
        self._state_bytes = {}
        self._patches = patches = Patches()
        try:
            if self.world_size is not None:  # a torchrun script's own init_process_group, on this one GPU
                from memprof.script.parallel import environment

                patches.enter_context(environment(self.world_size))
            self._install_detection(patches)
            torch.cuda.synchronize()
            # what the process held before the code is not the code's
            self.peaks = PhasePeaks(base_bytes=torch.cuda.memory_allocated())
            self.peaks.start()
        except BaseException:
            patches.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._end_phase = self.peaks.current
            self._phase("done")
            self._oom = exc if isinstance(exc, torch.OutOfMemoryError) else None
        finally:
            self._patches.close()
        if self._oom is not None:
            return True  # a measured out-of-memory is a result
        return isinstance(exc, StopSimulation)

    @property
    def result(self):
        return self.result_with()

    def result_with(self, out_dir: str | None = None, snapshot_dir: str | None = None):
        """The block's Result (measured); a measurement writes no timeline or predicted snapshot."""
        if self._result is None:
            self._result = measured_result(self)
        return self._result


def measured_result(meas):
    """The Result of a finished MeasuredCuda block (measured)."""
    from memprof.vocabulary import Source
    from memprof.budget import CONTEXT_ESTIMATE_BYTES, parse_budget
    from memprof.results import environment
    from memprof.adapters import parameter_split
    from memprof.script.record import script_result

    name = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    info = meas._param_info.values()
    metrics = {
        **meas.peaks.metrics(),
        "params_total": sum(n for _, n, _, _, _ in info),
        "params_trainable": sum(n for _, n, _, rg, _ in info if rg),
        "params_frozen": sum(n for _, n, _, rg, _ in info if not rg),
        **parameter_split((name, n, size, rg) for name, n, size, rg, _ in info),
        "optimizer_state_bytes": sum(meas._state_bytes.values()),
        "budget_device": name,
        "budget_bytes": total,
        "baseline_allocated_bytes": meas.peaks.base_bytes,
        "notes": list(meas.notes.values()),
    }
    status = "ok"
    if meas._oom is not None:
        status = "oom"
        metrics["oom"] = {"phase": meas._end_phase, "message": str(meas._oom).splitlines()[0][:300]}
    budget = meas.budget
    if budget is not None:
        card = parse_budget(budget)
        if card.total_bytes < total * 0.97:
            metrics["notes"].append(f"--budget {budget} is smaller than this {name}: not emulated here; fits is judged "
                                    f"from the measured reserved peak plus a {CONTEXT_ESTIMATE_BYTES >> 20} MiB context "
                                    f"estimate")
        metrics["fits"] = "yes" if metrics["peak_reserved_bytes"] + card.context_bytes <= card.total_bytes else "no"
    if budget is None:
        meas.budget = "device"
    try:
        return script_result(meas, status, Source.MEASURED, environment("cuda", name), metrics)
    finally:
        meas.budget = budget
