"""One configuration in a fresh process: `python -m memprof.worker REQUEST.json RESULT.json`.

The request names the spec, the backend and its options; the result file gets status, metrics, error
and device. A fresh process per configuration keeps one configuration's allocator cache, CUDA context or
leak away from the next, and a crash (segfault, kill) away from the suite: the parent records it.

For testing that crash handling, MEMPROF_TEST_CRASH=<text> makes the worker of a spec whose key contains
<text> kill itself (SIGKILL) once its backend is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def run(request: dict) -> dict:
    from memprof.errors import UsageError
    from memprof.spec import RunSpec

    spec = RunSpec(**request["spec"])
    backend = _backend(request["backend"])
    crash = os.environ.get("MEMPROF_TEST_CRASH")
    if crash and crash in spec.key:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        status, metrics = backend.measure(spec, **request.get("options", {}))
        return {"status": status, "metrics": metrics, "error": None, "device": backend.device_name()}
    except UsageError as exc:
        return {"status": "error", "metrics": {}, "error": f"usage: {exc}", "device": backend.device_name()}
    except Exception as exc:  # a configuration that fails at run time is a result, with its error
        return {"status": "error", "metrics": {}, "error": f"{type(exc).__name__}: {exc}",
                "device": backend.device_name()}


def _backend(name: str):
    if name == "cuda":
        from memprof import cuda_backend

        return cuda_backend
    if name == "cpu":
        from memprof import cpu_backend

        return cpu_backend
    raise ValueError(f"unknown backend {name}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fh:
        request = json.load(fh)
    result = run(request)
    with open(argv[1], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
