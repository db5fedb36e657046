"""Command line: `memprof run`, `memprof table`, `memprof list`.

Bad input ends in one line naming the fix and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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


def cmd_run(args) -> int:
    from memprof.budget import parse_budget
    from memprof.models import parse_models
    from memprof.optims import parse_optims
    from memprof.spec import MIN_STEPS, expand_grid, parse_ints, parse_switch

    models = parse_models(args.models)
    optims = parse_optims(args.optims)
    grad_ckpt = parse_switch(args.grad_ckpt, "--grad-ckpt")
    state_bits = parse_ints(args.state_bits, "--state-bits", 1)
    batch_sizes = parse_ints(args.batch_size, "--batch-size", 1)
    parse_budget(args.budget)
    if args.steps < MIN_STEPS:
        raise UsageError(f"--steps {args.steps}: use at least {MIN_STEPS}, so the measured step runs with "
                         f"optimizer state present")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: use at least 1")
    if args.num_classes < 2:
        raise UsageError(f"--num-classes {args.num_classes}: use at least 2")
    out_dir = _writable_dir(args.out or _default_out())
    if args.pretrained:
        _check_pretrained(models, args.pretrained, args.num_classes)
    entries = expand_grid(models, optims, grad_ckpt, state_bits, batch_sizes, steps=args.steps,
                          budget=args.budget, num_classes=args.num_classes, pretrained=args.pretrained)

    import torch

    why = ("a CUDA GPU is present, but measuring on it is not built yet" if torch.cuda.is_available()
           else "no CUDA GPU here")
    print(f"memprof: backend simulate ({why}): every figure is predicted, not measured", file=sys.stderr)

    from memprof.report import render_markdown, write_reports
    from memprof.runner import default_jobs, run_grid

    try:
        records = run_grid(entries, out_dir, progress=not args.no_progress, jobs=args.jobs or default_jobs())
    except KeyboardInterrupt:
        print(f"memprof: interrupted; finished configurations are in {out_dir}/results.jsonl", file=sys.stderr)
        return 130
    paths = write_reports(records, out_dir, args.metric)
    print(render_markdown(records, args.metric))
    print(f"memprof: wrote {out_dir}/results.jsonl and {', '.join(sorted(paths.values()))}", file=sys.stderr)
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
    from memprof.report import render_markdown, write_reports
    from memprof.results import load

    if not os.path.exists(args.results):
        raise UsageError(f"no results at {args.results}: give a results.jsonl or a run directory")
    try:
        records = load(args.results)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{args.results} is not a memprof results file ({exc}): give a results.jsonl") from None
    if not records:
        raise UsageError(f"{args.results} holds no records: run `memprof run` first")
    out_dir = _writable_dir(args.out or (args.results if os.path.isdir(args.results)
                                         else os.path.dirname(args.results) or "."))
    paths = write_reports(records, out_dir, args.metric)
    print(render_markdown(records, args.metric))
    print(f"memprof: wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
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

        rows = [[o.name, o.label, o.factory, "yes" if o.freeze_embed else "", o.state_tensors_per_param,
                 o.description] for o in REGISTRY.values()]
        print(tabulate(rows, headers=["name", "paper name", "class", "freeze-embed", "states/param", "description"]))
        print("\n`--optims all` runs all of them; `--optims paper` runs Table 4's four.")
    else:
        from memprof.budget import PROFILES

        rows = [[p.name, p.label, f"{p.total_bytes / (1 << 30):.0f} GiB", p.compute_capability] for p in PROFILES.values()]
        print(tabulate(rows, headers=["name", "card", "memory", "compute capability"]))
        print("\nOr a size: --budget 11GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memprof", description="Peak GPU memory of fine-tuning vision transformers: "
                     "measured on a GPU, predicted by a CUDA-faithful simulation on a CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="profile (or predict) a grid of model x optimizer x settings",
                         description="Runs micro-batch training steps for every configuration and records "
                                     "peak memory. Without a GPU the figures are predicted by the simulation.")
    run.add_argument("--models", default="paper", help="comma list of models, or `paper` (default: paper)")
    run.add_argument("--optims", default="paper", help="comma list of optimizers, `paper` or `all` (default: paper)")
    run.add_argument("--grad-ckpt", default="off", help="off, on or off,on (default: off)")
    run.add_argument("--state-bits", default="32", help="optimizer state bits: 32 (8 arrives with bitsandbytes)")
    run.add_argument("--batch-size", default="1", help="micro-batch sizes, comma list (default: 1)")
    run.add_argument("--steps", type=int, default=2, help="training steps per config (default: 2, the minimum)")
    run.add_argument("--budget", default="titan-x",
                     help="target card or size for the OOM verdict: titan-x (the paper's 12 GB card, default), "
                          "v100-16g, a100-40g, a100-80g, rtx4090, h100-80g, or e.g. 11GiB")
    run.add_argument("--num-classes", type=int, default=10, help="classes of the new linear head (default: 10)")
    run.add_argument("--pretrained", help="weights: a local file, or an open_clip tag found in the local cache")
    run.add_argument("--backend", choices=["auto", "simulate"], default="auto",
                     help="auto (default) or simulate; measuring backends arrive with the cuda backend")
    run.add_argument("--metric", choices=["reserved", "allocated", "device"], default="reserved",
                     help="figure shown in the table (default: reserved)")
    run.add_argument("--out", help="output directory (default: reports/runs/<timestamp>)")
    run.add_argument("--jobs", type=int, default=None, help="worker processes (default: up to 2, one per core)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    table = sub.add_parser("table", help="render Table 4 from a results.jsonl (markdown, CSV, JSON, PNG)")
    table.add_argument("results", help="results.jsonl or a run directory")
    table.add_argument("--metric", choices=["reserved", "allocated", "device"], default="reserved")
    table.add_argument("--out", help="directory for table4.* (default: beside the results)")
    table.set_defaults(func=cmd_table)

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
