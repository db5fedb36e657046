"""A worker process: `python -m memprof.executors.worker` runs configurations for its parent (memprof.executors.runner).

Protocol: one JSON request a line on stdin ({"spec", "backend", "backend_path" (where a backend registered in
the parent is imported from, memprof.backends.registry), "options" (the backend's keywords, e.g. out_dir for
the files a prediction leaves), optional "task": "fit"}), one JSON result a line
({"status", "metrics", "error", "device", "elapsed_s"}) on the stdout the worker started with; whatever
a backend prints goes to stderr instead. Everything a configuration raises is caught here and sent as
text, "<OriginalType>: <message> (at <module>:<line> in <function>)", status "error"; nothing crosses
the pipe but JSON, so no error can be hidden by a failure to pickle it.

Lifetime: the worker never outlives its parent. It exits as soon as its stdin reaches end-of-file, which
happens when the parent closes it or dies in any way (the kernel closes a dead process's pipes; checked
by a watcher thread, so it also works while a configuration is running, on every POSIX system). On
Linux the kernel also sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG). It ignores SIGINT:
on Ctrl-C the parent stops its workers itself, so no worker prints a KeyboardInterrupt of its own.

For tests: MEMPROF_TEST_CRASH=<text> makes the worker kill itself (SIGKILL) on a spec whose key contains
<text>; MEMPROF_TEST_WORKER_HOOK=<module>:<function> is imported and called once at start-up (e.g. to
monkeypatch a backend inside the worker).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import queue
import signal
import sys
import threading
import time

from memprof.errors import describe

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent dies; False where that is unavailable
    (other systems, or no libc prctl): then the stdin watcher alone ends the worker."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def run_request(request: dict) -> tuple[str, dict]:
    """(status, metrics) of one request: a run of its spec on its backend, or (task "fit") the search for the
    largest batch that fits, probing where the backend runs (memprof.planning.fit)."""
    from memprof.backends.base import as_outcome
    from memprof.backends.registry import get
    from memprof.spec import RunSpec

    spec = RunSpec(**request["spec"])
    backend = get(request["backend"], request.get("backend_path"))
    crash = os.environ.get("MEMPROF_TEST_CRASH")
    if crash and crash in spec.key:
        os.kill(os.getpid(), signal.SIGKILL)
    options = request.get("options") or {}
    if request.get("task", "run") == "fit":
        from memprof.planning.fit import fit_config

        return fit_config(spec, backend.probe(spec, **options.get("probe_options", {})), backend,
                          options.get("max_batch_size"), options.get("headroom"))
    outcome = as_outcome(backend.run(spec, **options))
    return outcome.status, {**outcome.metrics, **outcome.artifacts}  # a record names its files among its metrics


def handle(request: dict, raise_usage: bool = False) -> dict:
    """One configuration; always returns a JSON-serialisable result, whatever the backend raised (a UsageError
    is raised instead with `raise_usage`: the caller's own process stops on bad input)."""
    from memprof.backends.registry import get
    from memprof.errors import UsageError

    start = time.perf_counter()
    device = None
    try:
        device = get(request["backend"], request.get("backend_path")).device_name()
        status, metrics = run_request(request)
        out = {"status": status, "metrics": metrics, "error": None}
    except UsageError as exc:
        if raise_usage:
            raise
        out = {"status": "error", "metrics": {}, "error": f"usage: {exc}"}
    except Exception as exc:  # a configuration that fails at run time is a result, with its error
        out = {"status": "error", "metrics": {}, "error": describe(exc)}
    out.update(device=device, elapsed_s=time.perf_counter() - start)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        out = {"status": "error", "metrics": {}, "device": device, "elapsed_s": out["elapsed_s"],
               "error": f"the result could not be sent to the parent: {describe(exc)}"}
    return out


def _watch_stdin(stdin, requests: queue.Queue) -> None:
    """Queue each request line; at end-of-file (the parent closed the pipe or died) end the process."""
    for line in stdin:
        requests.put(line)
    os._exit(0)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, not into the protocol
    hook = os.environ.get("MEMPROF_TEST_WORKER_HOOK")
    if hook:
        module, _, function = hook.partition(":")
        getattr(importlib.import_module(module), function)()
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_watch_stdin, args=(sys.stdin, requests), name="memprof-stdin", daemon=True).start()
    while True:
        result = handle(json.loads(requests.get()))
        results.write(json.dumps(result) + "\n")
        results.flush()


if __name__ == "__main__":
    sys.exit(main())
