"""The one registry of model sources: built-in ones by dotted path (imported only when a name of theirs is asked
for), third-party ones from the `memprof.model_sources` entry-point group or `register(name, target)`.

    # in a package's pyproject.toml
    [project.entry-points."memprof.model_sources"]
    hf = "mypkg.sources:HubSource"

A target is a ModelSource class (memprof.model_sources.base) or instance, or "module:attribute" naming one. An
entry point serves every process (worker processes included); `register` serves this one (and runs in it). No
module outside memprof.model_sources decides anything by a source's name.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from memprof.errors import unknown_name

ENTRY_POINT_GROUP = "memprof.model_sources"
BUILTIN = {
    "open_clip": "memprof.model_sources.open_clip:OpenClipSource",
    "timm": "memprof.model_sources.timm:TimmSource",
    "torchvision": "memprof.model_sources.torchvision:TorchvisionSource",
    "py": "memprof.model_sources.py:PySource",
}
_REGISTERED: dict[str, object] = {}  # name -> "module:attr" or a ModelSource class/instance
_INSTANCES: dict[str, object] = {}


def register(name: str, target) -> None:
    """Add a model source: its names are written `name:ARCH`. `target` is "module:attribute" (a ModelSource class or
    instance there) or the object itself."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"model source name {name!r}: letters, digits, '-' and '_' only")
    _REGISTERED[name] = target
    _INSTANCES.pop(name, None)


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)
    _INSTANCES.pop(name, None)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def targets() -> dict[str, object]:
    """name -> target of every source: built-in, then entry points, then registered here (later ones win)."""
    return {**BUILTIN, **_entry_points(), **_REGISTERED}


def names() -> list[str]:
    return list(targets())


def _load(path: str):
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get(name: str):
    """The source called `name` (an instance); an unknown name is a UsageError with close matches."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    target = targets().get(name)
    if target is None:
        raise unknown_name("model source", name, names(), "memprof list models --help")
    obj = _load(target) if isinstance(target, str) else target
    source = obj() if isinstance(obj, type) else obj
    if getattr(source, "name", None) != name:
        source.name = name  # the name it is registered under is its prefix
    _INSTANCES[name] = source
    return source


def source_of(model: str):
    """The source a model name belongs to: the one its prefix names (`timm:vit_base_patch16_224`), else the bare
    source that owns it, else the first bare source (open_clip, which says the name is unknown, with close
    matches)."""
    prefix, colon, _ = model.partition(":")
    if colon and prefix in targets():
        source = get(prefix)
        if not source.bare:
            return source
    bare = [source for source in map(get, targets()) if source.bare]
    return next((source for source in bare if source.owns(model)), bare[0])
