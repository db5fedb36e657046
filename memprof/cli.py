"""Command line: `memprof run | suite | accuracy | table | fidelity | baseline save | compare | list`.

Bad input ends in one line naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from memprof.errors import UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _writable_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".memprof-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out {path} is not writable ({exc.strerror}): choose a directory you can write") from None
    return path


def _default_out() -> str:
    return os.path.join("reports", "runs", time.strftime("%Y%m%d-%H%M%S"))


def _resolve_backend(requested: str) -> tuple[str, str]:
    """auto: cuda where a GPU is present, else simulate; returns it with the line that announces it."""
    import torch

    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise UsageError("--backend cuda needs a CUDA GPU and none is visible: use --backend simulate (predicts) "
                         "or --backend cpu (measures on the CPU)")
    backend = ("cuda" if has_gpu else "simulate") if requested == "auto" else requested
    what = {"cuda": f"measuring on {torch.cuda.get_device_name() if has_gpu else ''} with torch.cuda and NVML",
            "simulate": "every figure is predicted, not measured",
            "cpu": "measuring live tensor bytes on the CPU"}[backend]
    why = "" if requested != "auto" else (" (a CUDA GPU is present)" if has_gpu else " (no CUDA GPU here)")
    return backend, f"memprof: backend {backend}{why}: {what}"


def _resolve_budget(budget: str | None, backend: str) -> str:
    from memprof.budget import parse_budget

    if budget is None:
        return "titan-x" if backend == "simulate" else "device"
    if budget == "device":
        if backend == "simulate":
            raise UsageError("--budget device: the simulation predicts for a named card; give one, e.g. titan-x")
        return budget
    profile = parse_budget(budget)
    if backend == "cuda":
        import torch

        from memprof.budget import NOMINAL_TOLERANCE

        total = torch.cuda.get_device_properties(0).total_memory
        if profile.total_bytes > total * (1 + NOMINAL_TOLERANCE):
            raise UsageError(f"--budget {budget} ({profile.total_bytes / (1 << 30):.0f} GiB) is larger than this GPU "
                             f"({total / (1 << 30):.0f} GiB): pick a smaller budget, or `device`")
    return budget


@dataclass
class RunPlan:
    """A validated `memprof run`: what to run, where, how."""

    entries: list
    out_dir: str
    backend: str
    announce: str
    args: argparse.Namespace


def plan_run(args) -> RunPlan:
    """Validate every option of `memprof run` (UsageError on bad input) before anything runs."""
    from memprof.models import parse_models
    from memprof.optims import parse_optims
    from memprof.results import RESULTS_FILE
    from memprof.spec import MIN_STEPS, expand_grid, parse_ints, parse_switch

    models = parse_models(args.models)
    optims = parse_optims(args.optims)
    grad_ckpt = parse_switch(args.grad_ckpt, "--grad-ckpt")
    state_bits = parse_ints(args.state_bits, "--state-bits", 1)
    batch_sizes = parse_ints(args.batch_size, "--batch-size", 1)
    if args.steps < MIN_STEPS:
        raise UsageError(f"--steps {args.steps}: use at least {MIN_STEPS}, so the measured step runs with "
                         f"optimizer state present")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: use at least 1")
    if args.timeout_s is not None and args.timeout_s <= 0:
        raise UsageError(f"--timeout-s {args.timeout_s:g}: give a positive number of seconds")
    if args.num_classes < 2:
        raise UsageError(f"--num-classes {args.num_classes}: use at least 2")
    if args.paged and 8 not in state_bits:
        raise UsageError("--paged applies to 8-bit states: add --state-bits 8 (or 32,8)")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR: the run directory whose results.jsonl to continue")
    if args.budget is not None and args.budget != "device":
        from memprof.budget import parse_budget

        parse_budget(args.budget)
    out_dir = _writable_dir(args.out or _default_out())
    if args.pretrained:
        _check_pretrained(models, args.pretrained, args.num_classes)
    backend, announce = _resolve_backend(args.backend)
    budget = _resolve_budget(args.budget, backend)
    entries = expand_grid(models, optims, grad_ckpt, state_bits, batch_sizes, paged=args.paged, steps=args.steps,
                          budget=budget, num_classes=args.num_classes, pretrained=args.pretrained)
    if any(e.spec.state_bits == 8 and not e.skip_reason for e in entries):
        from memprof.optims import require_bitsandbytes

        require_bitsandbytes()
    results_path = os.path.join(out_dir, RESULTS_FILE)
    if args.resume and os.path.exists(results_path):
        finished = {r["key"] for r in _load_records(results_path)}
        entries = [e for e in entries if e.spec.key not in finished]
        announce += (f"\nmemprof: resuming: {len(finished)} configurations already in {results_path}, "
                     f"{len(entries)} to run")
    return RunPlan(entries, out_dir, backend, announce, args)


def execute(plan: RunPlan) -> None:
    """Run a plan; its records are appended to plan.out_dir/results.jsonl as each finishes."""
    from memprof.runner import default_jobs, run_grid

    args = plan.args
    print(plan.announce, file=sys.stderr)
    options = {"cuda": {"snapshot_dir": args.snapshot, "nvml_period_ms": args.nvml_period_ms}}.get(plan.backend, {})
    run_grid(plan.entries, plan.out_dir, plan.backend, progress=not args.no_progress,
             jobs=args.jobs or default_jobs(), options=options, timeout_s=args.timeout_s)


def report(out_dir: str, metric: str | None) -> None:
    """Table 4 from everything in out_dir/results.jsonl: printed, and written beside it."""
    from memprof.accuracy import load_verdicts
    from memprof.report import default_metric, render_markdown, write_reports

    records = _load_records(out_dir)
    verdicts = load_verdicts(out_dir)
    metric = metric or default_metric(records)
    paths = write_reports(records, out_dir, metric, verdicts)
    print(render_markdown(records, metric, verdicts))
    print(f"memprof: wrote {os.path.join(out_dir, 'results.jsonl')} and {', '.join(sorted(paths.values()))}",
          file=sys.stderr)


def _interrupted(out_dir: str) -> int:
    print(f"memprof: interrupted; finished configurations are in {out_dir}/results.jsonl (continue with "
          f"--resume)", file=sys.stderr)
    return 130


def cmd_run(args) -> int:
    plan = plan_run(args)
    accuracy = plan_accuracy(args) if args.accuracy else None
    try:
        execute(plan)
        if accuracy:
            execute_accuracy(args, accuracy[0], accuracy[1], plan.out_dir)
    except KeyboardInterrupt:
        return _interrupted(plan.out_dir)
    report(plan.out_dir, args.metric)
    return 0


def _accuracy_device(backend: str, models) -> str:
    import torch

    from memprof.recipe import CPU_PARAM_LIMIT

    if backend == "cuda" and not torch.cuda.is_available():
        raise UsageError("--backend cuda needs a CUDA GPU: use --backend cpu (or auto)")
    device = "cuda" if backend == "cuda" or (backend == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cpu":
        from memprof.models import build_model

        for info in models:
            with torch.device("meta"):
                n = sum(p.numel() for p in build_model(info, 2).parameters())
            if n > CPU_PARAM_LIMIT:
                raise UsageError(f"accuracy mode trains for real: {info.name} ({n / 1e6:.0f}M parameters) would take "
                                 f"hours on the CPU; use --models test-vit here, or a GPU")
    return device


def plan_accuracy(args, models=None):
    """Validated accuracy grid (the same axes as `memprof run`) and its device."""
    from memprof.models import parse_models
    from memprof.optims import parse_optims, require_bitsandbytes
    from memprof.spec import expand_grid, parse_ints, parse_switch

    models = models or parse_models(args.models)
    optims = parse_optims(args.optims)
    entries = expand_grid(models, optims, parse_switch(args.grad_ckpt, "--grad-ckpt"),
                          parse_ints(args.state_bits, "--state-bits", 1), parse_ints(args.batch_size, "--batch-size", 1),
                          pretrained=args.pretrained, budget="device")
    for flag, lr in (("--lr-sgd", args.lr_sgd), ("--lr-adaptive", args.lr_adaptive)):
        if not lr >= 0:
            raise UsageError(f"{flag} {lr}: a learning rate must be zero or positive")
    if args.train_steps < 60:
        raise UsageError(f"--train-steps {args.train_steps}: use at least 60 (the 8-bit check compares step 50)")
    if any(e.spec.state_bits == 8 and not e.skip_reason for e in entries):
        require_bitsandbytes()
    if args.data:
        from memprof.accuracy import load_data

        load_data((32, 32), args.data)  # the folder's errors, before anything trains
    if args.pretrained:
        _check_pretrained(models, args.pretrained, args.num_classes)
    return entries, _accuracy_device(args.accuracy_backend, models)


def execute_accuracy(args, entries, device: str, out_dir: str) -> None:
    from memprof.accuracy import run_accuracy

    print(f"memprof: accuracy mode on {device}: {len(entries)} configurations, {args.train_steps} steps each",
          file=sys.stderr)
    run_accuracy(entries, out_dir, device, args.train_steps, args.lr_sgd, args.lr_adaptive, args.data, args.seed,
                 progress=not args.no_progress)


def cmd_accuracy(args) -> int:
    from memprof.accuracy import ACCURACY_FILE, load_verdicts
    from memprof.report import render_verdicts

    entries, device = plan_accuracy(args)
    out_dir = _writable_dir(args.out or _default_out())
    try:
        execute_accuracy(args, entries, device, out_dir)
    except KeyboardInterrupt:
        return _interrupted(out_dir)
    text = render_verdicts(list(load_verdicts(out_dir).values()))
    with open(os.path.join(out_dir, "accuracy.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    print(f"memprof: wrote {os.path.join(out_dir, ACCURACY_FILE)} and {os.path.join(out_dir, 'accuracy.md')}",
          file=sys.stderr)
    return 0


def cmd_suite(args) -> int:
    """Every [[run]] of a suite file into one results.jsonl; all runs are validated before the first starts."""
    from memprof.suite import load_suite, run_arguments

    runs = load_suite(args.file)
    name = os.path.splitext(os.path.basename(args.file))[0]
    out_dir = _writable_dir(args.out or os.path.join("reports", "runs", f"suite-{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    plans = []
    for run in runs:
        try:
            run_args = build_parser().parse_args(run_arguments(run, out_dir) + (["--resume"] if args.resume else []))
            plans.append(plan_run(run_args))
        except UsageError as exc:
            raise UsageError(f"{args.file}:{run.line}: {exc}") from None
    try:
        for plan in plans:
            execute(plan)
    except KeyboardInterrupt:
        return _interrupted(out_dir)
    report(out_dir, None)
    return 0


def _check_pretrained(models, pretrained: str, num_classes: int) -> None:
    """Fail fast, before the grid, when the weights are missing or do not fit a model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.models import build_model, check_pretrained, read_pretrained

    for info in models:
        state = read_pretrained(info, pretrained)
        with FakeTensorMode(allow_non_fake_inputs=True):
            check_pretrained(build_model(info, num_classes), state, pretrained)


def cmd_table(args) -> int:
    from memprof.report import default_metric, render_markdown, write_reports

    records = _load_records(args.results)
    out_dir = _writable_dir(args.out or (args.results if os.path.isdir(args.results)
                                         else os.path.dirname(args.results) or "."))
    metric = args.metric or default_metric(records)
    paths = write_reports(records, out_dir, metric)
    print(render_markdown(records, metric))
    print(f"memprof: wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
    return 0


def _load_records(path: str) -> list[dict]:
    from memprof.results import load

    if not os.path.exists(path):
        raise UsageError(f"no results at {path}: give a results.jsonl or a run directory")
    try:
        records = load(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}; give a results.jsonl or a run directory that holds one") from None
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{path} is not a memprof results file ({exc}): give a results.jsonl") from None
    if not records:
        raise UsageError(f"{path} holds no records: run `memprof run` first")
    return records


def cmd_fidelity(args) -> int:
    import json

    from memprof.report import fidelity_rows, render_fidelity

    measured, predicted = _load_records(args.measured), _load_records(args.predicted)
    text = render_fidelity(measured, predicted)
    print(text)
    if args.out:
        _writable_dir(args.out)
        with open(os.path.join(args.out, "fidelity.md"), "w", encoding="utf-8") as fh:
            fh.write(text)
        with open(os.path.join(args.out, "fidelity.json"), "w", encoding="utf-8") as fh:
            json.dump(fidelity_rows(measured, predicted), fh, indent=2, sort_keys=True)
    return 0


DEFAULT_FAIL = ("peak_allocated:0%", "peak_reserved:0%", "peak_live:0%")


def cmd_baseline_save(args) -> int:
    import json

    from memprof.baseline import diff_text, load_any, make_baseline

    new = make_baseline(_load_records(args.results))
    if os.path.exists(args.output):
        print(f"changes against {args.output}:\n{diff_text(load_any(args.output), new)}")
    _writable_dir(os.path.dirname(os.path.abspath(args.output)))
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(new, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"memprof: wrote baseline {args.output} ({len(new['benchmarks'])} configurations)", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from tabulate import tabulate

    from memprof.baseline import compare, load_any, parse_threshold

    thresholds = [parse_threshold(t) for t in (args.fail or DEFAULT_FAIL)]
    base, current = load_any(args.baseline), load_any(args.current)
    result = compare(base, current, thresholds)
    if result.rows:
        print(tabulate(result.rows, headers=["config", "field", "baseline", "current", "delta", "verdict"]))
    for note in result.notes:
        print(note)
    if result.regressions:
        print(f"\n{len(result.regressions)} regression(s):")
        for r in result.regressions:
            print(f"  {r}")
        return 1
    print(f"\nno regression ({len(result.rows)} comparisons)")
    return 0


def cmd_list(args) -> int:
    from tabulate import tabulate

    if args.what == "models":
        from memprof.models import REGISTRY, open_clip_names

        rows = [[m.name, m.open_clip_config or "-", "+".join(m.embedding_modules), m.description]
                for m in REGISTRY.values()]
        print(tabulate(rows, headers=["name", "open_clip config", "embedding layer", "description"]))
        print(f"\nAlso accepted: any open_clip architecture name ({len(open_clip_names())}): "
              + ", ".join(open_clip_names()))
    elif args.what == "optims":
        from memprof.optims import REGISTRY

        rows = [[o.name, o.label, o.factory, o.bnb_8bit or "-", "yes" if o.freeze_embed else "",
                 o.state_tensors_per_param, o.description] for o in REGISTRY.values()]
        print(tabulate(rows, headers=["name", "paper name", "class", "8-bit class", "freeze-embed", "states/param",
                                      "description"]))
        print("\n`--optims all` runs all of them; `--optims paper` runs Table 4's four.")
    else:
        from memprof.budget import PROFILES

        rows = [[p.name, p.label, f"{p.total_bytes / (1 << 30):.0f} GiB", p.compute_capability] for p in PROFILES.values()]
        print(tabulate(rows, headers=["name", "card", "memory", "compute capability"]))
        print("\nOr a size: --budget 11GiB")
    return 0


def _accuracy_options(p) -> None:
    from memprof.recipe import DEFAULT_LR_ADAPTIVE, DEFAULT_LR_SGD, DEFAULT_STEPS

    p.add_argument("--train-steps", type=int, default=DEFAULT_STEPS,
                   help=f"accuracy: training steps per configuration (default: {DEFAULT_STEPS})")
    p.add_argument("--lr-sgd", type=float, default=DEFAULT_LR_SGD,
                   help=f"accuracy: peak learning rate of SGD and LARS, cosine to 0 (default: {DEFAULT_LR_SGD}; the "
                        "paper sweeps 3e-5..1e-2 for pretrained weights)")
    p.add_argument("--lr-adaptive", type=float, default=DEFAULT_LR_ADAPTIVE,
                   help=f"accuracy: peak learning rate of AdamW and LAMB, cosine to 0 (default: {DEFAULT_LR_ADAPTIVE}; "
                        "the paper sweeps 3e-7..1e-4 for pretrained weights; random init needs more)")
    p.add_argument("--data", help="accuracy: an ImageFolder (default: scikit-learn's digits, shipped with it)")
    p.add_argument("--seed", type=int, default=0, help="accuracy: seed of init and batch order (default: 0)")
    p.add_argument("--accuracy-backend", choices=["auto", "cpu", "cuda"], default="auto",
                   help="accuracy: where to train (default: cuda where present, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    from memprof.report import METRICS

    parser = _Parser(prog="memprof", description="Peak GPU memory of fine-tuning vision transformers: "
                     "measured on a GPU, predicted by a CUDA-faithful simulation on a CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="profile (or predict) a grid of model x optimizer x settings",
                         description="Runs micro-batch training steps for every configuration and records "
                                     "peak memory. Without a GPU the figures are predicted by the simulation.")
    run.add_argument("--models", default="paper", help="comma list of models, or `paper` (default: paper)")
    run.add_argument("--optims", default="paper", help="comma list of optimizers, `paper` or `all` (default: paper)")
    run.add_argument("--grad-ckpt", default="off", help="off, on or off,on (default: off)")
    run.add_argument("--state-bits", default="32", help="optimizer state bits: 32, 8 or 32,8 (8: bitsandbytes "
                                                        "block-wise 8-bit states)")
    run.add_argument("--paged", action="store_true", help="8-bit states in bitsandbytes' paged optimizers "
                                                          "(CUDA managed memory, outside torch's allocator)")
    run.add_argument("--batch-size", default="1", help="micro-batch sizes, comma list (default: 1)")
    run.add_argument("--steps", type=int, default=2, help="training steps per config (default: 2, the minimum)")
    run.add_argument("--budget", default=None,
                     help="card or size whose memory decides OOM: titan-x (the paper's 12 GB card; the simulation's "
                          "default), v100-16g, a100-40g, a100-80g, rtx4090, h100-80g, h200, a size such as 11GiB, "
                          "or device (the whole GPU; the measuring backends' default). On a bigger GPU the cuda "
                          "backend emulates the budget by capping the allocator")
    run.add_argument("--num-classes", type=int, default=10, help="classes of the new linear head (default: 10)")
    run.add_argument("--pretrained", help="weights: a local file, or an open_clip tag found in the local cache")
    run.add_argument("--backend", choices=["auto", "cuda", "simulate", "cpu"], default="auto",
                     help="auto (default: cuda where a GPU is present, else simulate), cuda (measure with torch.cuda "
                          "and NVML), simulate (predict), cpu (measure live tensor bytes on the CPU)")
    run.add_argument("--metric", choices=list(METRICS), default=None,
                     help="figure shown in the table (default: reserved; live for the cpu backend)")
    run.add_argument("--resume", action="store_true", help="skip configurations already in --out's results.jsonl")
    run.add_argument("--snapshot", metavar="DIR", help="cuda: record allocator history, dump a snapshot per config")
    run.add_argument("--nvml-period-ms", type=float, default=5.0, help="cuda: NVML sampling period, 0 = off")
    run.add_argument("--timeout-s", type=float, default=None, help="cpu/cuda: a worker running longer is crashed")
    run.add_argument("--out", help="output directory (default: reports/runs/<timestamp>)")
    run.add_argument("--jobs", type=int, default=None, help="worker processes (default: up to 2, one per core)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--accuracy", action="store_true",
                     help="then train each configuration for real and add its verdict to the table (see `accuracy`)")
    _accuracy_options(run)
    run.set_defaults(func=cmd_run)

    acc = sub.add_parser("accuracy", help="train each configuration for real: does the memory setting still train?",
                         description="Trains each configuration at its micro-batch size (cosine schedule to 0) and "
                                     "checks: it learns, frozen means frozen, checkpointing is exact, 8-bit tracks "
                                     "32-bit. One verdict per configuration.")
    acc.add_argument("--models", default="test-vit", help="comma list (default: test-vit; paper models need a GPU)")
    acc.add_argument("--optims", default="paper", help="comma list, `paper` or `all` (default: paper)")
    acc.add_argument("--grad-ckpt", default="off,on", help="off, on or off,on (default: off,on)")
    acc.add_argument("--state-bits", default="32,8", help="32, 8 or 32,8 (default: 32,8)")
    acc.add_argument("--batch-size", default="1", help="micro-batch size (default: 1)")
    acc.add_argument("--num-classes", type=int, default=10, help=argparse.SUPPRESS)
    acc.add_argument("--pretrained", help="weights: a local file, or an open_clip tag found in the local cache")
    acc.add_argument("--out", help="output directory (default: reports/runs/<timestamp>)")
    acc.add_argument("--no-progress", action="store_true", help="no progress bar")
    _accuracy_options(acc)
    acc.set_defaults(func=cmd_accuracy)

    suite = sub.add_parser("suite", help="run a suite file (suites/*.toml): several grids into one results.jsonl")
    suite.add_argument("file", help="suite file, e.g. suites/ci.toml")
    suite.add_argument("--out", help="output directory (default: reports/runs/suite-<name>-<timestamp>)")
    suite.add_argument("--resume", action="store_true", help="skip configurations already in --out")
    suite.set_defaults(func=cmd_suite)

    table = sub.add_parser("table", help="render Table 4 from a results.jsonl (markdown, CSV, JSON, PNG)")
    table.add_argument("results", help="results.jsonl or a run directory")
    table.add_argument("--metric", choices=list(METRICS), default=None)
    table.add_argument("--out", help="directory for table4.* (default: beside the results)")
    table.set_defaults(func=cmd_table)

    fid = sub.add_parser("fidelity", help="predicted vs measured peaks, % error per configuration")
    fid.add_argument("measured", help="results of a measuring backend (results.jsonl or run directory)")
    fid.add_argument("predicted", help="results of the simulation for the same configurations")
    fid.add_argument("--out", help="directory for fidelity.md and fidelity.json")
    fid.set_defaults(func=cmd_fidelity)

    base = sub.add_parser("baseline", help="save results as a regression baseline")
    base_sub = base.add_subparsers(dest="action", required=True, parser_class=_Parser)
    save = base_sub.add_parser("save", help="write a baseline JSON from results; prints what changed")
    save.add_argument("results", help="results.jsonl or a run directory")
    save.add_argument("-o", "--output", default=os.path.join("reports", "baselines", "ci.json"),
                      help="baseline file (default: reports/baselines/ci.json)")
    save.set_defaults(func=cmd_baseline_save)

    cmp_ = sub.add_parser("compare", help="fail (exit 1) when CURRENT regresses against BASELINE")
    cmp_.add_argument("baseline", help="baseline JSON (or results, or pytest-benchmark JSON)")
    cmp_.add_argument("current", help="results.jsonl, run directory, baseline or pytest-benchmark JSON")
    cmp_.add_argument("--fail", action="append", metavar="FIELD:N[%]",
                      help="regression threshold, repeatable: " + ", ".join(
                          ["peak_allocated", "peak_reserved", "peak_live", "nvml_process", "step_ms", "state_bytes"])
                      + " or any stats field; bigger is worse (default: " + ", ".join(DEFAULT_FAIL) + ")")
    cmp_.set_defaults(func=cmd_compare)

    lst = sub.add_parser("list", help="list registered models, optimizers or budget cards")
    lst.add_argument("what", choices=["models", "optims", "budgets"])
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(f"memprof: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
