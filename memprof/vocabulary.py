"""The words records and reports share, each a `str` Enum: a member equals the string it has always been written
as (`Status.OK == "ok"`), hashes like it (a dict keyed by either finds the other) and serializes to it, so a
results.jsonl reads and writes byte for byte as before. Torch-free (reports name them without the engine)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What became of one configuration."""
    OK = "ok"  # it ran: its figures are in the record
    OOM = "oom"  # it ran out of memory on the budget card (predicted or measured), where and how far is recorded
    SKIPPED = "skipped"  # the combination cannot run (the record says why); nothing ran
    ERROR = "error"  # it failed (the record has the error); the run exits 1
    CRASHED = "crashed"  # its worker process died (the exit code is in the error); the run exits 1
    INCOMPLETE = "incomplete"  # a script that trained no step, or put nothing on the device

    @property
    def failed(self) -> bool:
        """Gave no result: a run with any such configuration exits 1 (`--retry-failed` reruns them)."""
        return self in FAILED

    @property
    def ran(self) -> bool:
        """Ran to a figure: ok, or out of memory with the figure up to where it stopped."""
        return self in (Status.OK, Status.OOM)


FAILED = (Status.ERROR, Status.CRASHED)


class Source(StrEnum):
    """Where a record's figures come from."""
    PREDICTED = "predicted"  # the simulation (no GPU used)
    MEASURED = "measured"  # a device, measured


class Phase(StrEnum):
    """The part of a training step a figure falls in, in the order a step passes through them."""
    SETUP = "setup"  # model and optimizer built and moved, before the first forward
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"  # optimizer.step (and zero_grad)
    DONE = "done"  # after the last step


STEP_PHASES = (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER)  # the phases a record's per-phase peaks name


class Category(StrEnum):
    """What a storage holds (memprof.simulation.tracing assigns one to each): the keys of a record's
    `breakdown_at_peak_bytes`, in the order reports stack them."""
    PARAMETERS = "parameters"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    WORKSPACE = "workspace"
    COMMUNICATION = "communication"  # DDP buckets, FSDP all-gather / reduce-scatter buffers
