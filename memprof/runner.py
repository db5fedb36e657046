"""Runs a grid of specs through a backend, one record per configuration, appended as each finishes.

`simulate` predicts in this process (or in `jobs` spawned workers); the measuring backends (`cpu`,
`cuda`) run each configuration in a fresh worker process (memprof.worker), one at a time. A
configuration that fails at run time is recorded with its error (status "error"), a worker that dies
(segfault, kill, timeout) as "crashed" with its exit code and last stderr lines, and an out-of-memory
verdict is a result (status "oom"); the rest go on. Bad input (UsageError) stops the run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from memprof.errors import UsageError
from memprof.results import RESULTS_FILE, append, environment, make_record
from memprof.spec import GridEntry, RunSpec

PREDICTED, MEASURED = "predicted", "measured"
STDERR_TAIL_LINES = 8


def device_name(backend: str) -> str:
    """What a backend runs on, named in the parent (a crashed or skipped configuration still says it)."""
    if backend == "simulate":
        return "cpu-simulated"
    if backend == "cuda":
        from memprof.cuda_backend import device_name as cuda_name

        return cuda_name()
    from memprof.cpu_backend import device_name as cpu_name

    return cpu_name()


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _timed_predict(spec, out_dir=None, snapshot_dir=None):
    from memprof.simulate import predict, writing_artifacts

    start = time.perf_counter()
    with writing_artifacts(out_dir, snapshot_dir):  # the timeline (and snapshot) files beside the results
        status, metrics = predict(spec)
    return status, metrics, time.perf_counter() - start


def run_isolated(spec: RunSpec, backend: str, options: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run one configuration in a fresh `python -m memprof.worker` process; a dead worker is a result."""
    with tempfile.TemporaryDirectory(prefix="memprof-") as tmp:
        request, result, stderr = (os.path.join(tmp, n) for n in ("request.json", "result.json", "stderr"))
        with open(request, "w", encoding="utf-8") as fh:
            json.dump({"spec": spec.to_dict(), "backend": backend, "options": options or {}}, fh)
        with open(stderr, "w", encoding="utf-8") as err:
            try:
                rc = subprocess.run([sys.executable, "-m", "memprof.worker", request, result],
                                    stdout=subprocess.DEVNULL, stderr=err, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = None
        if rc == 0 and os.path.exists(result):
            with open(result, encoding="utf-8") as fh:
                return json.load(fh)
        with open(stderr, encoding="utf-8", errors="replace") as fh:
            tail = [line.rstrip() for line in fh.readlines()[-STDERR_TAIL_LINES:]]
    how = (f"timed out after {timeout_s} s" if rc is None else
           f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}")
    return {"status": "crashed", "metrics": {"exit_code": rc}, "device": None,
            "error": f"worker {how}" + (": " + " | ".join(tail) if tail else "")}


def run_grid(entries: list[GridEntry], out_dir: str, backend: str = "simulate", progress: bool = True,
             jobs: int = 1, options: dict | None = None, timeout_s: float | None = None) -> list[dict]:
    """Run every entry; returns the records (in grid order), which are also appended to
    out_dir/results.jsonl as each configuration finishes."""
    path = os.path.join(out_dir, RESULTS_FILE)
    source = PREDICTED if backend == "simulate" else MEASURED
    env = environment(backend, device_name(backend))
    bar = tqdm(total=len(entries), desc="memprof", unit="config", file=sys.stderr, disable=None if progress else True,
               bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
    done: dict[int, dict] = {}
    snapshot_dir = (options or {}).get("snapshot_dir")  # simulate: predicted snapshots; timelines go to out_dir

    def finish(i: int, record: dict) -> None:
        append(path, record)
        done[i] = record
        bar.update()

    def predicted(i: int, call) -> None:
        """Record what call() -> (status, metrics, seconds) predicts for entry i; a failure is a result too."""
        bar.set_postfix_str(entries[i].spec.key)
        try:
            status, metrics, elapsed = call()
            finish(i, make_record(entries[i].spec, status, source, env, metrics, elapsed_s=elapsed))
        except UsageError:
            raise
        except Exception as exc:  # a failing configuration is a result; the grid goes on
            finish(i, make_record(entries[i].spec, "error", source, env, error=f"{type(exc).__name__}: {exc}"))

    todo = []
    for i, entry in enumerate(entries):
        if entry.skip_reason:
            finish(i, make_record(entry.spec, "skipped", source, env, skip_reason=entry.skip_reason))
        else:
            todo.append(i)
    if backend != "simulate":
        for i in todo:
            bar.set_postfix_str(entries[i].spec.key)
            start = time.perf_counter()
            out = run_isolated(entries[i].spec, backend, options, timeout_s)
            finish(i, make_record(entries[i].spec, out["status"], source, {**env, "device": out["device"] or env["device"]},
                                  out["metrics"], error=out["error"], elapsed_s=time.perf_counter() - start))
    elif jobs > 1 and len(todo) > 1:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_timed_predict, entries[i].spec, out_dir, snapshot_dir): i for i in todo}
            for fut in as_completed(futures):
                predicted(futures[fut], fut.result)
        except BaseException:  # Ctrl-C or bad input: stop at once; what finished is already on disk
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    else:
        for i in todo:
            predicted(i, lambda spec=entries[i].spec: _timed_predict(spec, out_dir, snapshot_dir))
    bar.close()
    return [done[i] for i in sorted(done)]
