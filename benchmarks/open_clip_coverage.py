"""Coverage benchmark: how many open_clip architecture names the simulation can predict.

For every name in `open_clip.list_models()` it predicts AdamW at micro-batch 1 (backend `simulate`,
in-process, one name at a time, exceptions caught) and writes a table name -> ok (predicted peak
allocated bytes, seconds) or the exception type, its first line and the innermost frame where it was
raised. Prints the ok share and the sweep's wall time. Names memprof lists as unsupported
(memprof.model_sources.open_clip.UNSUPPORTED) fail with their UsageError unless --attempt-unsupported runs them anyway.

    PYTHONPATH=$PWD python benchmarks/open_clip_coverage.py --out /tmp/coverage.md [--only SigLIP]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback


def where(exc: BaseException) -> str:
    """The innermost frame outside torch's own dispatch machinery: the model code that tripped."""
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in frames if "/torch/" not in f.filename] or frames
    f = keep[-1] if keep else None
    return f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} {f.name}" if f else "?"


def run_one(name: str) -> dict:
    from memprof.simulation.simulate import predict
    from memprof.spec import RunSpec

    t0 = time.perf_counter()
    try:
        status, metrics = predict(RunSpec(model=name, optim="adamw"))
        return {"name": name, "result": status, "peak_allocated_bytes": metrics["peak_allocated_bytes"],
                "params": metrics["params_total"], "s": time.perf_counter() - t0}
    except Exception as exc:  # the benchmark records every failure and goes on
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return {"name": name, "result": "fail", "exc": type(exc).__name__, "msg": first, "at": where(exc),
                "s": time.perf_counter() - t0}
    finally:
        gc.collect()


def main(argv=None) -> int:
    import open_clip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/open_clip_coverage.md", help="markdown table to write")
    ap.add_argument("--only", default="", help="substring filter on names")
    ap.add_argument("--attempt-unsupported", action="store_true",
                    help="also run the names memprof.model_sources.open_clip.UNSUPPORTED rejects, to see what they "
                         "trip on now")
    args = ap.parse_args(argv)
    if args.attempt_unsupported:
        import memprof.model_sources.open_clip

        memprof.model_sources.open_clip.UNSUPPORTED.clear()
    names = [n for n in open_clip.list_models() if args.only in n]
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        r = run_one(name)
        rows.append(r)
        tail = (f"{r['peak_allocated_bytes'] / 2**20:.0f} MiB" if r["result"] != "fail"
                else f"{r['exc']}: {r['msg'][:80]} @ {r['at']}")
        print(f"[{i + 1}/{len(names)}] {name}: {r['result']} {tail} ({r['s']:.1f} s)", flush=True)
    wall = time.perf_counter() - t0
    ok = sum(r["result"] != "fail" for r in rows)
    with open(args.out, "w") as fh:
        fh.write(f"# open_clip coverage of the simulation (predicted, AdamW, batch 1)\n\n"
                 f"{ok}/{len(rows)} names predict ({100 * ok / max(1, len(rows)):.1f}%), sweep wall time "
                 f"{wall:.0f} s\n\n| name | result | predicted peak allocated MiB / failure | where | s |\n"
                 f"|---|---|---|---|---|\n")
        for r in rows:
            if r["result"] == "fail":
                fh.write(f"| {r['name']} | {r['exc']} | {r['msg'].replace('|', '/')} | {r['at']} | {r['s']:.1f} |\n")
            else:
                fh.write(f"| {r['name']} | {r['result']} | {r['peak_allocated_bytes'] / 2**20:.1f} | | {r['s']:.1f} |\n")
    print(f"ok {ok}/{len(rows)} ({100 * ok / max(1, len(rows)):.1f}%), wall {wall:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
