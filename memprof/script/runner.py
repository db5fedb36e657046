"""A user's script run as __main__ on the simulated CUDA device, and the record of what it did.

`run_script(path, args, budget, steps)` runs the file (runpy, with sys.argv and sys.path[0] as `python FILE
ARGS` would set them; or a module, as `python -m MODULE ARGS` would) inside the device its backend gives
(memprof.backends.base.Backend.device: the simulated card, or the GPU measured) and returns its Result;
`summary(result)` is the terminal's short text. The record has the schema of `memprof run`'s
(memprof.results.make_record): every figure from the engine (memprof.script.record), plus what was detected
(`script_*` fields), and a key combining the script, its arguments, the budget and what ran, so different runs
never collide.

The script's own errors are the script's (memprof.script.failures): the record says `error` with what ran before
it, and the runner raises ScriptError, which the command line prints as Python would (the traceback, exit 1; a
`sys.exit(N)` exits N). SIGTERM ends the script as it ends `python FILE` (143), whatever `except KeyboardInterrupt`
the script has.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import sys

from memprof.errors import Terminated, UsageError
from memprof.script.failures import ScriptError, is_simulations, script_traceback, user_frame
from memprof.script.record import script_label


class _ScriptTerminated(BaseException):
    """SIGTERM while a script runs: not a KeyboardInterrupt, so the script's own handlers do not swallow it."""


def _on_sigterm(signum, frame):
    raise _ScriptTerminated()


def _target(path: str, module: bool):
    """(what to run, its path for labels and error lines) of FILE or `-m MODULE`."""
    if not module:
        if not os.path.isfile(path):
            raise UsageError(f"no script at {path}: give the path of a Python file (or -m MODULE)")
        return (lambda: runpy.run_path(path, run_name="__main__")), path
    import importlib.util

    try:
        spec = importlib.util.find_spec(path)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise UsageError(f"-m {path}: no module of that name is installed (python -m {path} would fail too)")
    return (lambda: runpy.run_module(path, run_name="__main__", alter_sys=True)), spec.origin


class _Tail:
    """A stream passing everything to `stream`, keeping the last lines written (a script's argparse refusal)."""

    def __init__(self, stream, keep: int = 2000):
        self.stream, self.keep, self.tail = stream, keep, ""

    def write(self, text):
        self.tail = (self.tail + text)[-self.keep:]
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1


def run_script(path: str, args: list[str] = (), budget: str = "titan-x", steps: int | None = None,
               out_dir: str | None = None, snapshot_dir: str | None = None, backend: str = "simulate",
               world_size: int | None = None, module: bool = False):
    """Run the script at `path` (`module`: the module named `path`) with `args` on the simulated `budget` card; its
    Result (predicted). With `out_dir` the timeline is written there, with `snapshot_dir` the predicted snapshot.
    backend="cuda": run it for real on the GPU at hand and measure (memprof.script.measure; `budget` is only judged
    against). `world_size`: a torchrun-style script runs as rank 0 of that many (memprof.script.parallel; measured:
    1 only). The script's own error raises ScriptError after the Result is made (its `result`)."""
    from memprof.backends.registry import AUTO, get, resolve
    from memprof.script.detection import StopSimulation

    run, file = _target(path, module)
    args = list(args)
    chosen = resolve(backend)[0] if backend == AUTO else get(backend)
    sim = chosen.device(budget, steps=steps, user_file=file, label=script_label(file, args), world_size=world_size)
    sim.script_args = args
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [file, *args]
    if not module:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    failure, code, said = None, 0, _Tail(sys.stderr)
    try:
        with sim, contextlib.redirect_stderr(said):
            run()
    except StopSimulation:
        pass
    except SystemExit as exc:
        code = _exit_code(exc)
    except _ScriptTerminated:
        raise Terminated() from None
    except (KeyboardInterrupt, UsageError):
        raise
    except BaseException as exc:  # the script's own error (the simulation's raised UnsupportedCall in __exit__)
        if is_simulations(exc):
            raise
        failure, code = exc, 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sim.error = _error_text(failure, code, file)
    result = sim.result_with(out_dir, snapshot_dir)
    if failure is not None or code:
        text = script_traceback(failure) if failure is not None else ""
        error = ScriptError(failure, text, code)
        error.result, error.stderr = result, said.tail
        raise error
    return result


def _error_text(failure, code: int, file: str) -> str | None:
    if failure is None:
        return f"{file} exited with status {code}" if code else None
    fr = user_frame(failure.__traceback__, file)
    where = f"{fr[0]}:{fr[1]}: " if fr else ""
    first = (str(failure).strip().splitlines() or [""])[0]
    return f"{where}{type(failure).__name__}: {first}"


def _gib(nbytes) -> str:
    from memprof.budget import format_size as gib

    return gib(nbytes)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary(result) -> str:
    """A few lines, each fitted to the terminal: the peaks on the card and the verdict (or why there is none), where
    the peak is, what was detected, the notes."""
    from memprof.reports.terminal import wrapped

    r, m = result.record, result.record["metrics"]
    spec = r["spec"]
    measured = r["source"] == "measured"
    where = f"measured on {m['budget_device']}" if measured else \
        f"on a simulated {spec['budget']} card (predicted, no GPU used)"
    lines = [wrapped(f"{m.get('script_path') or spec['model']} {where}")]
    if r["status"] == "incomplete":
        verdict = f"no verdict: incomplete, {m.get('incomplete_reason')}"
    elif r["status"] == "error":
        verdict = f"no verdict: the script failed ({r.get('error')}); the figures are of what ran before it"
    else:
        verdict = f"fits: {m.get('fits', '-')}" + (f" (over by {_gib(m['over_budget_bytes'])})"
                                                   if m.get("over_budget_bytes") else "")
    lines.append(wrapped(f"peak allocated {_gib(m.get('peak_allocated_bytes', 0))}, reserved "
                         f"{_gib(m.get('peak_reserved_bytes', 0))} (torch.cuda.max_memory_allocated / "
                         f"max_memory_reserved, {r['source']}); {verdict}", "  "))
    if m.get("oom") and not measured:
        oom = m["oom"]
        lines.append(wrapped(f"OUT OF MEMORY (predicted) on the card in {oom['phase']} of step {oom['step']}, at "
                             f"{oom['op']} (asking {_gib(oom['requested_bytes'])} with {_gib(oom['reserved_bytes'])} "
                             f"reserved of {_gib(oom['usable_bytes'])} usable); the script ran on, the figures are "
                             f"as on a card with room", "  "))
    if m.get("oom") and measured:
        lines.append(wrapped(f"OUT OF MEMORY (measured) in {m['oom']['phase']}: {m['oom']['message']}", "  "))
    lines.append(wrapped(f"at the peak: {m.get('peak_phase')}" + (
        f" of step {m.get('peak_step')}, op {m.get('peak_op')}" if not measured else ""), "  "))
    if m.get("breakdown_at_peak_bytes"):
        lines.append(wrapped("breakdown: " + ", ".join(f"{k} {_gib(v)}" for k, v in
                                                      m["breakdown_at_peak_bytes"].items() if v), "  "))
    opts = m.get("script_optimizers") or []
    opt = ", ".join(f"{o['name']} ({o['implementation']})" for o in opts[:1]) + (
        f" x{len(opts)}" if len(opts) > 1 else "") if opts else "none stepped"
    steps = m.get("script_steps") or 0
    lines.append(wrapped(
        f"detected: batch size {m.get('script_batch_size') or '?'}, precision {m.get('script_precision')}, "
        f"optimizer {opt}{' in backward' if m.get('script_optimizer_in_backward') else ''}, "
        f"checkpointing {'seen' if m.get('script_checkpointing') else 'not seen'}, "
        f"parameters {m.get('params_trainable', 0):,} trainable / {m.get('params_frozen', 0):,} frozen; ran "
        f"{_count(m.get('script_forwards', 0), 'forward')}, {_count(m.get('script_backwards', 0), 'backward')}, "
        f"{_count(steps, 'optimizer step')}", "  "))
    for note in m.get("notes") or []:
        lines.append(wrapped(f"note: {note}", "  "))
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


MEMPROF_OPTIONS = ("--budget", "--steps", "--out", "--backend", "--world-size", "--fit-batch-arg", "--batch-arg",
                   "--script", "-m")


def misplaced_option(exc) -> str | None:
    """Where the script refused one of memprof's own options (argparse: "unrecognized arguments: --budget ..."), the
    fix: memprof's options go before FILE; everything after FILE is the script's."""
    said = (exc.text or "") + str(getattr(exc, "stderr", "") or "")
    if "unrecognized arguments:" not in said:
        return None
    refused = said.rsplit("unrecognized arguments:", 1)[1].split("\n")[0].split()
    option = next((a.split("=")[0] for a in refused if a.split("=")[0] in MEMPROF_OPTIONS), None)
    if option is None:
        return None
    return f"{option} is memprof's option: put it before the script (memprof script [OPTIONS] FILE [ARGS])"


class FitFailed(Exception):
    """`fit --script` cannot answer: a probe raised the script's own error or trained no step. `text`: what to
    print first (the script's traceback, or nothing); `exit_code`: the command's."""

    def __init__(self, message: str, text: str = "", exit_code: int = 1):
        super().__init__(message)
        self.text, self.exit_code = text, exit_code


def fit_script(path: str, args: list[str], batch_arg: str, budget: str = "titan-x", steps: int | None = 2,
               max_batch: int = 1 << 16, on_probe=None, world_size: int | None = None, option: str = "--batch-arg"):
    """The largest value of the script's own batch flag whose prediction fits the card: doubling from 1 until a
    probe does not fit, then bisection. Returns (largest fitting Result or None, smallest failing batch or None,
    probes [(batch, Result)]). Every probe is a full run of the script on the simulated card (predicted). `option`
    is the command-line option that gave `batch_arg` (named in the errors). A flag the script refuses, or one that
    changes neither the batch the model sees nor the peak, is a UsageError; a probe that fails (the script's own
    error) or trains no step raises FitFailed."""
    check_batch_arg(batch_arg, option)
    probes: dict[int, object] = {}
    fix = f"does it take {batch_arg} N? give its own batch flag with {option}=FLAG"

    def probe(batch: int):
        if batch not in probes:
            said = io.StringIO()
            probe_args = with_batch(list(args), batch_arg, batch)
            try:
                # the script's own output, once per probe, is dropped (its last error line is kept for the message)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
                    probes[batch] = run_script(path, probe_args, budget=budget, steps=steps, world_size=world_size)
            except ScriptError as exc:
                last = next((line.strip() for line in reversed(said.getvalue().splitlines()) if line.strip()), "")
                if exc.error is None and exc.exit_code == 2:  # argparse's refusal
                    exc.stderr = said.getvalue()
                    raise UsageError(f"{path} exited when run with {batch_arg} {batch}" + (f" ({last})" if last else "")
                                     + f": {misplaced_option(exc) or fix}") from None
                raise FitFailed(f"{path} failed when run with {batch_arg} {batch} ({exc.result.record['error']}): "
                                f"no batch is judged", exc.text, exc.exit_code or 1) from None
            m = probes[batch].record["metrics"]
            if probes[batch].status == "incomplete":
                raise FitFailed(f"{path} with {batch_arg} {batch}: {m['incomplete_reason']}: nothing to fit "
                                f"(run it with memprof script to see what it does)")
            if on_probe is not None:
                on_probe(batch, probes[batch])
        return probes[batch]

    def same(a, b) -> bool:  # the flag changed nothing the model sees
        ma, mb = probes[a].record["metrics"], probes[b].record["metrics"]
        return ma.get("script_batch_size") == mb.get("script_batch_size") \
            and ma["peak_allocated_bytes"] == mb["peak_allocated_bytes"]

    low, high = 0, None  # largest fitting, smallest failing
    batch = 1
    while batch <= max_batch:
        if fits(probe(batch)):
            low, batch = batch, batch * 2
            if low == 2 and same(1, 2):
                raise UsageError(f"{batch_arg} changes nothing the script runs: with {batch_arg} 1 and 2 the model "
                                 f"sees batch {probes[1].record['metrics'].get('script_batch_size') or '?'} and the "
                                 f"peak is the same: {fix}")
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
