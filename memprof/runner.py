"""Runs a grid of specs through a backend, one record per configuration, appended as each finishes.

A configuration that fails at run time is recorded with its error (status "error") and the rest go on;
an out-of-memory verdict is a result (status "oom"). Bad input (memprof.errors.UsageError) stops the run.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from memprof.errors import UsageError
from memprof.results import RESULTS_FILE, append, environment, make_record
from memprof.spec import GridEntry

PREDICTED = "predicted"


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _timed_predict(spec):
    from memprof.simulate import predict

    start = time.perf_counter()
    status, metrics = predict(spec)
    return status, metrics, time.perf_counter() - start


def run_grid(entries: list[GridEntry], out_dir: str, progress: bool = True, jobs: int = 1) -> list[dict]:
    """Predict every entry with the simulation; returns the records (in grid order), which are also appended
    to out_dir/results.jsonl as each configuration finishes. `jobs` > 1 predicts in that many worker processes (spawned: autograd does not survive fork).
    """
    path = os.path.join(out_dir, RESULTS_FILE)
    env = environment("simulate", "cpu-simulated")
    bar = tqdm(total=len(entries), desc="memprof", unit="config", file=sys.stderr, disable=not progress,
               bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
    done: dict[int, dict] = {}

    def finish(i: int, record: dict) -> None:
        append(path, record)
        done[i] = record
        bar.set_postfix_str(entries[i].spec.key)
        bar.update()

    def failed(i: int, exc: Exception) -> dict:
        return make_record(entries[i].spec, "error", PREDICTED, env, error=f"{type(exc).__name__}: {exc}")

    todo = []
    for i, entry in enumerate(entries):
        if entry.skip_reason:
            finish(i, make_record(entry.spec, "skipped", PREDICTED, env, skip_reason=entry.skip_reason))
        else:
            todo.append(i)
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_timed_predict, entries[i].spec): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    status, metrics, elapsed = fut.result()
                    finish(i, make_record(entries[i].spec, status, PREDICTED, env, metrics, elapsed_s=elapsed))
                except UsageError:
                    raise
                except Exception as exc:  # a failing configuration is a result; the grid goes on
                    finish(i, failed(i, exc))
    else:
        for i in todo:
            bar.set_postfix_str(entries[i].spec.key)
            try:
                status, metrics, elapsed = _timed_predict(entries[i].spec)
                finish(i, make_record(entries[i].spec, status, PREDICTED, env, metrics, elapsed_s=elapsed))
            except UsageError:
                raise
            except Exception as exc:  # a failing configuration is a result; the grid goes on
                finish(i, failed(i, exc))
    bar.close()
    return [done[i] for i in sorted(done)]

