"""The GPU check: measure, on a lent GPU, what the simulation predicts for it, and grade the predictions.

Usage (scripts/gpu_check.sh installs the carried wheels and calls this):
    python scripts/gpu_check.py                 # on the GPU machine: measure, grade, write $OUT
    python scripts/gpu_check.py --plan          # the stage list and its planned device time, then exit
    python scripts/gpu_check.py --predict DIR   # here: the predictions the check carries (DIR/results.jsonl)

Stages run in order of value: the half-precision scripts (validation/raschka_vit_precision.py, ViT-B/16 bf16-true,
bf16-mixed, measured with `memprof script --backend cuda` beside their predictions, then scripts/conv_probe.py: the
cuDNN workspaces of their patch embedding, the one allocation on their path whose size only the device decides), a
canary configuration (a failure stops the run with its error), the paper
grid (with allocator snapshots), the training setups (bf16-amp, fused optimizer off/in backward), ViT-B/16
with checkpointing and at batch 32, the emulated 12 GB card (its out-of-memory pattern), DDP and FSDP at world
size 1, the NVML sampler's overhead, the GPU-marked tests, and bf16 with cuDNN attention left on. Each
configuration is measured by the cuda backend in a fresh process with a per-configuration time-out, with
cuDNN attention off (the simulation models the flash kernel; the last stage measures the difference). Before
a configuration starts, the overall deadline must leave room for its estimated time; once it does not, the
rest is skipped and said.

Work happens in a scratch folder outside $OUT. After every stage, at most 7 plainly named files are rewritten
directly in $OUT (a tarball of the scratch folder written under a temporary name and renamed, the log, the
three fidelity tables, the measured Table 4, every measured record), so a kill at any point returns all
finished stages. Without $OUT everything goes to reports/gpu/<device>/.

The predictions are computed ahead (`--predict`, under the device's torch version) and carried in
reports/gpu/predicted/; the check uses them when their torch, open_clip and timm versions and the card
match the device's, and otherwise predicts again at the end, after measuring. Without a GPU the check
rehearses itself (`--dry-run`, implied): test-vit in place of the paper models, the cpu backend in place
of cuda, no NCCL stage, no sampler stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEADLINE_S = 480.0  # the whole check, well inside one 10-minute device command
PER_CONFIG_TIMEOUT_S = 60.0
GPU_TESTS_TIMEOUT_S = 120.0
PREDICTED_DIR = os.path.join(ROOT, "reports", "gpu", "predicted")
EMULATED = "12GiB@9.0"  # the paper's 12 GB card, emulated on the GPU (capped allocator), with the GPU's sm90 rules
SDPA_OFF = "cudnn"  # measured and predicted with cuDNN attention off (flash), except in the cudnn-attention stage
MAX_TARBALL_BYTES = 15 << 20  # the device tool returns files of at most 16 MiB
OUT_FILES = ("gpu_check.tar.gz", "gpu_check.log", "fidelity.md", "fidelity-12g.md", "fidelity-dist.md",
             "fidelity-cudnn.md", "table4-measured.md", "results-cuda.jsonl")
CUDNN = "cudnn"  # the fidelity table of the stage measured with cuDNN attention on; its predictions are kept apart
# (PREDICTED_DIR/cudnn: their keys are the setups stage's, made with cuDNN attention off)
# estimated seconds per measured configuration on an H200 (fresh process: imports, CUDA context, build, steps);
# estimates until the first run measures them, bounded by PER_CONFIG_TIMEOUT_S and the deadline
ESTIMATE_S = {"vit-b-16": 7.0, "vit-l-14": 8.0, "vit-h-14": 10.0, "test-vit": 2.0}
FIXED_S = 20.0  # start-up, wheels, reports and tarballs
KILL_AFTER_ENV = "MEMPROF_GPU_CHECK_KILL_AFTER"  # tests: SIGKILL the check once this stage's files are out
# ordinary training scripts (memprof script): measured for real (--backend cuda) and graded against their
# predictions for the card, in the main fidelity table
SCRIPTS = (("tests/data/scripts/registry_twin.py", "--model", "vit-b-16", "--batch-size", "8"),
           ("tests/data/scripts/train_small.py", "--amp", "bf16", "--batch-size", "32"))
# first of all: the half-precision cases, where the predictions of reserved memory come in low against a public
# measurement (benchmarks/validation.py: Raschka's ViT-finetuning-scripts, -4.8% bf16-mixed, -7.7% bf16-true at
# ViT-B/16 batch 16), measured beside their predictions so the first lent minutes answer where the gap is (the fp32
# control, -2.2%, is the paper grid's business). Each ends with validation batches in eval mode, as the original's
# epochs do.
HALF_SCRIPTS = tuple(("validation/raschka_vit_precision.py", "--model", "vit_b_16", "--precision", precision,
                      "--batch-size", "16", "--eval-batches", "2") for precision in ("bf16-true", "bf16-mixed"))
SCRIPTS_OUT = "cuda-scripts"
SCRIPT_ESTIMATE_S = 12.0
# after the half-precision scripts, in the same stage: what cuDNN's convolution holds while it runs (forward and weight
# gradient of the ViT patch embedding, bf16/fp16/fp32, as those scripts run it): docs/reserved-half-precision.md says
# how it and the scripts' per-phase peaks decide where the gap is. One bare process (torch, a CUDA context, twelve
# convolutions), no model, no memprof.
CONV_PROBE = "scripts/conv_probe.py"
CONV_PROBE_OUT = "conv-probe.json"
CONV_PROBE_ESTIMATE_S = 3.0


@dataclass(frozen=True)
class Grid:
    """One `memprof run` grid measured in a stage: its options, the scratch folder its records go to, and the
    fidelity table (main, 12g, dist, cudnn) that grades it against the predictions for `budget`, and the
    environment both the measurement and the prediction run under (on top of MEMPROF_CUDA_SDPA_DISABLE=SDPA_OFF)."""
    options: dict
    out: str
    fidelity: str = "main"
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    grids: tuple = ()
    command: str | None = None  # a stage that runs a command instead (the GPU-marked tests)
    canary: bool = False
    gpu_only: bool = False  # skipped by the dry run (NCCL, NVML)


STAGES = (
    Stage("half-precision", command="half-scripts", gpu_only=True),
    Stage("canary", (Grid({"models": "vit-b-16", "optims": "adamw"}, "cuda"),), canary=True),
    Stage("paper", (Grid({"models": "paper", "optims": "paper", "snapshot": True}, "cuda"),)),
    Stage("setups", (Grid({"models": "paper", "optims": "adamw", "precision": "bf16-amp"}, "cuda"),
                     Grid({"models": "paper", "optims": "adamw", "optim_impl": "fused",
                           "optim_in_backward": "off,on"}, "cuda"))),
    Stage("vit-b-16", (Grid({"models": "vit-b-16", "optims": "paper", "grad_ckpt": "on"}, "cuda"),
                       Grid({"models": "vit-b-16", "optims": "adamw,sgd-fe-nomom", "grad_ckpt": "off,on",
                             "batch_size": "32"}, "cuda"),
                       Grid({"models": "vit-b-16", "optims": "adamw", "precision": "bf16-amp", "batch_size": "32"},
                            "cuda"))),
    Stage("emulated-12g", (Grid({"models": "vit-h-14", "optims": "paper", "budget": EMULATED}, "cuda-12g", "12g"),)),
    Stage("ddp-fsdp", (Grid({"models": "vit-b-16", "optims": "adamw,sgd", "parallel": "ddp,fsdp", "world_size": 1},
                            "cuda-dist", "dist"),), gpu_only=True),
    Stage("scripts", command="scripts", gpu_only=True),
    Stage("nvml-overhead", (Grid({"models": "vit-b-16", "optims": "sgd", "steps": 12, "nvml_period_ms": 5.0},
                                 "overhead-nvml-5", "none"),
                            Grid({"models": "vit-b-16", "optims": "sgd", "steps": 12, "nvml_period_ms": 0.0},
                                 "overhead-nvml-0", "none")), gpu_only=True),
    Stage("gpu-tests", command="pytest"),
    Stage("cudnn-attention", (Grid({"models": "paper", "optims": "adamw", "precision": "bf16-amp"}, "cuda-cudnn",
                                   CUDNN, env={"MEMPROF_CUDA_SDPA_DISABLE": ""}),)),
)


SCRIPT_STAGES = {"half-scripts": HALF_SCRIPTS, "scripts": SCRIPTS}  # a stage's command -> the scripts it measures


class Log:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def tiny(options: dict) -> dict:
    """A grid's options for the dry run: test-vit in place of every model, batch 32 kept small."""
    out = dict(options, models="test-vit")
    if out.get("batch_size") == "32":
        out["batch_size"] = "4"
    return out


def card() -> tuple[str, str]:
    """(device name for folders, budget string the predictions are for) of this machine's GPU, from NVML (this
    process makes no CUDA context on the card its workers measure); an H200's for the dry run."""
    from memprof.backends.nvml import device_facts

    facts = device_facts()
    if facts is None or facts.compute_capability is None:
        import torch

        if not torch.cuda.is_available():
            return "no-gpu", "143771MiB@9.0"
        p = torch.cuda.get_device_properties(0)
        return p.name.replace(" ", "-"), f"{p.total_memory >> 20}MiB@{p.major}.{p.minor}"
    major, minor = facts.compute_capability
    return facts.name.replace(" ", "-"), f"{facts.total_bytes >> 20}MiB@{major}.{minor}"


def entries_of(grid: Grid, budget: str, dry: bool):
    """The grid's entries as `memprof run --backend simulate` plans them for `budget` (the grid's own card where it
    names one), its options validated the same way."""
    from memprof.plan import plan_run, run_options

    opts = tiny(grid.options) if dry else dict(grid.options)
    opts.pop("snapshot", None)
    opts.pop("nvml_period_ms", None)
    opts["budget"] = grid.options.get("budget", budget)
    with tempfile.TemporaryDirectory() as tmp:
        return plan_run(run_options(**opts, backend="simulate", out=tmp, progress=False)).entries


def estimate_s(spec) -> float:
    return ESTIMATE_S.get(spec.model, 10.0) + (0.2 * (spec.steps - 2))


def plan(dry: bool = False, stages=STAGES) -> list[dict]:
    """Per stage: the configurations it measures and their estimated device seconds (skipped entries cost none)."""
    out, seen = [], set()
    for stage in stages:
        if dry and stage.gpu_only:
            continue
        if stage.command in SCRIPT_STAGES:
            n = len(SCRIPT_STAGES[stage.command])
            probe = CONV_PROBE_ESTIMATE_S if stage.command == "half-scripts" else 0.0
            out.append({"stage": stage.name, "configs": n, "estimate_s": SCRIPT_ESTIMATE_S * n + probe})
            continue
        if stage.command:
            out.append({"stage": stage.name, "configs": 0, "estimate_s": GPU_TESTS_TIMEOUT_S / 2})
            continue
        specs = []
        for g in stage.grids:  # a configuration an earlier stage measured into the same folder is not run again
            for e in entries_of(g, "143771MiB@9.0", dry):
                if not e.skip_reason and (g.out, e.spec.key) not in seen:
                    seen.add((g.out, e.spec.key))
                    specs.append(e.spec)
        out.append({"stage": stage.name, "configs": len(specs), "estimate_s": round(sum(map(estimate_s, specs)), 1)})
    return out


def planned_s(rows: list[dict]) -> float:
    return FIXED_S + sum(r["estimate_s"] for r in rows)


# --- predictions ----------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata

    def base(dist):
        try:
            return metadata.version(dist).split("+")[0]
        except metadata.PackageNotFoundError:
            return None

    return {d: base(d) for d in ("torch", "open_clip_torch", "timm")}


def predict_all(out_dir: str, budget: str, dry: bool, skip: set = frozenset()) -> list[dict]:
    """Every configuration the check measures, predicted for `budget` (the emulated stage for its card)."""
    from memprof.executors.runner import run_grid

    os.makedirs(out_dir, exist_ok=True)
    for stage in STAGES:
        for grid in stage.grids:
            if grid.fidelity == "none" or (dry and stage.gpu_only) or stage.name in skip:
                continue
            with sdpa_environment(grid):
                run_grid(entries_of(grid, budget, dry), os.path.join(out_dir, CUDNN) if grid.fidelity == CUDNN
                         else out_dir, "simulate", progress=False, jobs=1)
    if not dry and "scripts" not in skip:
        from memprof.results import append
        from memprof.script.runner import run_script

        from memprof.harness import sdpa_kernels

        with sdpa_environment(Grid({}, SCRIPTS_OUT, env={"MEMPROF_CUDA_SDPA_DISABLE": ""})):
            sdpa_kernels()  # a script runs with torch's default kernels, as `memprof script --backend cuda` measures it
            for path, *args in (*HALF_SCRIPTS, *SCRIPTS):
                append(os.path.join(out_dir, "results.jsonl"),
                       run_script(os.path.join(ROOT, path), args, budget=budget).record)
    return read_predictions(out_dir)


def read_predictions(folder: str) -> list[dict]:
    """The records of `folder`, and those of its cudnn subfolder marked `fidelity_group` "cudnn" (in memory only)."""
    from memprof.results import read_records

    records = read_records(folder)
    if os.path.exists(os.path.join(folder, CUDNN, "results.jsonl")):
        records += [{**r, "fidelity_group": CUDNN} for r in read_records(os.path.join(folder, CUDNN))]
    return records


def sdpa_environment(grid: Grid):
    """The attention kernels `grid` runs with: cuDNN attention off (SDPA_OFF) unless its env says otherwise. The
    measuring and the predicting backends both read MEMPROF_CUDA_SDPA_DISABLE where they run (memprof.harness.
    sdpa_kernels), in this process or a worker it starts."""
    return mock.patch.dict(os.environ, {"MEMPROF_CUDA_SDPA_DISABLE": SDPA_OFF, **grid.env})


ENGINE_DIGEST_FILE = "engine.sha256"  # beside the carried results: the engine that made them


def engine_digest() -> str:
    """A SHA-256 over the source of everything a prediction depends on (the engine, the models and their sources,
    optimizers, harness, budgets, specs, the script runner): carried predictions made by other code do not serve."""
    import hashlib

    digest = hashlib.sha256()
    package = os.path.join(ROOT, "memprof")
    paths = [os.path.join(package, name) for name in ("budget.py", "harness.py", "models.py", "optims.py", "spec.py",
                                                     "vocabulary.py")]
    for folder in ("model_sources", "simulation", "script"):
        paths += sorted(os.path.join(package, folder, n) for n in os.listdir(os.path.join(package, folder))
                        if n.endswith(".py"))
    for path in paths:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()


def carried_predictions(budget: str, dry: bool) -> tuple[list[dict] | None, str]:
    """The carried predictions and why they serve, or None and why not (then the check predicts again)."""

    if dry:
        return None, "dry run: predicted afresh for test-vit"
    try:
        records = read_predictions(PREDICTED_DIR)
        with open(os.path.join(PREDICTED_DIR, ENGINE_DIGEST_FILE), encoding="ascii") as fh:
            made_by = fh.read().strip()
    except Exception as exc:  # missing or unreadable: predict again
        return None, f"no carried predictions ({exc})"
    if made_by != engine_digest():
        return None, "carried predictions were made by another version of the engine: predicting again"
    made = {k: records[0]["environment"].get(k) for k in ("torch", "open_clip_torch", "timm")}
    made = {k: v.split("+")[0] if v else v for k, v in made.items()}
    here = versions()
    if made != here:
        return None, f"carried predictions were made under {made}, this machine has {here}"
    carried = next((b for b in {r["spec"]["budget"] for r in records} if same_card(b, budget)), None)
    if carried is None:
        return None, f"carried predictions are for other cards than this GPU ({budget})"
    records = [r for r in records if r["spec"]["budget"] != carried] + [
        {**r, "spec": {**r["spec"], "budget": budget}} for r in records if r["spec"]["budget"] == carried]
    return records, f"carried predictions made under {made} for {carried}: {len(records)} records"


def same_card(a: str, b: str) -> bool:
    """Two budgets of one card: the same compute capability, sizes within 1% (NVML and the CUDA runtime may
    report a few MiB apart); below the card's size no peak depends on it, only the verdicts."""
    from memprof.budget import parse_budget
    from memprof.errors import UsageError

    try:
        x, y = parse_budget(a), parse_budget(b)
    except UsageError:
        return False
    return x.compute_capability == y.compute_capability and abs(x.total_bytes - y.total_bytes) <= 0.01 * y.total_bytes


# --- outputs --------------------------------------------------------------------------------------------

def records_in(scratch: str, sub: str) -> list[dict]:
    from memprof.results import read_records

    path = os.path.join(scratch, sub)
    return read_records(path) if os.path.exists(os.path.join(path, "results.jsonl")) else []


def write_outputs(scratch: str, out: str | None, predicted: list[dict] | None, budget: str, log: Log) -> None:
    """The fidelity tables, the measured Table 4 and every measured record in the scratch folder, then the
    8 files in $OUT (each written under a temporary name, then renamed)."""
    from memprof.reports.fidelity import render_fidelity
    from memprof.reports.table4 import default_metric, render_markdown

    grids = {g.out: g for s in STAGES for g in s.grids}
    grids[SCRIPTS_OUT] = Grid({}, SCRIPTS_OUT)  # the scripts' measured records, graded with the main table
    measured = {sub: records_in(scratch, sub) for sub in grids}
    files = {"results-cuda.jsonl": "".join(json.dumps(r, sort_keys=True) + "\n"
                                           for sub in grids for r in measured[sub])}
    for name, group, want in (("fidelity.md", "main", budget), ("fidelity-12g.md", "12g", EMULATED),
                              ("fidelity-dist.md", "dist", budget), ("fidelity-cudnn.md", CUDNN, budget)):
        got = [r for sub, g in grids.items() if g.fidelity == group for r in measured[sub]]
        preds = [r for r in predicted or [] if r["spec"]["budget"] == want
                 and (r.get("fidelity_group") == CUDNN) == (group == CUDNN)
                 and (r["spec"].get("parallel", "none") != "none") == (group == "dist")]
        if not got:
            files[name] = f"# {name}: not measured yet\n"
        elif predicted is None:
            files[name] = "# predictions still to be made (see gpu_check.log)\n"
        else:
            files[name] = render_fidelity(got, preds) + (
                "\nMeasured and predicted with cuDNN attention on (the kernel torch prefers on sm90/sm100 with cuDNN > "
                "9.15: the prediction's workspace estimate is in its upper band).\n" if group == CUDNN else
                "\nMeasured and predicted with cuDNN attention off (MEMPROF_CUDA_SDPA_DISABLE=cudnn): flash attention.\n")
    paper = [r for r in measured["cuda"] if r["spec"]["precision"] == "fp32" and r["spec"]["batch_size"] == 1
             and r["spec"]["optim_impl"] == "foreach" and not r["spec"]["optim_in_backward"]
             and not r["spec"]["grad_ckpt"]]
    files["table4-measured.md"] = render_markdown(paper, default_metric(paper)) if paper else "# not measured yet\n"
    for name, text in files.items():
        with open(os.path.join(scratch, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    if out is None:
        return
    tarball = os.path.join(scratch, "gpu_check.tar.gz")
    _tar(scratch, tarball, with_snapshots=True)
    if os.path.getsize(tarball) > MAX_TARBALL_BYTES:
        log(f"tarball {os.path.getsize(tarball) >> 20} MiB with snapshots: written without them")
        _tar(scratch, tarball, with_snapshots=False)
    for name in OUT_FILES:
        src = os.path.join(scratch, name)
        if os.path.exists(src):
            tmp = os.path.join(out, f".{name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(out, name))


def _tar(scratch: str, path: str, with_snapshots: bool) -> None:
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(scratch)):
            if name.startswith("gpu_check.tar.gz") or (name == "snapshots" and not with_snapshots):
                continue
            tar.add(os.path.join(scratch, name), arcname=name)
    os.replace(tmp, path)


# --- measuring ------------------------------------------------------------------------------------------

def measure_grid(grid: Grid, scratch: str, backend: str, dry: bool, deadline: float, log: Log) -> tuple[int, str]:
    """Each entry of `grid` measured in turn (a fresh process each, on cuda), unless the deadline leaves no
    room for it; returns (configurations measured, why it stopped or "")."""
    from memprof.executors.runner import run_grid
    from memprof.plan import plan_run, run_options
    from memprof.results import RunDirectory

    opts = tiny(grid.options) if dry else dict(grid.options)
    out_dir = os.path.join(scratch, grid.out)
    snapshot = opts.pop("snapshot", False)
    if snapshot and not dry:
        opts["snapshot"] = os.path.join(scratch, "snapshots")
    if dry:
        opts.pop("nvml_period_ms", None)
    opts.setdefault("budget", "device")
    with sdpa_environment(grid):
        planned = plan_run(run_options(**opts, backend=backend, out=out_dir, resume=True, progress=False,
                                       timeout_s=PER_CONFIG_TIMEOUT_S))
        done = 0
        # the rehearsal (cpu backend) measures a grid in one worker; on a GPU each entry is checked against the
        # deadline before its fresh process starts
        batches = [planned.entries] if dry else [[e] for e in planned.entries]
        for batch in batches:
            todo = [e for e in batch if not e.skip_reason]
            if todo and deadline - time.monotonic() < sum(estimate_s(e.spec) for e in todo):
                return done, f"deadline: no room for {todo[0].spec.key} (about {estimate_s(todo[0].spec):.0f} s)"
            with RunDirectory(out_dir):
                records = run_grid(batch, out_dir, planned.backend, progress=False, jobs=1,
                                   options=planned.worker_options, timeout_s=PER_CONFIG_TIMEOUT_S)
            for record in records:
                done += 1
                m = record["metrics"]
                peaks = " ".join(f"{k.removeprefix('peak_').removesuffix('_bytes')} {m[k]}" for k in
                                 ("peak_allocated_bytes", "peak_reserved_bytes", "peak_live_bytes") if k in m)
                log(f"  {record['key']}: {record['status']} " + (
                    f"{peaks} ({record['elapsed_s']} s)" if record["status"] in ("ok", "oom")
                    else str(record.get("error") or record.get("skip_reason"))))
                if record["status"] in ("error", "crashed"):
                    return done, f"{record['key']}: {record['status']}: {record['error']}"
        return done, ""


def run_scripts(scratch: str, budget: str, deadline: float, log: Log, scripts=None) -> str:
    """Each of `scripts` (SCRIPTS unless given) run for real on the GPU by `memprof script --backend cuda` (a fresh process, the
    per-configuration time-out), its record into the scratch folder; returns "" or what failed."""
    out, problems = os.path.join(scratch, SCRIPTS_OUT), []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    for path, *args in (SCRIPTS if scripts is None else scripts):
        if deadline - time.monotonic() < SCRIPT_ESTIMATE_S:
            return f"deadline: no room for {path}"
        cmd = [sys.executable, "-m", "memprof", "script", "--backend", "cuda", "--budget", budget, "--out", out,
               os.path.join(ROOT, path), *args]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PER_CONFIG_TIMEOUT_S)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            text, rc = f"timed out after {PER_CONFIG_TIMEOUT_S:.0f} s", -1
        log(f"  {path} {' '.join(args)}: rc={rc}: " + " | ".join(text.strip().splitlines()[-3:]))
        if rc != 0:
            problems.append(f"{path}: rc={rc}")
    return "; ".join(problems)


def run_conv_probe(scratch: str, deadline: float, log: Log) -> str:
    """scripts/conv_probe.py in a fresh process (the per-configuration time-out), its JSON into the scratch folder
    (CONV_PROBE_OUT, in the tarball); logs the workspace each problem held. Returns "" or what failed."""
    if deadline - time.monotonic() < CONV_PROBE_ESTIMATE_S:
        return f"deadline: no room for {CONV_PROBE}"
    path = os.path.join(scratch, CONV_PROBE_OUT)
    cmd = [sys.executable, os.path.join(ROOT, CONV_PROBE), "--out", path]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PER_CONFIG_TIMEOUT_S)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        text, rc = f"timed out after {PER_CONFIG_TIMEOUT_S:.0f} s", -1
    if rc != 0:
        log(f"  {CONV_PROBE}: rc={rc}: " + " | ".join(text.strip().splitlines()[-3:]))
        return f"{CONV_PROBE}: rc={rc}"
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    log(f"  {CONV_PROBE}: torch {report['torch']}, cuDNN {report['cudnn']}, {report['device']}")
    for p in report["problems"]:
        log(f"    {p['model']} b{p['batch']} {p['dtype']}: " + (p["error"] if "error" in p else
            "forward {} / {} B, weight gradient {} / {} B held beyond the outputs (first call / cached plan)".format(
                p["forward_transient_bytes_call1"], p["forward_transient_bytes_call2"],
                p["wgrad_transient_bytes_call1"], p["wgrad_transient_bytes_call2"])))
    return ""


def run_gpu_tests(scratch: str, deadline: float, log: Log) -> str:
    """The GPU-marked tests, with this check's PYTHONPATH and a time-out; their output goes to the scratch
    folder. Returns "" or why they failed."""
    budget = min(GPU_TESTS_TIMEOUT_S, deadline - time.monotonic())
    if budget < 20:
        return "deadline: no room for the GPU-marked tests"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}\ntimed out after {budget:.0f} s", -1
    with open(os.path.join(scratch, "gpu-tests.txt"), "w", encoding="utf-8") as fh:
        fh.write(text if isinstance(text, str) else text.decode(errors="replace"))
    last = (text.strip().splitlines() or ["(no output)"])[-1]
    log(f"  pytest -m gpu: rc={rc}: {last}")
    return "" if rc in (0, 5) else f"GPU-marked tests failed (rc={rc}): {last}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the stages and their planned device time, then exit")
    ap.add_argument("--predict", metavar="DIR", help="write the predictions the check carries to DIR, then exit")
    ap.add_argument("--dry-run", action="store_true", help="rehearse without a GPU (implied when none is present)")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    ap.add_argument("--skip", default="", help="comma list of stages to leave out")
    ap.add_argument("--json", action="store_true", help="with --plan: as JSON")
    args = ap.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.deadline_s
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    device, budget = card()
    if args.plan:
        rows = plan(args.dry_run)  # the device's plan unless the rehearsal's is asked for
        total = planned_s(rows)
        if args.json:
            print(json.dumps({"stages": rows, "planned_s": total, "deadline_s": args.deadline_s}))
        else:
            for r in rows:
                print(f"{r['stage']:16} {r['configs']:3} configurations  ~{r['estimate_s']:.0f} s")
            print(f"planned: ~{total:.0f} s of a {args.deadline_s:.0f} s deadline (per configuration at most "
                  f"{PER_CONFIG_TIMEOUT_S:.0f} s)")
        return 0 if total <= args.deadline_s else 1
    if args.predict:
        records = predict_all(args.predict, budget, args.dry_run)  # the device's configurations, made here
        for folder in (args.predict, os.path.join(args.predict, CUDNN)):  # only the records travel
            shutil.rmtree(os.path.join(folder, "timelines"), ignore_errors=True)
        with open(os.path.join(args.predict, ENGINE_DIGEST_FILE), "w", encoding="ascii") as fh:
            fh.write(engine_digest() + "\n")
        print(f"predicted {len(records)} configurations for {budget} under {versions()} into {args.predict}")
        return 0

    out = os.environ.get("OUT") or None
    scratch = tempfile.mkdtemp(prefix="memprof-gpu-check-") if out else os.path.join(ROOT, "reports", "gpu", device)
    os.makedirs(scratch, exist_ok=True)
    log = Log(os.path.join(scratch, "gpu_check.log"))
    backend = "cpu" if dry else "cuda"
    os.environ["MEMPROF_CUDA_SDPA_DISABLE"] = SDPA_OFF
    log(f"device: {device} ({budget}); backend {backend}{' (dry run)' if dry else ''}; torch {torch.__version__}; "
        f"deadline {args.deadline_s:.0f} s; planned ~{planned_s(plan(dry)):.0f} s")
    predicted, why = carried_predictions(budget, dry)
    log(why)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    failures: list[str] = []
    canary_failed = False
    for stage in STAGES:
        if stage.name in skip or (dry and stage.gpu_only):
            log(f"stage {stage.name}: skipped" + (" (dry run)" if dry and stage.gpu_only else ""))
            continue
        t0 = time.monotonic()
        log(f"stage {stage.name}")
        if stage.command in SCRIPT_STAGES:
            problem = run_scripts(scratch, budget, deadline, log, SCRIPT_STAGES[stage.command])
            if stage.command == "half-scripts" and not problem.startswith("deadline"):
                probe_problem = run_conv_probe(scratch, deadline, log)
                problem = "; ".join(p for p in (problem, probe_problem) if p)
        elif stage.command:
            problem = run_gpu_tests(scratch, deadline, log)
        else:
            problem = ""
            for grid in stage.grids:
                _, problem = measure_grid(grid, scratch, backend, dry, deadline, log)
                if problem:
                    break
        log(f"stage {stage.name}: {'done' if not problem else problem} ({time.monotonic() - t0:.0f} s)")
        write_outputs(scratch, out, predicted, budget, log)
        if os.environ.get(KILL_AFTER_ENV) == stage.name:
            os.kill(os.getpid(), signal.SIGKILL)
        if problem.startswith("deadline"):
            break
        if problem:
            failures.append(f"{stage.name}: {problem}")
            if stage.canary:
                log(f"the canary failed, so nothing else runs: {problem}")
                canary_failed = True
                break
    if predicted is None and not canary_failed:
        if deadline - time.monotonic() > 30 or dry:
            log("predicting the configurations here (the carried predictions do not serve)")
            predicted = predict_all(os.path.join(scratch, "predicted"), budget, dry, skip)
        else:
            log("no time left to predict here: predict from the measured records' versions later")
    log(f"elapsed: {time.monotonic() - started:.0f} s; failures: {len(failures)}" +
        "".join(f"\n  {f}" for f in failures))
    write_outputs(scratch, out, predicted, budget, log)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
