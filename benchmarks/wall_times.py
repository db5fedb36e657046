"""Wall time and peak host memory of the commands README quotes, process start included: the median of
several runs.

    python benchmarks/wall_times.py [--runs 5] [--only paper-grid,fit-h14] [--json out.json] [--max-rss-gib 1.5]

Each command runs in a fresh process into a fresh output directory; the figures are the median wall time
(and the spread) and the peak resident set size of its largest process (the command's own or one of its
workers: `ru_maxrss` of the waited-for child from wait4), measured here on whatever machine runs it.
README quotes figures from a quiet 2-core machine; say which machine with the figures. With
`--max-rss-gib` the benchmark exits 1 when any command's largest process went past that bound.
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

COMMANDS = {
    "paper-grid": ["run", "--models", "paper", "--optims", "paper"],
    "full-grid": ["run", "--models", "paper", "--optims", "all", "--grad-ckpt", "off,on", "--state-bits", "32,8"],
    "fit-h14": ["fit", "--models", "vit-h-14", "--optims", "all", "--budget", "rtx4090"],
    "advise-h14": ["advise", "--models", "vit-h-14", "--optims", "adamw", "--budget", "titan-x"],
    "accuracy": ["accuracy"],
    "script-small": ["script", "--budget", "rtx4090", "--steps", "2"],  # the script and its arguments follow
}
SCRIPT = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "scripts",
                       "train_small.py")]
GIB = 1 << 30


def run_once(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the largest process) of one fresh run of `memprof ARGS`."""
    if args[0] == "script":
        command = [*args, "--out", "OUT", *SCRIPT]
    else:
        backend = [] if args[0] == "accuracy" else ["--backend", "simulate"]
        command = [*args, *backend, "--no-progress", "--out", "OUT"]
    with tempfile.TemporaryDirectory() as out:
        command = [os.path.join(out, "o") if a == "OUT" else a for a in command]
        start = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "memprof", *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        stderr = p.stderr.read()  # to the end; the child is not yet reaped, so wait4 gets its usage
        p.stderr.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
    code = p.returncode
    if code not in (0, 1):
        raise SystemExit(f"memprof {' '.join(args)} failed ({code}): {stderr[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports kilobytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default=",".join(COMMANDS))
    p.add_argument("--json")
    p.add_argument("--max-rss-gib", type=float, help="exit 1 when a command's largest process exceeds this")
    a = p.parse_args()
    rows, over = {}, []
    for name in a.only.split(","):
        runs = [run_once(COMMANDS[name]) for _ in range(a.runs)]
        times, rss = [t for t, _ in runs], [r for _, r in runs]
        rows[name] = {"command": "memprof " + " ".join(COMMANDS[name]), "runs": a.runs,
                      "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
                      "max_s": round(max(times), 2), "peak_rss_gib": round(max(rss) / GIB, 2)}
        print(f"{name:12s} median {rows[name]['median_s']:7.2f} s  (min {rows[name]['min_s']:.2f}, max "
              f"{rows[name]['max_s']:.2f}, {a.runs} runs), peak RSS {rows[name]['peak_rss_gib']:.2f} GiB: "
              f"{rows[name]['command']}", flush=True)
        if a.max_rss_gib and max(rss) > a.max_rss_gib * GIB:
            over.append(name)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"cpu_count": os.cpu_count(), "results": rows}, fh, indent=2)
    if over:
        print(f"over the {a.max_rss_gib} GiB host-memory bound: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
