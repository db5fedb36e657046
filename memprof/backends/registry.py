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

import importlib
from importlib import metadata

from memprof.errors import UsageError, unknown_name

ENTRY_POINT_GROUP = "memprof.backends"
BUILTIN = {"simulate": "memprof.backends.simulate:SimulateBackend", "cuda": "memprof.backends.cuda:CudaBackend",
           "cpu": "memprof.backends.cpu:CpuBackend"}
AUTO = "auto"
_REGISTERED: dict[str, object] = {}  # name -> "module:attr" or a Backend class/instance
_INSTANCES: dict[str, object] = {}


def register(name: str, target) -> None:
    """Add a backend: `target` is "module:attribute" (a Backend class or instance there) or the object itself."""
    if name == AUTO or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"backend name {name!r}: letters, digits, '-' and '_' only, not 'auto'")
    _REGISTERED[name] = target
    _INSTANCES.pop(name, None)


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)
    _INSTANCES.pop(name, None)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def targets() -> dict[str, object]:
    """name -> target of every backend: built-in, then entry points, then registered here (later ones win)."""
    return {**BUILTIN, **_entry_points(), **_REGISTERED}


def names() -> list[str]:
    return list(targets())


def target_path(name: str) -> str | None:
    """The dotted path a worker process imports the backend from (None: registered as an object here)."""
    target = targets().get(name)
    return target if isinstance(target, str) else None


def load(path: str):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get(name: str, path: str | None = None):
    """The backend called `name` (an instance); `path` imports it where this process has not registered it (a
    worker process given its parent's registration). An unknown name is a UsageError with close matches."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    target = targets().get(name, path)
    if target is None:
        raise unknown_name("backend", name, names() + [AUTO], "memprof list backends")
    obj = load(target) if isinstance(target, str) else target
    backend = obj() if isinstance(obj, type) else obj
    if getattr(backend, "name", None) != name:
        backend.name = name  # the name it is registered under is its identity (records, worker requests)
    _INSTANCES[name] = backend
    return backend


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
