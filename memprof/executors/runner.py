"""Runs a grid of specs through a backend, one record per configuration, appended as each finishes.

Where a configuration runs follows its backend's isolation (memprof.backends.base; found by name in
memprof.backends.registry): `simulate` (pooled) predicts in this process (`jobs` 1) or in `jobs` worker
processes; the measuring backends run one configuration at a time, `cuda` (fresh-process) each in a fresh
worker process, `cpu` (pooled, exclusive) all in one (its figure is live tensor bytes counted by the tracker,
which what ran before in the process does not change). Workers are
`python -m memprof.executors.worker` children that talk JSON over pipes and die with this process (memprof.executors.worker).
A configuration that fails at run time is recorded with its error as text (status "error", "<Type>:
<message>"), a worker that dies (segfault, kill, timeout) as "crashed" with its exit code and last
stderr lines, and an out-of-memory verdict is a result (status "oom"); the rest go on. Bad input
(UsageError) stops the run; so does Ctrl-C, which kills every worker first.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tqdm import tqdm

from memprof.backends.registry import get, target_path
from memprof.results import RESULTS_FILE, append, environment, make_record
from memprof.spec import GridEntry, RunSpec
from memprof.executors.worker import handle

STDERR_TAIL_LINES = 8


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def worker_env(jobs: int) -> dict:
    """A worker's environment: torch's intra-op threads (OMP/MKL) set to the cores shared out among `jobs`
    workers, so they never oversubscribe them (2 workers on 2 cores: one thread each); a value the user set
    is kept."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ}


class WorkerProcess:
    """A `python -m memprof.executors.worker` child: requests go to its stdin, result lines come back on its stdout
    (read by a thread into the pool's event queue), its stderr goes to a temporary file kept for a crash
    report. The child dies with this process (memprof.executors.worker), so a killed run leaves no worker behind."""

    def __init__(self, events: queue.Queue, env: dict | None = None):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "memprof.executors.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.task: int | None = None
        self.group = None  # the group of the last task sent (run_in_workers)
        self.started_s = 0.0
        self.served = 0
        threading.Thread(target=self._read, args=(events,), name="memprof-worker-reader", daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            events.put((self, line))
        events.put((self, None))  # end of file: the worker exited or died

    def send(self, task: int, request: dict) -> None:
        self.task, self.started_s = task, time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # it died before reading: its reader reports the end of file, and the task crashed
            pass

    def stop(self, kill: bool = False) -> int | None:
        """Close its stdin (it exits), or kill it; returns the exit code (negative: killed by that signal)."""
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:  # it already died: the pipe is broken
            pass
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr.close()
        return rc

    def crash(self, timed_out_s: float | None = None) -> dict:
        """The result of a task whose worker died, or is killed now for running past `timed_out_s`."""
        if timed_out_s is not None:
            self.proc.kill()
        rc = self.proc.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").splitlines()
        tail = [line.rstrip() for line in lines[-STDERR_TAIL_LINES:]]
        self.stop()
        how = (f"timed out after {timed_out_s} s" if timed_out_s is not None else
               f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}")
        return {"status": "crashed", "metrics": {"exit_code": None if timed_out_s is not None else rc},
                "device": None, "elapsed_s": None, "error": f"worker {how}" + (": " + " | ".join(tail) if tail else "")}


def run_in_workers(requests: dict, jobs: int, on_result, on_start=None, fresh: bool = False,
                   timeout_s: float | None = None, group=None) -> None:
    """Run {task: request} in up to `jobs` worker processes, calling on_result(task, result) as each ends
    (result: the worker's JSON answer, see memprof.executors.worker) and on_start(task) as each is sent.

    A worker that dies is replaced and its task's result is "crashed" with its exit code; one running past
    `timeout_s` is killed and "crashed" too. `fresh`: a new process for every task. `group(task)`: tasks of
    one group go to the worker that ran that group last (a prediction reuses the forward trace its worker
    holds, memprof.simulation.shared); a worker takes a new group only when no busy worker serves it.
    On any exception (Ctrl-C included) every worker is killed before it propagates."""
    events: queue.Queue = queue.Queue()
    pending = list(requests)
    workers: list[WorkerProcess] = []
    try:
        while pending or any(w.task is not None for w in workers):
            for w in [w for w in workers if w.task is None and (not pending or fresh and w.served)]:
                workers.remove(w)
                w.stop()
            while pending:
                choice = _assign(pending, workers, jobs, group)
                if choice is None:
                    break
                w, i = choice
                if w is None:
                    w = WorkerProcess(events, worker_env(jobs))
                    workers.append(w)
                task = pending.pop(i)
                w.group = group(task) if group else None
                if on_start:
                    on_start(task)
                w.send(task, requests[task])
            busy = [w for w in workers if w.task is not None]
            deadline = min(w.started_s for w in busy) + timeout_s if timeout_s and busy else None
            try:
                w, line = events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                late = min(busy, key=lambda b: b.started_s)
                workers.remove(late)
                on_result(late.task, late.crash(timed_out_s=timeout_s))
                continue
            if w not in workers:  # a worker stopped already (killed on time-out): its last words are stale
                continue
            task, w.task = w.task, None
            if line is None:
                workers.remove(w)
                if task is not None:
                    on_result(task, w.crash())
                else:
                    w.stop()
                continue
            w.served += 1
            on_result(task, json.loads(line))
    except BaseException:
        for w in workers:
            w.stop(kill=True)
        raise
    for w in workers:
        w.stop()


def _assign(pending: list, workers: list, jobs: int, group) -> tuple | None:
    """(worker, index in `pending`) of the next task to send, the worker None for a new one; None to wait.
    With `group`: an idle worker takes a task of the group it ran last, else any worker a task of a group no
    busy worker serves; a task whose group a busy worker serves waits for that worker."""
    idle = [w for w in workers if w.task is None]
    candidates = idle + ([None] if len(workers) < jobs else [])
    if not candidates:
        return None
    if group is None:
        return candidates[0], 0
    for w in idle:
        for i, task in enumerate(pending):
            if w.group is not None and group(task) == w.group:
                return w, i
    served = {w.group for w in workers if w.task is not None}
    for i, task in enumerate(pending):
        if group(task) not in served:
            return candidates[0], i
    return None


def request(spec: RunSpec, backend: str, options: dict | None = None, task: str = "run") -> dict:
    """A worker request (memprof.executors.worker) for one configuration."""
    return {"spec": spec.to_dict(), "backend": backend, "backend_path": target_path(backend),
            "options": options or {}, "task": task}


def run_isolated(spec: RunSpec, backend: str, options: dict | None = None, timeout_s: float | None = None) -> dict:
    """Run one configuration in a fresh worker process; returns its status, metrics, error and device (a
    dead worker is a result: "crashed")."""
    out: dict = {}
    run_in_workers({0: request(spec, backend, options)}, 1, lambda _, result: out.update(result), fresh=True,
                   timeout_s=timeout_s)
    return out


def runs_in_caller(backend, jobs: int, configs: int) -> bool:
    """Whether configurations run in this process: an in-process backend always; a pooled one that needs no
    exclusive device when one job (or one configuration) is asked; the others never."""
    return backend.isolation == "in-process" or (backend.isolation == "pooled" and not backend.exclusive
                                                 and (jobs <= 1 or configs <= 1))


def run_grid(entries: list[GridEntry], out_dir: str, backend: str = "simulate", progress: bool = True,
             jobs: int = 1, options: dict | None = None, timeout_s: float | None = None, task: str = "run",
             executor: str = "local", ray_address: str | None = None) -> list[dict]:
    """Run every entry; returns the records (in grid order), which are also appended to
    out_dir/results.jsonl as each configuration finishes. Where each runs follows the backend's isolation
    (memprof.backends.base): in this process, in `jobs` pooled workers (configurations of one affinity on one
    worker), or each in a fresh process, one at a time on a device that measures; `timeout_s` applies to
    configurations that run in workers one at a time. A run's backend gets `out_dir` for the files it leaves.
    `task` "fit": each entry is a batch-size search (memprof.planning.fit) whose probes run where the backend
    runs: the search in a worker beside them, or here with each probe in a fresh process.
    `executor` "ray": each configuration is a Ray task running the same worker (memprof.executors.ray_executor), on
    the cluster at `ray_address` (None: Ray started locally); the record's environment names its node and GPUs."""
    chosen = get(backend)
    path = os.path.join(out_dir, RESULTS_FILE)
    source = chosen.source
    env = {**environment(backend, chosen.device_name()), "executor": executor, "node": socket.gethostname()}
    bar = tqdm(total=len(entries), desc="memprof", unit="config", file=sys.stderr, disable=None if progress else True,
               bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
    done: dict[int, dict] = {}
    started: dict[int, float] = {}
    options = {**(options or {}), **({"out_dir": out_dir} if task == "run" else {})}

    def finish(i: int, record: dict) -> None:
        append(path, record)
        done[i] = record
        bar.update()

    def start(i: int) -> None:
        started[i] = time.perf_counter()
        bar.set_postfix_str(entries[i].spec.key)

    def from_worker(i: int, out: dict) -> None:
        # a run that starts a process of its own is timed by the parent (by the Ray task on a cluster), process
        # start included; the others inside their worker
        fresh = chosen.isolation == "fresh-process" or executor == "ray"
        elapsed = (out.get("wall_s") or time.perf_counter() - started[i]) if fresh or out["elapsed_s"] is None \
            else out["elapsed_s"]
        where = {k: v for k, v in (out.get("where") or {}).items() if k in ("node", "node_id", "gpu_ids")}
        finish(i, make_record(entries[i].spec, out["status"], source,
                              {**env, **where, "device": out["device"] or env["device"]},
                              out["metrics"], error=out["error"], elapsed_s=elapsed, task=task))

    todo = []
    for i, entry in enumerate(entries):
        if entry.skip_reason:
            finish(i, make_record(entry.spec, "skipped", source, env, skip_reason=entry.skip_reason, task=task))
        else:
            todo.append(i)
    requests = {i: request(entries[i].spec, backend, options, task) for i in todo}
    one_at_a_time = timeout_s if chosen.exclusive and task == "run" else None
    if executor == "ray" and todo:
        from memprof.executors.ray_executor import run_in_ray

        run_in_ray(requests, from_worker, on_start=start, address=ray_address, gpu=chosen.gpus > 0,
                   timeout_s=one_at_a_time)
    elif task == "fit" and chosen.isolation == "fresh-process":
        from dataclasses import replace

        from memprof.planning.fit import fit_config

        probe_options = options.get("probe_options", {})
        for i in todo:
            start(i)
            spec = entries[i].spec

            def probe(batch: int, spec=spec) -> dict:
                return run_isolated(replace(spec, batch_size=batch), backend, probe_options, options.get("timeout_s"))

            status, metrics = fit_config(spec, probe, chosen, options.get("max_batch_size"), options.get("headroom"))
            from_worker(i, {"status": status, "metrics": metrics, "error": None, "device": None, "elapsed_s": None})
    elif runs_in_caller(chosen, jobs, len(todo)):
        for i in todo:
            start(i)
            out = handle(requests[i], raise_usage=True)  # bad input stops the run here, as it would have before it
            from_worker(i, out)
    else:
        run_in_workers(requests, 1 if chosen.exclusive else jobs, from_worker, on_start=start,
                       fresh=chosen.isolation == "fresh-process" and task == "run", timeout_s=one_at_a_time,
                       group=(lambda i: chosen.affinity(entries[i].spec)) if not chosen.exclusive else None)
    bar.close()
    return [done[i] for i in sorted(done)]
