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

from memprof.plugin_registry import Registry

BUILTIN = {
    "open_clip": "memprof.model_sources.open_clip:OpenClipSource",
    "timm": "memprof.model_sources.timm:TimmSource",
    "torchvision": "memprof.model_sources.torchvision:TorchvisionSource",
    "py": "memprof.model_sources.py:PySource",
    "hf": "memprof.model_sources.hf:HFSource",
}
SOURCES = Registry("model source", "memprof.model_sources", BUILTIN, "memprof list models --help")
register, unregister, targets, names, get = SOURCES.register, SOURCES.unregister, SOURCES.targets, SOURCES.names, \
    SOURCES.get


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
