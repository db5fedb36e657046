"""Command line: `memprof run | suite | accuracy | table | report | fidelity | baseline save | compare | list`.

A thin user of memprof.plan (validation, run specs, execution), memprof.results (the one reader and
writer of records) and the renderers. Bad input ends in one line naming the fix and exit code 2, never a
traceback. Exit status: 0 when every configuration gave a result (ok, oom, skipped), 1 when any errored
or crashed (after writing everything) or the run failed (a full disk), 2 for bad input, 130 when interrupted
(143 on SIGTERM, which is handled as Ctrl-C is).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time

from memprof.errors import Terminated, UsageError, UserCodeError, WriteFailed
from memprof.reports.terminal import terminal_width
from memprof.options import ACCURACY, ADVISE, FIT, OPTIONS, RUN, add_options

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class _Formatter(argparse.HelpFormatter):
    def _get_help_string(self, action):
        """Help texts are plain text: a literal % is escaped, so argparse's %-formatting cannot fail on it
        (only %(default)s-style references are kept)."""
        return re.sub(r"%(?!\()", "%%", action.help or "")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        m = re.match(r"argument ([-\w/]+): expected one argument", message)
        if m:
            opt = m.group(1).split("/")[-1]
            message = (f"{opt} needs a value (a value that starts with '-' must be attached with '=', "
                       f"e.g. {opt}=-1)")
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _execute(plan) -> list:
    """A plan's announcement and notes, then its configurations (in the caller's RunDirectory)."""
    from memprof.plan import execute

    for line in [plan.announce, *plan.notes]:
        _note(line)
    return execute(plan, lock=False)


def _wrote(*paths: str) -> None:
    """`memprof: wrote` and the files, by their folder, wrapped to the terminal (a path never splits)."""
    import textwrap

    folders: dict[str, list[str]] = {}
    for path in paths:
        folders.setdefault(os.path.dirname(path) or ".", []).append(os.path.basename(path))
    text = "memprof: wrote " + "; ".join(f"in {d}: {', '.join(names)}" if len(names) > 1 else os.path.join(d, names[0])
                                         for d, names in folders.items())
    _note(textwrap.fill(text, terminal_width(), subsequent_indent="  ", break_long_words=False,
                        break_on_hyphens=False))


def _on_sigterm(signum, frame):
    raise Terminated()


def _kept(path: str) -> int:
    """How many finished records a results file holds (its complete, readable lines)."""
    import json

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().split("\n")
    except OSError:
        return 0
    kept = 0
    for line in lines[:-1]:
        try:
            kept += isinstance(json.loads(line), dict)
        except ValueError:
            pass
    return kept


def _interrupted(out_dir: str, exc: BaseException | None = None, file: str = "results.jsonl",
                 resume: str | None = "continue with --resume") -> int:
    """The line an interrupted (Ctrl-C) or terminated (SIGTERM) command ends with: where its finished
    configurations are, how many were kept, and how to go on (`resume`: None for a command without --resume)."""
    path = os.path.join(out_dir, file)
    how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    n = _kept(path)
    then = resume or "a new run starts over: give it a new --out"
    _note(f"memprof: {how}; finished configurations are in {path} ({n} kept; {then})")
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def _finish(records: list[dict], out_dir: str) -> int:
    """The run's last line (status counts) and its exit status."""
    from memprof.results import summary_line
    from memprof.vocabulary import FAILED

    failed = sum(1 for r in records if r["status"] in FAILED)
    _note(f"memprof: {summary_line(records)}" + (
        f"; see {out_dir}/results.jsonl for the errors (--resume --retry-failed reruns them)" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def _run_options(args, command: str = RUN, **extra) -> dict:
    """The run options the command line gave (the table's, memprof.options), over `command`'s defaults where they
    differ from a run's, `extra` overriding them."""
    from memprof.options import RUN_OPTIONS, defaults_of, given_options
    from memprof.plan import run_options

    given = {k: v for k, v in given_options(args).items() if k in RUN_OPTIONS}  # (a command's own: it reads them)
    own = {k: v for k, v in defaults_of(command).items() if k in given} if command != RUN else {}
    return run_options(getattr(args, "preset", None), **{**own, **{k: v for k, v in given.items() if v is not None},
                                                         **extra})


def report(records: list[dict], out_dir: str, metric: str | None) -> None:
    """Table 4 from `records`: the terminal view printed, every format written beside the results."""
    from memprof.results import load_verdicts
    from memprof.reports.table4 import default_metric, render_terminal, write_reports

    verdicts = load_verdicts(out_dir)
    metric = metric or default_metric(records)
    paths = write_reports(records, out_dir, metric, verdicts)
    print(render_terminal(records, metric, verdicts, terminal_width()))
    _wrote(os.path.join(out_dir, "results.jsonl"), *sorted(paths.values()))


BASELINE_FILE = "baseline.json"  # `baseline save` without -o: beside the results, never a committed baseline
RUN_TIMELINES = 12  # timeline figures in the report a run writes (the paper grid's all); `memprof report` draws all


def html_report(out_dir: str) -> None:
    """The self-contained HTML report beside table4.md (memprof.reports.html), with the first RUN_TIMELINES
    timelines drawn."""
    from memprof.reports.html import write_html_report

    try:
        _wrote(write_html_report(out_dir, max_timelines=RUN_TIMELINES))
    except UsageError:
        raise
    except Exception as exc:  # the results and Table 4 are written; a failing picture does not undo them
        _note(f"memprof: the HTML report failed ({type(exc).__name__}: {exc}); retry with `memprof report {out_dir}`")


def cmd_report(args) -> int:
    from memprof.reports.html import write_html_report
    from memprof.plan import writable_dir
    from memprof.results import RESULTS_FILE

    for name, path in (("RUN_DIR", args.run_dir), ("--pair", args.pair)):
        if path is not None and not os.path.isfile(os.path.join(path, RESULTS_FILE)):
            raise UsageError(f"{name} {path} holds no {RESULTS_FILE}: give a run directory (memprof run --out DIR)")
    if args.output is not None:
        if os.path.isdir(args.output):
            raise UsageError(f"-o {args.output} is a directory: give a file path, e.g. {args.output}/report.html")
        writable_dir(os.path.dirname(os.path.abspath(args.output)), "output", shown="-o")
    else:
        writable_dir(args.run_dir, "output", shown="RUN_DIR", fix="give -o FILE in a directory you can write")
    print(write_html_report(args.run_dir, args.output, args.pair))
    return EXIT_OK


ACCURACY_FLAGS = tuple(o.name for o in OPTIONS if o.commands == {ACCURACY})  # accuracy mode's own (run --accuracy)


def cmd_run(args) -> int:
    from memprof.plan import flag, plan_run
    from memprof.results import RunDirectory

    given = [flag(n) for n in ACCURACY_FLAGS if getattr(args, n) is not None]
    if given and not args.accuracy:
        raise UsageError(f"{given[0]} applies to accuracy mode: add --accuracy (train each configuration for real), "
                         f"or drop {given[0]}")
    plan = plan_run(_run_options(args))
    accuracy = _plan_accuracy(args, plan.options) if args.accuracy else None
    try:
        with RunDirectory(plan.out_dir):
            records = _execute(plan)
            if accuracy:
                _execute_accuracy(accuracy, plan.out_dir)
    except KeyboardInterrupt as exc:
        return _interrupted(plan.out_dir, exc)
    report(records, plan.out_dir, args.metric or ("nvml-process" if args.preset == "paper-2022" else None))
    html_report(plan.out_dir)
    return _finish(records, plan.out_dir)


def cmd_fit(args) -> int:
    if args.script is not None:
        from memprof.script.cli import cmd_fit_script

        return cmd_fit_script(args, args.argv)
    from memprof.plan import plan_fit
    from memprof.reports.planner import render_fit, write_fit_reports
    from memprof.results import RunDirectory

    plan = plan_fit(_run_options(args, batch_size=None), args.batch_size)
    try:
        with RunDirectory(plan.out_dir):
            records = _execute(plan)
    except KeyboardInterrupt as exc:
        return _interrupted(plan.out_dir, exc)
    tried = [r for r in records if r["status"] != "skipped"]
    if tried and all(r["status"] == "oom" for r in tried) and tried[0]["source"] == "predicted":
        from memprof.planning.fit import largest_that_fits

        best = largest_that_fits(tried[0]["spec"]["budget"], sorted({r["spec"]["optim"] for r in tried}))
        raise UsageError(f"--budget {tried[0]['spec']['budget']} is too small for batch 1 of every configuration "
                         f"asked for; the largest that fits: {best or 'none of the registered models'}")
    paths = write_fit_reports(records, plan.out_dir)
    print(render_fit(records, terminal_width()))
    _wrote(os.path.join(plan.out_dir, "results.jsonl"), *sorted(paths.values()))
    return _finish(records, plan.out_dir)


def cmd_advise(args) -> int:
    from memprof.planning.advise import advice, render_advice, render_advice_terminal
    from memprof.plan import plan_advise
    from memprof.results import RESULTS_FILE, RunDirectory, load_verdicts, write_text

    verdicts = load_verdicts(args.accuracy_from) if args.accuracy_from else {}
    if args.accuracy_from and not verdicts:
        raise UsageError(f"--accuracy-from {args.accuracy_from}: no accuracy.jsonl there; run `memprof accuracy "
                         f"--out DIR` first")
    earlier = os.path.join(args.out, RESULTS_FILE) if args.out else ""
    if earlier and os.path.isfile(earlier) and os.path.getsize(earlier):
        raise UsageError(f"--out {args.out} already holds results: advise starts afresh (it has no --resume); "
                         f"choose a new --out")
    ap = plan_advise(_run_options(args, ADVISE, resume=False, retry_failed=False, snapshot=None, nvml_period_ms=None))
    try:
        with RunDirectory(ap.run.out_dir):
            records = {r.spec.key: r for r in _execute(ap.run)}
    except KeyboardInterrupt as exc:
        return _interrupted(ap.run.out_dir, exc, resume=None)
    result = advice(ap.candidates, records, ap.not_modelled, ap.not_applicable, verdicts)
    write_text(os.path.join(ap.run.out_dir, "advise.md"), render_advice(result))
    print(render_advice_terminal(result, terminal_width(), os.path.join(ap.run.out_dir, "advise.md")))
    _wrote(os.path.join(ap.run.out_dir, "results.jsonl"), os.path.join(ap.run.out_dir, "advise.md"))
    return _finish(list(records.values()), ap.run.out_dir)


def _plan_accuracy(args, run_options: dict | None = None):
    """Accuracy mode's plan; after a run (`run --accuracy`), for the run's models and optimizers."""
    from memprof.options import given_options, options_of
    from memprof.plan import accuracy_options, plan_accuracy

    names = [o.name for o in options_of(ACCURACY)] + ["num_classes"]
    given = {k: v for k, v in given_options(args).items() if k in names}
    if run_options:  # after a run: its setting
        given.update({k: run_options[k] for k in names if k in run_options and k not in ("out", "progress")})
    return plan_accuracy(accuracy_options(**given))


def _execute_accuracy(accuracy, out_dir: str) -> None:
    from memprof.plan import execute_accuracy

    _note(f"memprof: accuracy mode on {accuracy.device}: {len(accuracy.entries)} configurations, "
          f"{accuracy.options['train_steps']} steps each")
    execute_accuracy(accuracy, out_dir)


def cmd_accuracy(args) -> int:
    from memprof.plan import default_out, writable_dir
    from memprof.reports.table4 import render_verdicts
    from memprof.results import ACCURACY_FILE, load_verdicts, write_text

    accuracy = _plan_accuracy(args)
    out_dir = writable_dir(args.out if args.out is not None else default_out())
    try:
        _execute_accuracy(accuracy, out_dir)
    except KeyboardInterrupt as exc:
        return _interrupted(out_dir, exc, file=ACCURACY_FILE, resume=None)
    verdicts = list(load_verdicts(out_dir).values())
    write_text(os.path.join(out_dir, "accuracy.md"), render_verdicts(verdicts))
    print(render_verdicts(verdicts, terminal_width()))
    _wrote(os.path.join(out_dir, ACCURACY_FILE), os.path.join(out_dir, "accuracy.md"))
    failed = sum(1 for v in verdicts if v["verdict"] in ("error", "fail"))
    _note(f"memprof: {len(verdicts)} configurations: " + ", ".join(
        f"{sum(1 for v in verdicts if v['verdict'] == k)} {k}" for k in ("pass", "fail", "skipped", "error")))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_suite(args) -> int:
    """Every [[run]] of a suite file into one results.jsonl; all runs are validated before the first starts,
    and an error names the line of the key it concerns."""
    from memprof.plan import plan_suite, writable_dir
    from memprof.results import RunDirectory

    name = os.path.splitext(os.path.basename(args.file))[0]
    out_dir = writable_dir(args.out if args.out is not None else
                           os.path.join("reports", "runs", f"suite-{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    plans = plan_suite(args.file, out=out_dir, resume=args.resume, retry_failed=args.retry_failed,
                       progress=not args.no_progress, executor=args.executor, ray_address=args.ray_address)
    try:
        with RunDirectory(out_dir):
            for plan in plans:
                records = _execute(plan)
    except KeyboardInterrupt as exc:
        return _interrupted(out_dir, exc, resume=f"continue with `memprof suite {args.file} --out {out_dir} --resume`")
    report(records, out_dir, None)
    html_report(out_dir)
    return _finish(records, out_dir)


def cmd_table(args) -> int:
    from memprof.plan import writable_dir
    from memprof.reports.table4 import default_metric, render_terminal, write_reports
    from memprof.results import read_records

    records = read_records(args.results)
    out_dir = writable_dir(args.out if args.out is not None else (
        args.results if os.path.isdir(args.results) else os.path.dirname(args.results) or "."))
    metric = args.metric or default_metric(records)
    paths = write_reports(records, out_dir, metric)
    print(render_terminal(records, metric, None, terminal_width()))
    _wrote(*sorted(paths.values()))
    return EXIT_OK


def cmd_fidelity(args) -> int:
    import json

    from memprof.plan import writable_dir
    from memprof.reports.fidelity import fidelity_rows, render_fidelity
    from memprof.results import read_records, write_text

    measured, predicted = read_records(args.measured), read_records(args.predicted)
    text = render_fidelity(measured, predicted)
    print(text)
    if args.out is not None:
        writable_dir(args.out)
        write_text(os.path.join(args.out, "fidelity.md"), text)
        write_text(os.path.join(args.out, "fidelity.json"),
                   json.dumps(fidelity_rows(measured, predicted), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_baseline_save(args) -> int:
    import json

    from memprof.baseline import diff_text, load_any, make_baseline, not_a_baseline
    from memprof.plan import writable_dir
    from memprof.results import read_records, results_path, write_text

    new = make_baseline(read_records(args.results))
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(results_path(args.results))), BASELINE_FILE)
    if os.path.isdir(output):
        raise UsageError(f"-o {output} is a directory: give a file path, e.g. {output}/ci.json")
    if os.path.exists(output):
        why = not_a_baseline(output)
        if why:
            raise UsageError(f"-o {output} exists and is not a memprof baseline ({why}): saving would overwrite it; "
                             f"choose another -o, or delete that file first")
        try:
            print(f"changes against {output}:\n{diff_text(load_any(output), new)}")
        except UsageError as exc:  # a damaged baseline is replaced; what it held cannot be diffed
            _note(f"memprof: note: no diff against the damaged baseline it replaces ({exc})")
    writable_dir(os.path.dirname(os.path.abspath(output)), "output", shown="-o")
    write_text(output, json.dumps(new, indent=1, sort_keys=True) + "\n", flag="-o")
    _note(f"memprof: wrote baseline {output} ({len(new['benchmarks'])} configurations)")
    return EXIT_OK


def cmd_compare(args) -> int:
    from memprof.baseline import DEFAULT_FAIL, compare, load_any, parse_threshold
    from memprof.reports.terminal import fit_table, wrapped

    thresholds = [parse_threshold(t) for t in (args.fail or DEFAULT_FAIL)]
    base, current = load_any(args.baseline), load_any(args.current)
    result = compare(base, current, thresholds, allow_missing=args.allow_missing)
    if result.rows:
        headers = ["config", "field", "baseline", "current", "delta", "verdict"]
        table = fit_table(result.rows, headers, terminal_width())
        if max(len(line) for line in table.splitlines()) > terminal_width():  # each configuration's rows under it
            from tabulate import tabulate

            groups: dict = {}
            for row in result.rows:
                groups.setdefault(row[0], []).append(row[1:])
            table = "\n\n".join(f"{config}\n" + "\n".join("  " + line for line in tabulate(
                rows, headers=headers[1:], disable_numparse=True).splitlines()) for config, rows in groups.items())
        print(table)
    for note in result.notes:
        print(wrapped(note))
    if result.regressions:
        print(f"\n{len(result.regressions)} regression(s):")
        for r in result.regressions:
            print(wrapped(str(r), "  "))
        return EXIT_FAILED
    print(f"\nno regression ({len(result.rows)} comparisons of {result.configs} configurations)")
    return EXIT_OK


def cmd_list(args) -> int:
    import textwrap

    from memprof.reports.terminal import fit_table

    width = terminal_width()
    if args.what != "models" and (args.source or args.filter):
        raise UsageError(f"--source and --filter apply to `memprof list models`, not {args.what}")
    if args.what == "models" and args.source:
        from memprof.models import source_names, source_prefix

        names = source_names(args.source, args.filter)
        prefix = source_prefix(args.source)
        print(f"{len(names)} {args.source} models" + (f" matching '{args.filter}'" if args.filter else "")
              + (f" (give them as {prefix}NAME)" if prefix else "") + ":")
        print(textwrap.fill("  ".join(names), width=width, break_on_hyphens=False, break_long_words=False))
        return 0
    if args.what == "models" and args.filter:
        raise UsageError("--filter needs --source: e.g. memprof list models --source timm --filter 'vit_*'")
    if args.what == "models":
        from memprof.model_sources.open_clip import REGISTRY, listed_models

        rows = [[m.name, m.open_clip_config or "-", "+".join(m.embedding_modules), m.description]
                for m in REGISTRY.values()]
        print(fit_table(rows, ["name", "open_clip config", "embedding layer", "description"], width))
        runnable, unsupported = listed_models()
        print(f"\nAlso accepted: any of these {len(runnable)} open_clip architecture names:")
        print(textwrap.fill("  ".join(runnable), width=width, break_on_hyphens=False, break_long_words=False))
        if unsupported:
            print(f"\nNot supported ({len(unsupported)}), with the reason:")
            print(fit_table([[n, why] for n, why in unsupported.items()], ["name", "reason"], width))
    elif args.what == "optims":
        from memprof.optims import REGISTRY

        rows = [[o.name, o.label, o.factory, "yes" if o.freeze_embed else "", o.state_tensors_per_param,
                 o.description] for o in REGISTRY.values()]
        print(fit_table(rows, ["name", "paper name", "class", "frozen", "states", "description"], width))
        eight = ", ".join(f"{o.name} {o.bnb_8bit}" for o in REGISTRY.values() if o.bnb_8bit)
        for text in ("frozen: the embedding layer is frozen (freeze-embed); states: optimizer state tensors per "
                     "parameter.", f"With --state-bits 8: {eight}.",
                     "`--optims all` runs all of them; `--optims paper` runs Table 4's four."):
            print("\n" + textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False))
    elif args.what == "backends":
        from memprof.backends.registry import get, names, targets

        rows = []
        for name in names():
            backend = get(name)
            rows.append([name, backend.source, backend.isolation, backend.default_budget,
                         "yes" if backend.unavailable() is None else "no", str(targets()[name])])
        print(fit_table(rows, ["name", "figures", "runs", "default budget", "usable here", "from"], width))
        print("\n" + textwrap.fill("`--backend auto` is cuda where a GPU is present, else simulate; another package "
                                  "adds one through the entry-point group memprof.backends.", width=width))
    else:
        from memprof.budget import PROFILES

        rows = [[p.name, p.label, f"{p.total_bytes / (1 << 30):.0f} GiB",
                 ".".join(map(str, p.compute_capability)) if p.compute_capability else "unknown",
                 f"{p.l2_cache_bytes / (1 << 20):g} MiB" if p.l2_cache_bytes else "unknown"] for p in PROFILES.values()]
        print(fit_table(rows, ["name", "card", "memory", "compute capability", "L2 cache"], width))
        print("\nOr a size: --budget 11GiB (optionally with a compute capability: 80GiB@9.0)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memprof", description="Peak GPU memory of fine-tuning vision transformers: "
                     "measured on a GPU, predicted by a CUDA-faithful simulation on a CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="profile (or predict) a grid of model x optimizer x settings",
                         description="Runs micro-batch training steps for every configuration and records "
                                     "peak memory. Without a GPU the figures are predicted by the simulation. "
                                     "Exit status: 0 when every configuration gave a result (ok, oom, skipped), "
                                     "1 when any errored or crashed, 2 for bad input.")
    add_options(run, RUN)  # every run option, from the one table (memprof.options)
    from memprof.plan import PRESETS

    run.add_argument("--preset", choices=list(PRESETS), default=None,
                     help="paper-2022: the paper grid as its 2022 setup ran it (for-loop optimizers, as PyTorch "
                          "before 2.0 ran on CUDA; the image tower alone and the whole CLIP model resident), shown "
                          "as NVML process memory; options given explicitly win")
    from memprof.reports.table4 import METRICS

    run.add_argument("--metric", choices=list(METRICS), default=None,
                     help="figure shown in the table (default: reserved; live for the cpu backend)")
    run.add_argument("--accuracy", action="store_true",
                     help="then train each configuration for real and add its verdict to the table (see `accuracy`)")
    add_options(run, None, ACCURACY_FLAGS)  # accuracy mode's own, for --accuracy
    run.set_defaults(func=cmd_run)

    adv = sub.add_parser("advise", help="from one configuration: which changes make it fit a budget, and at what cost",
                         description="Predicts every single change memprof can model (freeze-embed, SGD "
                                     "(freeze-embed), no momentum, 8-bit states, gradient checkpointing, a smaller "
                                     "micro-batch with accumulation, ...) and the pairs of them, ranks them by peak, "
                                     "and says the cheapest that fits first.")
    add_options(adv, ADVISE)  # its options, from the one table (memprof.options)
    adv.set_defaults(func=cmd_advise, paged=False, steps=2, num_classes=10, pretrained=None, timeout_s=None,
                     executor="local", ray_address=None)

    fit = sub.add_parser("fit", help="the largest micro-batch that fits a budget, per configuration",
                         description="For every configuration (the grid of `run` without batch sizes), searches "
                                     "the largest micro-batch whose peak fits the budget: each probe a full "
                                     "prediction (simulate) or a measurement in a fresh process (cuda). Writes "
                                     "results.jsonl (one search per configuration, with its probes), fit.md/.csv and "
                                     "fit.png (peak against batch size).")
    add_options(fit, FIT)
    fit.add_argument("--batch-size", default=None, help=argparse.SUPPRESS)  # rejected: fit searches it
    from memprof.script.cli import add_fit_script_options

    add_fit_script_options(fit)  # `memprof fit --script FILE --batch-arg=FLAG [ARGS...]` (memprof.script.cli)
    fit.set_defaults(func=cmd_fit, snapshot=None, nvml_period_ms=None, script_args=None, argv=())

    acc = sub.add_parser("accuracy", help="train each configuration for real: does the memory setting still train?",
                         description="Trains each configuration at its micro-batch size (cosine schedule to 0) and "
                                     "checks: it learns, frozen means frozen, checkpointing is exact, 8-bit tracks "
                                     "32-bit. One verdict per configuration; exit 1 when any fails or errors.")
    add_options(acc, ACCURACY)  # its options, from the one table (memprof.options)
    acc.add_argument("--num-classes", type=int, default=None, help=argparse.SUPPRESS)
    acc.set_defaults(func=cmd_accuracy)

    suite = sub.add_parser("suite", help="run a suite file (suites/*.toml): several grids into one results.jsonl")
    suite.add_argument("file", help="suite file, e.g. suites/ci.toml")
    suite.add_argument("--out", help="output directory (default: reports/runs/suite-<name>-<timestamp>)")
    suite.add_argument("--resume", action="store_true", help="skip configurations already in --out")
    suite.add_argument("--retry-failed", action="store_true", help="with --resume: rerun errored or crashed ones")
    suite.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_options(suite, None, ("executor", "ray_address"))
    suite.set_defaults(func=cmd_suite)

    table = sub.add_parser("table", help="render Table 4 from a results.jsonl (markdown, CSV, JSON, PNG)")
    table.add_argument("results", help="results.jsonl or a run directory")
    table.add_argument("--metric", choices=list(METRICS), default=None)
    table.add_argument("--out", help="directory for table4.* (default: beside the results)")
    table.set_defaults(func=cmd_table)

    rep = sub.add_parser("report", help="one self-contained HTML report of a run (works offline)",
                         description="Table 4, the paper beside ours, the one-view table, the largest holders at "
                                     "the peak, fidelity (when measured and predicted records meet), fit.md and "
                                     "advise.md when present, each configuration's memory timeline and links to its "
                                     "snapshots, in one HTML file with its images embedded.")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds results.jsonl)")
    rep.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html)")
    rep.add_argument("--pair", metavar="DIR", help="another run directory whose records go beside these (e.g. the "
                                                   "measured run of the same configurations)")
    rep.set_defaults(func=cmd_report)

    fid = sub.add_parser("fidelity", help="predicted vs measured peaks, % error per configuration")
    fid.add_argument("measured", help="results of a measuring backend (results.jsonl or run directory)")
    fid.add_argument("predicted", help="results of the simulation for the same configurations")
    fid.add_argument("--out", help="directory for fidelity.md and fidelity.json")
    fid.set_defaults(func=cmd_fidelity)

    base = sub.add_parser("baseline", help="save results as a regression baseline")
    base_sub = base.add_subparsers(dest="action", required=True, parser_class=_Parser)
    save = base_sub.add_parser("save", help="write a baseline JSON from results; prints what changed")
    save.add_argument("results", help="results.jsonl or a run directory")
    save.add_argument("-o", "--output", default=None,
                      help=f"baseline file (default: {BASELINE_FILE} beside the results; the CI gate's committed "
                           f"one, reports/baselines/ci.json, is rewritten only when given as -o)")
    save.set_defaults(func=cmd_baseline_save)

    from memprof.baseline import DEFAULT_FAIL, FIELDS

    cmp_ = sub.add_parser("compare", help="fail (exit 1) when CURRENT regresses against BASELINE",
                          description="Compares each configuration in both files, field by field. A measured "
                                      "figure regresses when it grows past the threshold; a predicted one (the "
                                      "simulation is deterministic) when it moves past it in either direction. "
                                      "A configuration missing from CURRENT fails unless --allow-missing.")
    cmp_.add_argument("baseline", help="baseline JSON (or results, or pytest-benchmark JSON)")
    cmp_.add_argument("current", help="results.jsonl, run directory, baseline or pytest-benchmark JSON")
    cmp_.add_argument("--fail", action="append", metavar="FIELD:N[%]",
                      help="regression threshold, repeatable: " + ", ".join(FIELDS) + " or any stats field "
                      "(default: " + ", ".join(DEFAULT_FAIL) + "; timing is not gated by default: CPU step "
                      "time varies 2x between runs)")
    cmp_.add_argument("--allow-missing", action="store_true",
                      help="baseline configurations absent from CURRENT are reported, not failed")
    cmp_.set_defaults(func=cmd_compare)

    from memprof.script.cli import add_script_parser  # `memprof script FILE [ARGS...]` (memprof.script)

    add_script_parser(sub)

    lst = sub.add_parser("list", help="list registered models, optimizers, budget cards or backends")
    lst.add_argument("what", choices=["models", "optims", "budgets", "backends"])
    lst.add_argument("--source", default=None,
                     help="models: the names one source accepts: open_clip, timm, torchvision or a source a package "
                          "adds (prefix them: timm:NAME, torchvision:NAME)")
    lst.add_argument("--filter", default=None, help="models with --source: names matching this glob, e.g. 'vit_*'")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv=None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous = None
    try:
        from memprof.script.cli import split_fit_script, split_script_module

        argv = list(sys.argv[1:] if argv is None else argv)
        argv, script_args = split_fit_script(argv)  # `fit --script FILE ... ARGS`: the script's ARGS kept apart
        argv, module_args = split_script_module(argv)  # `script -m MODULE ARGS`: the module's ARGS kept apart
        args = build_parser().parse_args(argv)
        if script_args is not None:
            args.script_args, args.argv = script_args, argv
        if module_args is not None:
            args.module_args = module_args
        return args.func(args)
    except UsageError as exc:
        print(f"memprof: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, WriteFailed) else EXIT_USAGE
    except UserCodeError as exc:  # a factory failing while the run is planned (e.g. building it to check weights)
        print(f"memprof: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # outside a command's run (planning, reports): no configuration ran then
        _note(f"memprof: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}")
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`memprof list models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script (and `python -m memprof`): main(), then, with torch loaded, an immediate exit once
    the output is flushed: the interpreter's teardown of torch takes about 2 s on 2 cores and does nothing
    memprof needs (records are fsynced as they are appended, worker processes are already gone). With Ray
    loaded its own exit handlers run, as they must."""
    code = main()
    if "torch" in sys.modules and "ray" not in sys.modules:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
