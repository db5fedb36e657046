"""Executor `ray`: each configuration is a Ray task that runs the local runner's worker process.

A task starts a fresh `python -m memprof.executors.worker` on whichever node Ray places it (one CPU; one GPU on the
cuda backend), writes the one request line, reads the one result line and returns it with the node and
GPU it ran on; the worker's protocol and error capture are memprof.executors.worker's, so a record is the same as
the local executor's but for timings and where it ran. The driver (memprof.executors.runner) appends each result
as `ray.wait` hands it back. A worker that dies is a "crashed" result as locally (its exit code and last
stderr lines); a Ray worker or node that is lost is a "crashed" result naming the node. Ctrl-C cancels
every task (force: their worker processes die with them) before it propagates.

Without an address Ray starts on this machine; `auto` joins the running cluster; `ray://host:10001`
connects through Ray Client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from memprof.errors import UsageError

INSTALL_HINT = "--executor ray needs Ray: pip install -e '.[ray]'"
STDERR_TAIL_LINES = 8


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT, option="executor") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """ray.init (local when `address` is None), once per process; an address that cannot be reached is a
    UsageError naming it, and nothing is started."""
    ray = require_ray()
    if ray.is_initialized():
        return
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    try:
        ray.init(**kwargs, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": _forwarded_env()})
    except Exception as exc:  # ConnectionError, grpc errors, timeouts: all mean the same to a user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--ray-address {address or '(local)'}: cannot reach a Ray cluster there ({first}); "
                         f"start one (`ray start --head`) or check the address", option="ray_address") from None


def check_address(address: str | None) -> None:
    """Before anything runs: `ray://host:port` and `host:port` must accept a TCP connection (so a typo'd
    address fails in a second, not after Ray's own retries); `auto` needs a running local cluster."""
    require_ray()
    if not address or address in ("local",):
        return
    if address == "auto":
        connect(address)
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address}: give auto, host:port or ray://host:10001", option="ray_address")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address}: cannot reach a Ray cluster there ({exc.strerror or exc}); start "
                         f"one (`ray start --head`) or check the address", option="ray_address") from None


def _forwarded_env() -> dict:
    """The variables a task's worker needs from the driver: where memprof is, and the test hooks."""
    names = ("PYTHONPATH", "MEMPROF_TEST_CRASH", "MEMPROF_TEST_WORKER_HOOK", "MEMPROF_TEST_KILL_RAY_WORKER")
    env = {n: os.environ[n] for n in names if n in os.environ}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_worker(request: dict, python: str) -> dict:
    """Body of a Ray task: one configuration in a fresh worker process; its result and where it ran."""
    import ray

    ctx = ray.get_runtime_context()
    where = {"node": socket.gethostname(), "node_id": ctx.get_node_id(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    exe = python if os.path.exists(python) else sys.executable
    kill = os.environ.get("MEMPROF_TEST_KILL_RAY_WORKER")  # tests: this Ray worker dies (SIGKILL) on a matching key
    if kill:
        from memprof.spec import RunSpec

        if kill in RunSpec(**request["spec"]).key:
            os.kill(os.getpid(), signal.SIGKILL)
    started = time.perf_counter()
    # stdin stays open until the answer is read: the worker exits as soon as its stdin ends (memprof.executors.worker)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([exe, "-m", "memprof.executors.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
        except OSError:  # it died before reading: reported below from its exit code
            pass
        line = proc.stdout.readline()
        try:
            proc.stdin.close()
        except OSError:
            pass
        rc = proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if line.strip():
        return {**json.loads(line), "where": where, "wall_s": time.perf_counter() - started}
    tail = [t.rstrip() for t in stderr.splitlines()[-STDERR_TAIL_LINES:]]
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
    return {"status": "crashed", "metrics": {"exit_code": rc}, "device": None, "elapsed_s": None,
            "error": f"worker {how} on node {where['node']}" + (": " + " | ".join(tail) if tail else ""),
            "where": where, "wall_s": time.perf_counter() - started}


def run_in_ray(requests: dict, on_result, on_start=None, address: str | None = None, gpu: bool = False,
               timeout_s: float | None = None, num_cpus: int | None = None) -> None:
    """Run {task: request} as Ray tasks, calling on_start(task) as each is submitted and on_result(task,
    result) as each finishes (in completion order). A lost Ray worker or node is a "crashed" result; one
    running past `timeout_s` is cancelled and "crashed". Any exception (Ctrl-C too) cancels every task."""
    ray = require_ray()
    connect(address, num_cpus)
    remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_retries=0)(run_worker)
    refs = {}
    try:
        for task, request in requests.items():
            if on_start:
                on_start(task)
            refs[remote.remote(request, sys.executable)] = (task, time.monotonic())
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
            if not ready:  # the oldest task ran past the time limit
                ref = min(refs, key=lambda r: refs[r][1])
                ray.cancel(ref, force=True)
                task, _ = refs.pop(ref)
                on_result(task, {"status": "crashed", "metrics": {"exit_code": None}, "device": None,
                                 "elapsed_s": None, "error": f"worker timed out after {timeout_s} s (Ray task cancelled)"})
                continue
            ref = ready[0]
            task, _ = refs.pop(ref)
            on_result(task, _result(ray, ref))
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _result(ray, ref) -> dict:
    """A finished task's result; a task that Ray lost (worker or node died) as a crashed one naming the node."""
    from ray import exceptions

    try:
        return ray.get(ref)
    except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.TaskCancelledError,
            exceptions.RayTaskError, exceptions.ObjectLostError) as exc:
        node = _node_of(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"status": "crashed", "metrics": {"exit_code": None}, "device": None, "elapsed_s": None,
                "error": f"Ray {type(exc).__name__} on node {node}: {first}"[:500], "where": {"node": node}}


def _node_of(exc) -> str:
    """The node named in a Ray error (its IP or id), else 'unknown'."""
    import re

    text = str(exc)
    for pattern in (r"ip:?\s*([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)", r"node(?:_id| ID)?[:=\s]+([0-9a-f]{16,})",
                    r"([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)"):
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return m.group(1)
    return "unknown"
