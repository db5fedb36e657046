"""The model zoo, predicted: does every model predict, or say in one line why not, and is every op it runs audited?

    python benchmarks/zoo_sweep.py [--sources timm,torchvision,hf,open_clip] [--precisions fp32,bf16-amp]
                                   [--limit N] [--out reports/zoo/zoo.jsonl] [--budget h100-80g] [--batch-size 2]

Models: one of every timm family (timm.list_models() grouped by the module of its entrypoint: the family's first
model in timm's order), every torchvision classification model (torchvision.models.list_models(module=
torchvision.models)), the Hugging Face vision models that build from a config without the hub (ViT, DeiT, Swin,
ConvNeXt, DINOv2, CLIP and SigLIP vision towers: benchmarks/zoo_hf.py) and every open_clip architecture. Each is
predicted (memprof.simulation.simulate.prediction: fake tensors, no GPU) under each precision with AdamW at the
batch size, on the budget card; a model that cannot be predicted is refused with the one line memprof gives (or,
for an unexpected failure, its exception's first line, marked `error`). Every aten op that allocated in its trace
is matched against the audit (memprof.simulation.audit): those no row names and the OpInfo scan did not find alike
are listed as unaudited. Prints counts, wall time and the peak resident set of this process; one JSON line per
(model, precision) goes to --out. A benchmark, not a test: tests/test_zoo_sample.py keeps a small sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

HF_MODELS = ("vit", "deit", "swin", "convnext", "dinov2", "clip_vision", "siglip_vision")


def timm_families() -> list[str]:
    import timm

    first: dict[str, str] = {}
    for name in timm.list_models():
        module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        first.setdefault(module, name)
    return [f"timm:{n}" for n in first.values()]


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def hf_models() -> list[str]:
    return [f"py:zoo_hf:{n}" for n in HF_MODELS]


def open_clip_models() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


SOURCES = {"timm": timm_families, "torchvision": torchvision_models, "hf": hf_models, "open_clip": open_clip_models}


def one(model: str, precision: str, budget: str, batch_size: int) -> dict:
    from memprof.errors import UsageError
    from memprof.simulation.audit import unaudited
    from memprof.simulation.memo import MEMO
    from memprof.simulation.simulate import prediction
    from memprof.simulation.tracing import UntraceableModel
    from memprof.spec import RunSpec

    spec = RunSpec(model=model, optim="adamw", batch_size=batch_size, precision=precision, budget=budget)
    start = time.perf_counter()
    row = {"model": model, "precision": precision}
    try:
        p = prediction(spec)
    except (UsageError, UntraceableModel) as exc:
        row.update(status="refused", why=str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - the sweep reports every failure and goes on
        row.update(status="error", why=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    else:
        ops = set(p.trace.origin.values())
        row.update(status=p.status, peak_allocated_bytes=p.metrics["peak_allocated_bytes"],
                   peak_reserved_bytes=p.metrics["peak_reserved_bytes"], params=p.metrics.get("params_total"),
                   ops=sorted(o for o in ops if o.startswith("aten.")), unaudited=unaudited(ops),
                   cuda_branches=p.metrics.get("cuda_branches", {}), notes=p.metrics.get("notes", []))
    finally:
        MEMO.clear()
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default="timm,torchvision,hf,open_clip")
    parser.add_argument("--precisions", default="fp32,bf16-amp")
    parser.add_argument("--limit", type=int, default=None, help="at most this many models per source")
    parser.add_argument("--models", default=None, help="a comma-separated list instead of the sources")
    parser.add_argument("--budget", default="h100-80g")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "zoo", "zoo.jsonl"))
    parser.add_argument("--summary", action="store_true", help="print the summary of --out and run nothing")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.out, encoding="utf-8") as fh:
            print(summary([json.loads(line) for line in fh]))
        return 0
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    if args.models:
        models = args.models.split(",")
    else:
        models = []
        for source in args.sources.split(","):
            if source not in SOURCES:
                print(f"unknown source '{source}': choose from {', '.join(SOURCES)}", file=sys.stderr)
                return 2
            models += SOURCES[source]()[:args.limit]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    done = set()
    if os.path.exists(args.out):  # resume: a line per (model, precision) already written
        with open(args.out, encoding="utf-8") as fh:
            done = {(r["model"], r["precision"]) for r in map(json.loads, fh)}
    rows = []
    with open(args.out, "a", encoding="utf-8") as fh:
        for model in models:
            for precision in args.precisions.split(","):
                if (model, precision) in done:
                    continue
                row = one(model, precision, args.budget, args.batch_size)
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"{row['status']:8s} {row['seconds']:7.1f}s {model} {precision} "
                      f"{row.get('why', '')}{' unaudited: ' + ','.join(row['unaudited']) if row.get('unaudited') else ''}",
                      flush=True)
    with open(args.out, encoding="utf-8") as fh:
        everything = [json.loads(line) for line in fh]
    print(summary(everything, time.perf_counter() - start))
    return 0


def source_of(model: str) -> str:
    """timm / torchvision / hf / open_clip, from the model's name as the sweep writes it."""
    if model.startswith("py:zoo_hf:"):
        return "hf"
    prefix = model.split(":", 1)[0]
    return prefix if prefix in ("timm", "torchvision") else "open_clip"


def summary(rows: list[dict], wall_s: float | None = None) -> str:
    """Counts (all, and per source), seconds summed over predictions, the ops no audit row covers (matched now,
    against the audit as it stands, from each record's ops) and each refusal's or error's line."""
    from memprof.simulation.audit import unaudited as unaudited_of

    by = {}
    for r in rows:
        by.setdefault(r["status"], []).append(r)
    ops = sorted({op for r in rows for op in r.get("ops", [])})
    unaudited = unaudited_of(ops)
    models = {r["model"] for r in rows}
    lines = [f"{len(models)} models x precisions = {len(rows)} predictions: "
             + ", ".join(f"{k} {len(v)}" for k, v in sorted(by.items()))]
    for source in SOURCES:
        mine = [r for r in rows if source_of(r["model"]) == source]
        counts = {}
        for r in mine:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines.append(f"  {source}: {len({r['model'] for r in mine})} models, {len(mine)} predictions: "
                     + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    lines.append(f"sum of per-prediction wall times {sum(r.get('seconds', 0) for r in rows):.0f} s")
    if wall_s is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        lines.append(f"wall {wall_s:.0f} s this run; peak resident set {rss / 2**30:.2f} GiB")
    lines.append(f"{len(ops)} distinct aten ops allocated in the traces; unaudited: {', '.join(unaudited) or 'none'}")
    reasons = {}
    for r in by.get("refused", []) + by.get("error", []):
        reasons.setdefault(r["why"][:120], []).append(r["model"])
    for why, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(names):3d} x {why}  (e.g. {names[0]})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
