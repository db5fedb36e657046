"""Wall time of the commands README quotes, process start included: the median of several runs.

    python benchmarks/wall_times.py [--runs 5] [--only paper-grid,fit-h14] [--json out.json]

Each command runs in a fresh process into a fresh output directory; the figure is the median wall time
(and the spread), measured here on whatever machine runs it. README quotes figures from a quiet 2-core
machine; say which machine with the figures.
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
}


def time_once(args: list[str]) -> float:
    backend = [] if args[0] == "accuracy" else ["--backend", "simulate"]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "memprof", *args, *backend, "--no-progress",
                            "--out", os.path.join(out, "o")], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if r.returncode not in (0, 1):
        raise SystemExit(f"memprof {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default=",".join(COMMANDS))
    p.add_argument("--json")
    a = p.parse_args()
    rows = {}
    for name in a.only.split(","):
        times = [time_once(COMMANDS[name]) for _ in range(a.runs)]
        rows[name] = {"command": "memprof " + " ".join(COMMANDS[name]), "runs": a.runs,
                      "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
                      "max_s": round(max(times), 2)}
        print(f"{name:12s} median {rows[name]['median_s']:7.2f} s  (min {rows[name]['min_s']:.2f}, max "
              f"{rows[name]['max_s']:.2f}, {a.runs} runs): {rows[name]['command']}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"cpu_count": os.cpu_count(), "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
