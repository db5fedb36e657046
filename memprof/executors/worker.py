"""A worker process: `python -m memprof.executors.worker` runs configurations for its parent (memprof.executors.runner).

Protocol: one JSON request a line on stdin ({"spec", "backend", "options", optional "task": "fit" and
"artifacts": {"out_dir", "snapshot_dir"} for a prediction's timeline and snapshot files}), one JSON result a line
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
import traceback

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


def describe(exc: BaseException) -> str:
    """An exception as text: its type, its message and the innermost frame that raised it."""
    try:
        message = str(exc)
    except Exception as inner:  # an exception whose __str__ fails still gets named
        message = f"<message not printable: {type(inner).__name__}>"
    text = f"{type(exc).__name__}: {message}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        module = os.path.splitext(os.path.basename(last.filename))[0]
        text += f" (at {module}:{last.lineno} in {last.name})"
    return text


def _backend(name: str, task: str = "run"):
    """(run(spec, **options) -> (status, metrics), device_name()) for a backend; task "fit" searches the
    largest batch that fits instead (memprof.planning.fit), probing with that backend."""
    if task == "fit":
        from memprof.planning import fit

        _, device_name = _backend(name)
        return (lambda spec, **options: fit.fit_config(spec, name, **options)), device_name
    if name == "simulate":
        from memprof.simulation import simulate

        return simulate.predict, lambda: "cpu-simulated"
    if name == "cuda":
        from memprof.backends import cuda as cuda_backend

        return cuda_backend.measure, cuda_backend.device_name
    if name == "cpu":
        from memprof.backends import cpu as cpu_backend

        return cpu_backend.measure, cpu_backend.device_name
    raise ValueError(f"unknown backend {name}")


def handle(request: dict) -> dict:
    """One configuration; always returns a JSON-serialisable result, whatever the backend raised."""
    from memprof.errors import UsageError
    from memprof.spec import RunSpec

    start = time.perf_counter()
    device = None
    try:
        spec = RunSpec(**request["spec"])
        run, device_name = _backend(request["backend"], request.get("task", "run"))
        device = device_name()
        crash = os.environ.get("MEMPROF_TEST_CRASH")
        if crash and crash in spec.key:
            os.kill(os.getpid(), signal.SIGKILL)
        artifacts = request.get("artifacts")  # simulate: timelines and snapshots beside the results
        if artifacts:
            from memprof.simulation.simulate import writing_artifacts

            with writing_artifacts(**artifacts):
                status, metrics = run(spec, **(request.get("options") or {}))
        else:
            status, metrics = run(spec, **(request.get("options") or {}))
        out = {"status": status, "metrics": metrics, "error": None}
    except UsageError as exc:
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
