"""Wall time and peak host memory of the field's training entry points through `memprof script`, beside the
`memprof run` of the same model and setup: paired, alternating runs, each in a fresh process (process start
included), the median of each and the median of the paired ratios (script / run of the same pair), which a
load that changes between pairs moves less than the ratio of the medians.

    python benchmarks/client_times.py [--runs 3] [--only hf,lightning,accelerate,open-clip] [--timm TRAIN_PY]
                                      [--torchvision TRAIN_PY] [--json out.json] [--max-ratio 1.5] [--max-rss-gib 1.5]

Each client runs as in tests/test_clients.py on tiny synthetic data, stopped after memprof run's two optimizer steps
(`--steps 2`: the same training the run predicts), and once more to its end (a whole short epoch with evaluation
and a checkpoint), timed once. timm's train.py and torchvision's reference script are not in a wheel: give their
paths (--timm, --torchvision; fetched, never committed) to time them too. With --max-ratio / --max-rss-gib the
benchmark exits 1 when a client's median paired ratio is past that bound, or its largest process past that bound.
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

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS_DIR = os.path.join(HERE, "..", "tests", "data", "clients")
GIB = 1 << 30
A100 = ["--budget", "a100-80g"]


def _csv(folder: str) -> str:
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(8):
        path = os.path.join(folder, f"{i}.png")
        Image.new("RGB", (64, 64), (i * 30, 0, 0)).save(path)
        rows.append(f"{path}\ta photo of thing {i}")
    with open(os.path.join(folder, "data.csv"), "w") as fh:
        fh.write("\n".join(rows) + "\n")
    return os.path.join(folder, "data.csv")


def _image_folder(folder: str, splits=("train", "val", "validation")) -> str:
    from PIL import Image

    for split in splits:
        for c in range(5):
            os.makedirs(os.path.join(folder, split, f"c{c}"), exist_ok=True)
            for i in range(8):
                Image.new("RGB", (64, 64), (c * 40, i * 20, 0)).save(os.path.join(folder, split, f"c{c}", f"{i}.png"))
    return folder


def clients(data: str, timm_train: str | None, tv_train: str | None) -> dict:
    """name -> (the script command's arguments, the equivalent run's)."""
    out = {
        "hf": (["script", *A100, os.path.join(CLIENTS_DIR, "hf_trainer.py"), "--out", os.path.join(data, "hf")],
               ["run", *A100, "--models", "py:hf_models:vit", "--optims", "adamw", "--precision", "bf16-amp",
                "--batch-size", "2", "--num-classes", "5", "--optim-impl", "fused", "--input-shape", "3x224x224"]),
        "lightning": (["script", *A100, os.path.join(CLIENTS_DIR, "lightning_module.py"), "--out",
                       os.path.join(data, "lit")],
                      ["run", *A100, "--models", "torchvision:vit_b_16", "--optims", "adamw", "--precision", "bf16-amp",
                       "--batch-size", "2", "--num-classes", "5", "--clear-grads", "before-backward"]),
        "accelerate": (["script", *A100, os.path.join(CLIENTS_DIR, "accelerate_loop.py"), "--out",
                        os.path.join(data, "acc")],
                       ["run", *A100, "--models", "timm:vit_base_patch16_224", "--optims", "adamw", "--precision",
                        "bf16-amp", "--batch-size", "2", "--num-classes", "5"]),
        "open-clip": (["script", *A100, "-m", "open_clip_train.main", "--train-data", _csv(data), "--val-data",
                       os.path.join(data, "data.csv"), "--dataset-type", "csv", "--model", "ViT-B-16", "--batch-size",
                       "2", "--epochs", "1", "--workers", "0", "--precision", "amp_bf16", "--logs",
                       os.path.join(data, "logs"), "--save-frequency", "1"],
                      ["run", *A100, "--models", "vit-b-16", "--optims", "adamw", "--precision", "bf16-amp",
                       "--batch-size", "2"]),
    }
    if timm_train:
        out["timm"] = (["script", *A100, timm_train, _image_folder(os.path.join(data, "img")), "--model",
                        "vit_base_patch16_224", "--amp", "--opt", "adamw", "--amp-dtype", "bfloat16",
                        "--grad-checkpointing", "-b", "2", "--epochs", "1", "--num-classes", "5", "--workers", "0",
                        "--output", os.path.join(data, "timm")],
                       ["run", *A100, "--models", "timm:vit_base_patch16_224", "--optims", "adamw", "--precision",
                        "bf16-amp", "--grad-ckpt", "on", "--batch-size", "2", "--num-classes", "5"])
    if tv_train:
        out["torchvision"] = (["script", *A100, tv_train, "--data-path", _image_folder(os.path.join(data, "img")),
                               "--model", "vit_b_16", "--epochs", "1", "-b", "4", "--workers", "0", "--output-dir",
                               os.path.join(data, "tv"), "--amp"],
                              ["run", *A100, "--models", "torchvision:vit_b_16", "--optims", "sgd", "--precision",
                               "fp16-amp", "--batch-size", "4", "--num-classes", "5", "--clear-grads",
                               "before-backward"])
    return out


def run_once(args: list[str], cwd: str) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the largest process) of one fresh `memprof ARGS`."""
    with tempfile.TemporaryDirectory() as out:
        if args[0] == "run":
            args = [*args, "--backend", "simulate", "--no-progress", "--out", os.path.join(out, "o")]
        start = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "memprof", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=cwd,
                             env={**os.environ, "PYTHONPATH": CLIENTS_DIR, "HF_HUB_OFFLINE": "1"})
        stderr = p.stderr.read()
        p.stderr.close()
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"memprof {' '.join(args)} failed: {stderr[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def _with_steps(args: list[str]) -> list[str]:
    return [args[0], "--steps", "2", *args[1:]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default=None)
    p.add_argument("--timm", help="timm's train.py (fetched)")
    p.add_argument("--torchvision", help="torchvision's references/classification/train.py (fetched)")
    p.add_argument("--json")
    p.add_argument("--max-ratio", type=float)
    p.add_argument("--max-rss-gib", type=float)
    a = p.parse_args()
    rows, failed = {}, []
    with tempfile.TemporaryDirectory() as data:
        table = clients(data, a.timm, a.torchvision)
        for name in (a.only.split(",") if a.only else table):
            script, run = table[name]
            pairs = [(run_once(_with_steps(script), data), run_once(run, data)) for _ in range(a.runs)]  # alternating
            s_times, r_times = [s[0] for s, _ in pairs], [r[0] for _, r in pairs]
            full, full_rss = run_once(script, data)
            rss = max(max(s[1] for s, _ in pairs), full_rss)
            pair_ratios = [s / r for s, r in zip(s_times, r_times)]
            ratio = statistics.median(pair_ratios)
            rows[name] = {"script_median_s": round(statistics.median(s_times), 2),
                          "run_median_s": round(statistics.median(r_times), 2), "ratio": round(ratio, 2),
                          "pair_ratios": [round(x, 2) for x in pair_ratios],
                          "full_epoch_s": round(full, 2), "peak_rss_gib": round(rss / GIB, 2), "runs": a.runs}
            print(f"{name:12s} script (--steps 2) {rows[name]['script_median_s']:6.2f} s, run "
                  f"{rows[name]['run_median_s']:6.2f} s, median paired ratio {ratio:.2f} (pairs {rows[name]['pair_ratios']}); "
                  f"whole epoch {full:.2f} s; peak RSS {rss / GIB:.2f} GiB", flush=True)
            if (a.max_ratio and ratio > a.max_ratio) or (a.max_rss_gib and rss > a.max_rss_gib * GIB):
                failed.append(name)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"cpu_count": os.cpu_count(), "results": rows}, fh, indent=2)
    if failed:
        print(f"past the bounds: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
