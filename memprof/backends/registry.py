"""The one registry of backends: built-in ones by dotted path (imported only when used), third-party ones from
the `memprof.backends` entry-point group or `register(name, "module:attribute")`.

    # in a package's pyproject.toml
    [project.entry-points."memprof.backends"]
    formula = "mypkg.backends:FormulaBackend"

A registered target is a Backend class (memprof.backends.base) or instance; worker processes find it again by
its dotted path, which is why `register` takes one (an object registered in this process alone can only run
in-process). No module outside this one decides anything by a backend's name.
"""

from __future__ import annotations

from memprof.errors import UsageError
from memprof.plugin_registry import Registry

BUILTIN = {"simulate": "memprof.backends.simulate:SimulateBackend", "cuda": "memprof.backends.cuda:CudaBackend",
           "cpu": "memprof.backends.cpu:CpuBackend"}
AUTO = "auto"
BACKENDS = Registry("backend", "memprof.backends", BUILTIN, "memprof list backends", reserved=(AUTO,))
register, unregister, targets, names = BACKENDS.register, BACKENDS.unregister, BACKENDS.targets, BACKENDS.names
target_path, get = BACKENDS.target_path, BACKENDS.get


def resolve(requested: str):
    """(backend, the line that announces it) for a requested name; `auto` is cuda where a GPU is present, else
    simulate. A backend that cannot run here is a UsageError saying why."""
    if requested == AUTO:
        from memprof.backends.nvml import gpu_present  # (torch only where NVML finds a GPU)

        present = gpu_present()
        backend = get("cuda" if present else "simulate")
        why = " (a CUDA GPU is present)" if present else " (no CUDA GPU here)"
    else:
        backend = get(requested)
        why = ""
        problem = backend.unavailable()
        if problem:
            raise UsageError(f"--backend {requested}: {problem}", option="backend")
    return backend, f"memprof: backend {backend.name}{why}: {backend.describe()}"
