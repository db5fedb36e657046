"""Public measurements, re-created as ordinary scripts (validation/), predicted through `memprof script`.

    python benchmarks/validation.py [--out reports/validation] [--only NAME]

Each row: a script of validation/ with its arguments, the source of the published figure, the figure and the
metric it is (torch.cuda.max_memory_allocated or max_memory_reserved, in GB = 1e9 B unless said), the card it was
measured on (or the one assumed), and whether the comparison is like for like (the reason where not). Every row
runs in a fresh process (`memprof script --budget CARD --steps 3 --out DIR SCRIPT ARGS`, predicted, no GPU) and
its predicted figure of the same metric is set beside the published one. Prints the table and the summary: the
median and largest error of the like-for-like rows, for allocated and reserved, and how often the prediction is
under the measurement (the rate at which it would send a user into an out-of-memory); writes it to
OUT/validation.md (README shows it) and the records to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RASCHKA = "rasbt/ViT-finetuning-scripts precision-benchmarks/torchvision-vit16-{}/README.md (PyTorch 2.1.0)"
A100 = "a100-40g"  # the card is not stated: an A100 assumed (8 MiB cuBLAS workspaces; sm90 would add 48 MiB)


@dataclass(frozen=True)
class Row:
    name: str
    script: str
    args: tuple
    source: str
    published_gb: float
    metric: str  # allocated | reserved
    card: str
    like_for_like: bool
    why_not: str = ""


ROWS = (
    *(Row(f"raschka vit_l_16 b32 {prec}", "raschka_vit_precision.py",
          ("--model", "vit_l_16", "--precision", prec, "--batch-size", "32"), RASCHKA.format("large"), gb, "reserved",
          A100, True, "") for prec, gb in (("fp32", 16.70), ("16-mixed", 12.30), ("bf16-mixed", 12.24),
                                           ("bf16-true", 8.43))),
    *(Row(f"raschka vit_b_16 b16 {prec}", "raschka_vit_precision.py",
          ("--model", "vit_b_16", "--precision", prec, "--batch-size", "16"), RASCHKA.format("small"), gb, "reserved",
          A100, True, "") for prec, gb in (("fp32", 3.71), ("16-mixed", 3.03), ("bf16-mixed", 3.03),
                                           ("bf16-true", 1.95))),
    Row("tutorial vit_l_16 Adam b1", "tutorial_optimizer_in_backward.py", (),
        "pytorch/tutorials intermediate_source/optimizer_step_in_backward_tutorial.py (memory snapshot)", 6.1,
        "allocated", "h100-80g", False, "the figure is read off a snapshot plot (about 6 GB), not printed"),
    Row("tutorial vit_l_16 Adam b1 in-backward", "tutorial_optimizer_in_backward.py", ("--in-backward",),
        "pytorch/tutorials intermediate_source/optimizer_step_in_backward_tutorial.py (memory snapshot)", 4.0,
        "allocated", "h100-80g", False, "the figure is read off a snapshot plot (about 4 GB), not printed"),
    Row("torchao vit_huge b8 bf16-amp fused AdamW", "torchao_vit_h.py", ("--optim", "fused"),
        "pytorch/ao torchao/prototype/low_bit_optim/README.md (4070Ti SUPER)", 12.23, "allocated", "16GiB@8.9", False,
        "torch.compile'd model in later versions of the table; its script's metric not re-read here"),
    Row("torchao vit_huge b8 bf16-amp bnb AdamW8bit", "torchao_vit_h.py", ("--optim", "bnb8bit"),
        "pytorch/ao torchao/prototype/low_bit_optim/README.md (4070Ti SUPER)", 8.32, "allocated", "16GiB@8.9", False,
        "torch.compile'd model in later versions of the table; its script's metric not re-read here"),
)


def predict(row: Row, out: str) -> dict:
    """The record `memprof script` writes for the row (its fresh process's), or {"error": ...}."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "memprof", "script", "--budget", row.card, "--steps", "3", "--out", out,
           os.path.join(ROOT, "validation", row.script), *row.args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "seconds": time.perf_counter() - start}
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as fh:
        record = [json.loads(line) for line in fh][-1]
    return {"record": record, "seconds": time.perf_counter() - start}


def table(rows_and_results) -> str:
    lines = ["| measurement (published) | metric | published GB | predicted GB | error | like for like |",
             "|---|---|---|---|---|---|"]
    errors = {"allocated": [], "reserved": []}
    for row, res in rows_and_results:
        if "error" in res:
            lines.append(f"| {row.name} | {row.metric} | {row.published_gb:.2f} | error: {res['error']} | | |")
            continue
        m = res["record"]["metrics"]
        predicted = m[f"peak_{row.metric}_bytes"] / 1e9
        err = predicted / row.published_gb - 1
        if row.like_for_like:
            errors[row.metric].append(err)
        lines.append(f"| {row.name} | {row.metric} | {row.published_gb:.2f} | {predicted:.2f} | {err:+.1%} | "
                     f"{'yes' if row.like_for_like else 'no: ' + row.why_not} |")
    lines.append("")
    for metric, errs in errors.items():
        if errs:
            under = sum(e < 0 for e in errs)
            lines.append(f"- {metric} (like for like, {len(errs)} rows): median error {statistics.median(errs):+.1%}, "
                         f"largest {max(errs, key=abs):+.1%}; under the measurement in {under} of {len(errs)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "validation"))
    parser.add_argument("--only", default=None, help="rows whose name contains this")
    args = parser.parse_args(argv)
    rows = [r for r in ROWS if args.only is None or args.only in r.name]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, row in enumerate(rows):
            res = predict(row, os.path.join(scratch, str(i)))
            print(f"{res.get('seconds', 0):6.1f}s {row.name}: {res.get('error') or 'ok'}", file=sys.stderr, flush=True)
            results.append((row, res))
    text = table(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    sources = "\n".join(sorted({f"- {r.source}" for r in rows}))
    with open(os.path.join(args.out, "validation.md"), "w", encoding="utf-8") as fh:
        fh.write("# Public measurements against memprof's predictions\n\n`python benchmarks/validation.py` "
                 "(every figure in the predicted column is predicted, no GPU used; the published ones were measured "
                 "by their authors).\n\n" + text + "\n\nSources:\n" + sources + "\n")
    with open(os.path.join(args.out, "results.jsonl"), "w", encoding="utf-8") as fh:
        for row, res in results:
            if "record" in res:
                fh.write(json.dumps({**res["record"], "validation": row.name, "published_gb": row.published_gb,
                                     "published_metric": row.metric}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
