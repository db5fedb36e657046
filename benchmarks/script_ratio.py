"""Wall time of `memprof script` against `memprof run` on the same setups, paired and alternating.

    PYTHONPATH=. python benchmarks/script_ratio.py [--rounds 3] [--models test-vit,timm:vit_tiny_patch16_224]

For each model: the registry path (`memprof run --models MODEL --optims adam`) and the script path (`memprof script
tests/data/scripts/registry_twin.py --model MODEL`, the same training steps as an ordinary CUDA script), each a fresh
process timed whole (imports included, as a user waits for it), alternated round by round so a busy machine slows
both alike.
Prints each pair, each model's median ratio and the set's (the sum over models of the script path's median over the
run path's). Both paths predict; the figures are CPU wall times of the simulation (measured here), and the two
predictions are checked equal. The script path includes building the model for real on the CPU (the user's own
constructor; the run path builds on the meta device).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TWIN = os.path.join(ROOT, "tests", "data", "scripts", "registry_twin.py")


def _timed(cmd: list[str], cwd: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def run_path(model: str) -> tuple[float, int]:
    """`memprof run --models MODEL --optims adam` in a fresh process (as a user runs it)."""
    from memprof.results import read_records

    with tempfile.TemporaryDirectory() as tmp:
        seconds = _timed([sys.executable, "-m", "memprof", "run", "--models", model, "--optims", "adam", "--out",
                          os.path.join(tmp, "r"), "--no-progress"], tmp)
        (rec,) = read_records(os.path.join(tmp, "r"))
    return seconds, rec["metrics"]["peak_allocated_bytes"]


def script_path(model: str) -> tuple[float, int]:
    """`memprof script registry_twin.py --model MODEL` in a fresh process."""
    from memprof.results import read_records

    with tempfile.TemporaryDirectory() as tmp:
        seconds = _timed([sys.executable, "-m", "memprof", "script", "--out", os.path.join(tmp, "s"), TWIN,
                          "--model", model], tmp)
        (rec,) = read_records(os.path.join(tmp, "s"))
    return seconds, rec["metrics"]["peak_allocated_bytes"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="test-vit,timm:vit_tiny_patch16_224")
    args = parser.parse_args()
    medians = {}
    for model in args.models.split(","):
        runs, scripts = [], []
        for i in range(args.rounds):
            order = (run_path, script_path) if i % 2 == 0 else (script_path, run_path)
            for fn in order:
                seconds, peak = fn(model)
                (runs if fn is run_path else scripts).append((seconds, peak))
            if runs[-1][1] != scripts[-1][1]:
                print(f"{model}: the predictions differ ({runs[-1][1]} vs {scripts[-1][1]} B)", file=sys.stderr)
                return 1
            print(f"{model} round {i}: run {runs[-1][0]:.2f} s, script {scripts[-1][0]:.2f} s (measured wall time)")
        medians[model] = (statistics.median(s for s, _ in runs), statistics.median(s for s, _ in scripts))
        r, s = medians[model]
        pairs = sorted(b / a for (a, _), (b, _) in zip(runs, scripts))  # each round's script / run
        print(f"{model}: median run {r:.2f} s, script {s:.2f} s, ratio {s / r:.2f}; paired ratios median "
              f"{statistics.median(pairs):.2f}, range {pairs[0]:.2f}-{pairs[-1]:.2f} over {len(pairs)} rounds")
    total_run = sum(r for r, _ in medians.values())
    total_script = sum(s for _, s in medians.values())
    print(f"set: script / run = {total_script / total_run:.2f} (the issue's bound: 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
