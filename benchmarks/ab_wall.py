"""Paired A/B wall time of one memprof command between two checkouts: runs alternate (A, B, B, A, ...) so a
machine whose load drifts weighs on both alike; the figure is the ratio of the medians (B / A) with the spread
of the per-pair ratios.

    python benchmarks/ab_wall.py OLD_CHECKOUT NEW_CHECKOUT [--pairs 5] [-- run --models paper --optims paper]

Each run is a fresh process (`python -m memprof ...` with PYTHONPATH at the checkout) into a fresh output
directory, with the simulate backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT = ["run", "--models", "paper", "--optims", "paper"]


def once(checkout: str, command: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "memprof", *command, "--backend", "simulate", "--no-progress",
                            "--out", os.path.join(out, "o")], env=env, capture_output=True, text=True,
                           cwd=checkout)
        elapsed = time.perf_counter() - start
    if r.returncode not in (0, 1):
        raise SystemExit(f"{checkout}: memprof {' '.join(command)} failed ({r.returncode}): {r.stderr[-1500:]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("command", nargs="*", default=DEFAULT)
    a = p.parse_args()
    old, new = [], []
    for i in range(a.pairs):
        order = [(a.old, old), (a.new, new)] if i % 2 == 0 else [(a.new, new), (a.old, old)]
        for checkout, times in order:
            times.append(once(checkout, a.command or DEFAULT))
        print(f"pair {i + 1}: old {old[-1]:.2f} s, new {new[-1]:.2f} s, ratio {new[-1] / old[-1]:.3f}", flush=True)
    ratios = [n / o for n, o in zip(new, old)]
    print(f"old median {statistics.median(old):.2f} s, new median {statistics.median(new):.2f} s, ratio of medians "
          f"{statistics.median(new) / statistics.median(old):.3f} (per-pair ratios {min(ratios):.3f}-{max(ratios):.3f}, "
          f"{a.pairs} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
