"""`memprof script [--budget CARD] [--steps N] [--out DIR] FILE [ARGS...]`: a training script, unchanged, on a
simulated CUDA device that is the budget's card (memprof.script.runner). Options go before FILE; everything
after it is the script's own arguments."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def add_script_parser(sub) -> None:
    from memprof.options import SCRIPT, add_options

    p = sub.add_parser("script", help="run your own CUDA training script, unchanged, on a simulated card (predicted)",
                       description="Runs FILE as __main__ (with ARGS as its sys.argv; or -m MODULE as `python -m` "
                                   "does) on a simulated CUDA device that is the --budget card: no GPU is used, and "
                                   "every figure is predicted by the same simulation as `memprof run`. Prints the "
                                   "predicted peaks and what was detected (batch size, precision, optimizer, "
                                   "checkpointing, how many steps ran). Exit status: 0 when the script ran (fits or "
                                   "not, or trained no step: incomplete), the script's own when it failed (its "
                                   "traceback printed as Python prints it: 1, or what it passed to sys.exit), 2 for "
                                   "bad input or a call that cannot be simulated (named with its file:line).")
    add_options(p, SCRIPT)  # its options, from the one table (memprof.options)
    p.add_argument("-m", dest="module", default=None, metavar="MODULE", help="run an installed module as "
                   "`python -m MODULE ARGS` would (e.g. -m open_clip_train.main), instead of FILE")
    p.add_argument("file", metavar="FILE", nargs="?", help="the training script")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")
    p.set_defaults(func=cmd_script)


def cmd_script(args) -> int:
    from memprof.options import SCRIPT, defaults_of

    for name, default in defaults_of(SCRIPT).items():  # the table's defaults for a script, where none was given
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    args.steps = args.script_steps
    return _checked(args, fit=args.fit_batch_arg is not None)


def _checked(args, fit: bool) -> int:
    from memprof.backends.registry import AUTO, get, resolve
    from memprof.errors import UsageError
    from memprof.vocabulary import Source

    if getattr(args, "module", None) is not None:  # `-m MODULE ARGS...` (split off by split_script_module)
        args.args = ([args.file] if args.file is not None else []) + list(args.args) + \
            list(getattr(args, "module_args", None) or [])
        args.file = args.module
    if args.file is None:
        raise UsageError("give the training script: memprof script [--budget CARD] [--steps N] [--out DIR] FILE [ARGS...]"
                         " (or -m MODULE [ARGS...])")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: give at least 1 (or leave it out to let the script end)")
    from memprof.options import parse

    parse("world_size", args.world_size)  # (the check `memprof run` makes)
    from memprof.budget import parse_budget

    # an unknown backend: close matches, before the script runs (auto: a GPU where one is present)
    chosen = resolve(args.backend)[0] if args.backend == AUTO else get(args.backend)
    args.budget = args.budget or chosen.default_budget
    if args.budget != "device":
        parse_budget(args.budget)  # a bad card is refused before the script runs
    if args.out is not None:
        from memprof.plan import writable_dir

        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a file: give a directory")
        writable_dir(args.out)  # the check `memprof run` makes, with its message and exit status
    if fit:
        if chosen.source != Source.PREDICTED:
            raise UsageError("--fit-batch-arg searches on the simulated card: leave --backend out")
        return _fit(args)
    measured = chosen.source != Source.PREDICTED
    snapshots = os.path.join(args.out, "snapshots") if args.out is not None and not measured else None
    from memprof.results import RunDirectory

    with RunDirectory(args.out) if args.out is not None else contextlib.nullcontext():  # (a run's folder is locked)
        return _run_one(args, snapshots, measured)


def _run_one(args, snapshots: str | None, measured: bool) -> int:
    from memprof.script.failures import ScriptError
    from memprof.script.runner import misplaced_option, run_script, summary

    failed = None
    try:
        result = run_script(args.file, args.args, budget=args.budget, steps=args.steps, out_dir=args.out,
                            snapshot_dir=snapshots, backend=args.backend, world_size=args.world_size,
                            module=getattr(args, "module", None) is not None)
    except ScriptError as exc:  # the script's own error: as Python prints it, then what ran before it
        failed = exc
        if exc.text:
            print(exc.text, end="", file=sys.stderr, flush=True)
        hint = misplaced_option(exc)
        if hint:
            print(f"memprof: note: {hint}", file=sys.stderr, flush=True)
        result = exc.result
    print(summary(result), flush=True)
    if args.out is not None:
        from memprof.reports.html import write_html_report
        from memprof.results import RESULTS_FILE, append

        path = os.path.join(args.out, RESULTS_FILE)
        append(path, result.record)
        print(f"record: {path} ({result.record['key']})", flush=True)
        if not measured:
            print(f"report: {write_html_report(args.out, None, None)}", flush=True)
    return failed.exit_code if failed is not None else 0




def _fit(args) -> int:
    from memprof.budget import format_size as _gib
    from memprof.script.runner import check_batch_arg, fit_script, summary

    option = getattr(args, "batch_option", "--fit-batch-arg")
    check_batch_arg(args.fit_batch_arg, option)

    def on_probe(batch, result):
        m = result.record["metrics"]
        print(f"  {args.fit_batch_arg} {batch}: peak allocated {_gib(m['peak_allocated_bytes'])}, reserved "
              f"{_gib(m['peak_reserved_bytes'])} (predicted), fits: {m.get('fits')}", flush=True)

    from memprof.script.runner import FitFailed

    print(f"searching {args.fit_batch_arg} of {args.file} on a simulated {args.budget} (every probe predicted):")
    try:
        best, failing, probes = fit_script(args.file, args.args, args.fit_batch_arg, budget=args.budget,
                                           steps=args.steps or 2, on_probe=on_probe, world_size=args.world_size,
                                           option=option)
    except FitFailed as exc:
        if exc.text:
            print(exc.text, end="", file=sys.stderr)
        print(f"memprof: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if best is None:
        print(f"no batch fits: {args.fit_batch_arg} 1 does not fit {args.budget} (predicted)")
    else:
        print(f"largest fitting: {args.fit_batch_arg} {best.record['metrics']['script_batch_size'] or '?'} "
              f"(probe value {max(b for b, r in probes if r is best)})"
              + (f"; {failing} does not fit" if failing else "") + " (predicted)")
        print(summary(best))
    if args.out is not None:
        from memprof.results import RESULTS_FILE, append

        os.makedirs(args.out, exist_ok=True)
        for _batch, result in probes:
            append(os.path.join(args.out, RESULTS_FILE), result.record)
    return 0


def split_script_module(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`memprof script [OPTIONS] -m MODULE [ARGS...]`: (memprof's arguments, the module's ARGS), as `python -m`
    splits them (everything after MODULE is the module's); (argv, None) without -m."""
    if not argv or argv[0] != "script":
        return argv, None
    for i, a in enumerate(argv[1:], 1):
        if a == "-m" and i + 1 < len(argv):
            return argv[:i + 2], argv[i + 2:]
        if not a.startswith("-") and argv[i - 1] not in _VALUED:
            return argv, None  # FILE came first: the rest is the script's
    return argv, None


_VALUED = {"--budget", "--steps", "--out", "--backend", "--world-size", "--fit-batch-arg"}


# --- `memprof fit --script FILE --batch-arg=FLAG [ARGS...]`: the same search, spelled as `fit` --------------------

def split_fit_script(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`memprof fit ... --script FILE [--batch-arg=FLAG] [ARGS...]`: (memprof's arguments, the script's ARGS), or
    (argv, None) without --script. memprof's other options go before --script; right after FILE only --batch-arg
    is memprof's, everything after it (or after FILE) is the script's own."""
    if not argv or argv[0] != "fit":
        return argv, None
    for i, a in enumerate(argv):
        if a == "--script":
            end = i + 2
        elif a.startswith("--script="):
            end = i + 1
        else:
            continue
        if end < len(argv) and argv[end].startswith("--batch-arg="):
            end += 1
        elif end + 1 < len(argv) and argv[end] == "--batch-arg":
            end += 2
        return argv[:end], argv[end:]
    return argv, None


def add_fit_script_options(fit) -> None:
    fit.add_argument("--script", default=None, metavar="FILE", help="fit your own training script instead of the "
                     "registry's models: `memprof fit [--budget CARD] [--world-size N] --script FILE --batch-arg=FLAG "
                     "[ARGS...]` searches the script's own batch flag FLAG for the largest batch whose prediction "
                     "fits the card (each probe a full run on the simulated card; ARGS are the script's)")
    fit.add_argument("--batch-arg", default=None, metavar="FLAG", help="with --script: the script's batch flag, "
                     "e.g. --batch-arg=--batch-size")


FIT_SCRIPT_OPTIONS = ("--script", "--batch-arg", "--budget", "--steps", "--out", "--world-size", "--no-progress")


def cmd_fit_script(args, argv: list[str]) -> int:
    """`memprof fit --script`: a thin front over `memprof script --fit-batch-arg` (memprof.script.runner.fit_script)."""
    from memprof.budget import DEFAULT_BUDGET
    from memprof.errors import UsageError

    if args.batch_arg is None:
        raise UsageError(f"--script {args.script}: give the script's batch flag right after it, e.g. "
                         f"memprof fit --script {args.script} --batch-arg=--batch-size")
    options = [a.split("=")[0] for i, a in enumerate(argv[1:], 1)
               if a.startswith("--") and not (argv[i - 1] == "--batch-arg")]
    other = next((a for a in options if a not in FIT_SCRIPT_OPTIONS), None)
    if other is not None:
        raise UsageError(f"{other} is an option of a registry fit: with --script the script's own code decides it "
                         f"(fit --script takes {', '.join(FIT_SCRIPT_OPTIONS[2:])} before --script; the script's own "
                         f"arguments go after FILE)")
    explicit_world = any(a == "--world-size" or a.startswith("--world-size=") for a in argv)
    script = argparse.Namespace(file=args.script, args=args.script_args, fit_batch_arg=args.batch_arg,
                                budget=args.budget or DEFAULT_BUDGET, steps=args.steps, out=args.out,
                                backend="simulate", world_size=args.world_size if explicit_world else None,
                                batch_option="--batch-arg")
    return _checked(script, fit=True)
