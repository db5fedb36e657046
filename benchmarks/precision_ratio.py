"""The issue's speed bar as a script: median prediction time of the paper grid's configurations under
`--precision bf16-amp --optim-impl fused` over fp32 (foreach), per configuration, each predicted `--rounds`
times in this process after one warm-up, each from scratch (no forward trace reused:
memprof.simulation.shared.clear), fp32 and bf16-amp rounds alternating so that the shared cores' slow spells
fall on both. One torch thread, as the workers run. Prints one line per configuration and exits 1 if any ratio
is over 1.2.

    PYTHONPATH=. python benchmarks/precision_ratio.py [--rounds 5] [--models vit-b-16,vit-l-14,vit-h-14]
"""

import argparse
import gc
import statistics
import sys
import time

import torch

from memprof.optims import PAPER_OPTIMS
from memprof.simulation import shared
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

BAR = 1.2


def medians_s(specs: list, rounds: int) -> list[float]:
    """Median seconds of each spec's prediction, the specs alternating round by round."""
    for spec in specs:
        predict(spec)  # warm-up (imports, dispatcher caches)
    times = [[] for _ in specs]
    for _ in range(rounds):
        for spec, out in zip(specs, times):
            shared.clear()
            gc.collect()
            start = time.perf_counter()
            predict(spec)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="vit-b-16,vit-l-14,vit-h-14")
    ap.add_argument("--optims", default=",".join(PAPER_OPTIMS))
    ap.add_argument("--budget", default="titan-x", help="the card: its compute capability picks the attention kernel")
    args = ap.parse_args()
    torch.set_num_threads(1)
    worst = 0.0
    for model in args.models.split(","):
        for optim in args.optims.split(","):
            base, amp = medians_s([RunSpec(model, optim, budget=args.budget),
                                   RunSpec(model, optim, precision="bf16-amp", optim_impl="fused", budget=args.budget)],
                                  args.rounds)
            worst = max(worst, amp / base)
            print(f"{model} {optim}: fp32 foreach {base:.2f} s, bf16-amp fused {amp:.2f} s, ratio {amp / base:.2f} "
                  f"(median of {args.rounds})", flush=True)
    print(f"worst ratio {worst:.2f} (bar {BAR})")
    return 0 if worst <= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
