"""A user's script run as __main__ on the simulated CUDA device, and the record of what it did.

`run_script(path, args, budget, steps)` runs the file (runpy, with sys.argv and sys.path[0] as `python FILE
ARGS` would set them) inside memprof.script.device.SimulatedCuda and returns its Result; `summary(result)` is
the terminal's short text. The record has the schema of `memprof run`'s (memprof.results.make_record):
every figure from the engine (memprof.script.record), plus what was detected (`script_*`
fields), and a key combining the script, its arguments, the budget and what ran, so different runs never
collide.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys

from memprof.errors import UsageError
from memprof.script.record import result_of, script_label


def device_kind(backend: str):
    """Where a script runs for `--backend`: the simulated card for a predicting backend, the GPU at hand for a
    measuring one that has a GPU (memprof.backends.registry); any other is bad input."""
    from memprof.backends.base import PREDICTED
    from memprof.backends.registry import get
    from memprof.script.device import SimulatedCuda
    from memprof.script.measure import MeasuredCuda

    chosen = get(backend)
    if chosen.source == PREDICTED:
        return SimulatedCuda
    if chosen.gpus:
        return MeasuredCuda
    raise UsageError(f"--backend {backend}: a script runs on the simulated card (simulate, the default) or on a "
                     f"GPU (cuda)")


def run_script(path: str, args: list[str] = (), budget: str = "titan-x", steps: int | None = None,
               out_dir: str | None = None, snapshot_dir: str | None = None, backend: str = "simulate",
               world_size: int | None = None):
    """Run the script at `path` with `args` on the simulated `budget` card; its Result (predicted). With `out_dir`
    the timeline is written there, with `snapshot_dir` the predicted snapshot. backend="cuda": run it for real on
    the GPU at hand and measure (memprof.script.measure; `budget` is only judged against). `world_size`: a
    torchrun-style script runs as rank 0 of that many (memprof.script.parallel; measured: 1 only)."""
    from memprof.script.counting import StopSimulation
    from memprof.script.device import SimulatedCuda

    if not os.path.isfile(path):
        raise UsageError(f"no script at {path}: give the path of a Python file")
    kind = device_kind(backend)
    args = list(args)
    sim = kind(budget, steps=steps, user_file=path, label=script_label(path, args), world_size=world_size)
    sim.script_args = args
    saved_argv = sys.argv
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        with sim:
            runpy.run_path(path, run_name="__main__")
    except StopSimulation:
        pass
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise UsageError(f"{path} exited with status {exc.code} on the simulated device") from None
    finally:
        sys.argv = saved_argv
        if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(path)):
            del sys.path[0]
    sim._result = result_of(sim, out_dir, snapshot_dir) if kind is SimulatedCuda else sim.result
    return sim.result


def _gib(nbytes) -> str:
    from memprof.budget import format_size as gib

    return gib(nbytes)


def summary(result) -> str:
    """A few lines: the predicted peaks on the card, fits, what was detected, the notes."""
    r, m = result.record, result.record["metrics"]
    spec = r["spec"]
    measured = r["source"] == "measured"
    where = f"measured on {m['budget_device']}" if measured else f"on a simulated {spec['budget']} card (predicted, no GPU used)"
    lines = [f"{m.get('script_path') or spec['model']} {where}"]
    lines.append(f"  peak allocated {_gib(m['peak_allocated_bytes'])}, reserved {_gib(m['peak_reserved_bytes'])} "
                 f"(torch.cuda.max_memory_allocated / max_memory_reserved, {r['source']}); fits: {m.get('fits', '-')}"
                 + (f" (over by {_gib(m['over_budget_bytes'])})" if m.get("over_budget_bytes") else ""))
    if m.get("oom") and not measured:
        oom = m["oom"]
        lines.append(f"  OUT OF MEMORY (predicted) on the card in {oom['phase']} of step {oom['step']}, at {oom['op']} "
                     f"(asking {_gib(oom['requested_bytes'])} with {_gib(oom['reserved_bytes'])} reserved of "
                     f"{_gib(oom['usable_bytes'])} usable); the script ran on, the figures are as on a card with room")
    if m.get("oom") and measured:
        lines.append(f"  OUT OF MEMORY (measured) in {m['oom']['phase']}: {m['oom']['message']}")
    lines.append(f"  at the peak: {m.get('peak_phase')}" + (
        f" of step {m.get('peak_step')}, op {m.get('peak_op')}" if not measured else ""))
    if m.get("breakdown_at_peak_bytes"):
        lines.append("  breakdown: " + ", ".join(f"{k} {_gib(v)}" for k, v in m["breakdown_at_peak_bytes"].items() if v))
    opts = m.get("script_optimizers") or []
    opt = ", ".join(f"{o['name']} ({o['implementation']})" for o in opts[:1]) + (
        f" x{len(opts)}" if len(opts) > 1 else "") if opts else "none stepped"
    lines.append(f"  detected: batch size {m.get('script_batch_size') or '?'}, precision {m.get('script_precision')}, "
                 f"optimizer {opt}{' in backward' if m.get('script_optimizer_in_backward') else ''}, "
                 f"checkpointing {'seen' if m.get('script_checkpointing') else 'not seen'}, "
                 f"parameters {m.get('params_trainable', 0):,} trainable / {m.get('params_frozen', 0):,} frozen, "
                 f"{m.get('script_steps')} optimizer step{'' if m.get('script_steps') == 1 else 's'}")
    for note in m.get("notes") or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def with_batch(args: list[str], flag: str, batch: int) -> list[str]:
    """`args` with the script's batch flag set to `batch` (replacing `FLAG N` or `FLAG=N`, else appended)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            i += 2
            continue
        if args[i].startswith(flag + "="):
            i += 1
            continue
        out.append(args[i])
        i += 1
    return [*out, flag, str(batch)]


def fits(result) -> bool:
    """A probe fits when the prediction (and its upper band) fits the card."""
    return result.status == "ok" and result.record["metrics"].get("fits") == "yes"


def check_batch_arg(batch_arg: str, option: str = "--batch-arg") -> None:
    if not batch_arg.startswith("-"):
        raise UsageError(f"{option} {batch_arg}: give the script's flag, e.g. {option}=--batch-size")


def fit_script(path: str, args: list[str], batch_arg: str, budget: str = "titan-x", steps: int | None = 2,
               max_batch: int = 1 << 16, on_probe=None, world_size: int | None = None, option: str = "--batch-arg"):
    """The largest value of the script's own batch flag whose prediction fits the card: doubling from 1 until a
    probe does not fit, then bisection. Returns (largest fitting Result or None, smallest failing batch or None,
    probes [(batch, Result)]). Every probe is a full run of the script on the simulated card (predicted). `option`
    is the command-line option that gave `batch_arg` (named in the errors)."""
    check_batch_arg(batch_arg, option)
    probes: dict[int, object] = {}

    def probe(batch: int):
        if batch not in probes:
            said = io.StringIO()
            probe_args = with_batch(list(args), batch_arg, batch)
            try:
                # the script's own output, once per probe, is dropped (its last error line is kept for the message)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
                    probes[batch] = run_script(path, probe_args, budget=budget, steps=steps, world_size=world_size)
            except UsageError as exc:
                last = next((line.strip() for line in reversed(said.getvalue().splitlines()) if line.strip()), "")
                if "exited with status" not in str(exc):
                    raise
                raise UsageError(f"{path} exited when run with {batch_arg} {batch}" + (f" ({last})" if last else "")
                                 + f": does it take {batch_arg} N? give its own batch flag with {option}=FLAG") \
                    from None
            if on_probe is not None:
                on_probe(batch, probes[batch])
        return probes[batch]

    low, high = 0, None  # largest fitting, smallest failing
    batch = 1
    while batch <= max_batch:
        if fits(probe(batch)):
            low, batch = batch, batch * 2
        else:
            high = batch
            break
    if high is not None:
        while high - low > 1:
            mid = (low + high) // 2
            if fits(probe(mid)):
                low = mid
            else:
                high = mid
    return (probes[low] if low else None), high, sorted(probes.items())
