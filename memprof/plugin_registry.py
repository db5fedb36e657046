"""A registry of named plugins of one kind (backends, model sources): built-ins by dotted path, imported only when
first asked for; third-party ones from an entry-point group (they serve every process, worker processes included)
or `register(name, target)` (this process). A target is a class or an instance, or "module:attribute" naming one;
the name it is registered under is its identity."""

from __future__ import annotations

import importlib
from importlib import metadata

from memprof.errors import unknown_name


def load(path: str):
    """The object "module:attribute" names (the attribute may be dotted)."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    def __init__(self, kind: str, group: str, builtin: dict[str, str], list_command: str, reserved: tuple = ()):
        self.kind, self.group, self.builtin, self.list_command = kind, group, builtin, list_command
        self.reserved = reserved  # names that are not plugins (a backend's `auto`); offered among close matches
        self._registered: dict[str, object] = {}
        self._instances: dict[str, object] = {}

    def register(self, name: str, target) -> None:
        if name in self.reserved or not name or not name.replace("-", "").replace("_", "").isalnum():
            taken = "".join(f", not '{r}'" for r in self.reserved)
            raise ValueError(f"{self.kind} name {name!r}: letters, digits, '-' and '_' only{taken}")
        self._registered[name] = target
        self._instances.pop(name, None)

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)
        self._instances.pop(name, None)

    def targets(self) -> dict[str, object]:
        """name -> target of each: built-in, then entry points, then registered here (later ones win)."""
        entry_points = {ep.name: ep.value for ep in metadata.entry_points(group=self.group)}
        return {**self.builtin, **entry_points, **self._registered}

    def names(self) -> list[str]:
        return list(self.targets())

    def target_path(self, name: str) -> str | None:
        """The dotted path another process imports `name` from (None: registered as an object in this one)."""
        target = self.targets().get(name)
        return target if isinstance(target, str) else None

    def get(self, name: str, path: str | None = None):
        """The plugin called `name` (an instance); `path` imports it where this process has not registered it (a
        worker process given its parent's registration). An unknown name is a UsageError with close matches."""
        if name in self._instances:
            return self._instances[name]
        target = self.targets().get(name, path)
        if target is None:
            raise unknown_name(self.kind, name, self.names() + list(self.reserved), self.list_command)
        obj = load(target) if isinstance(target, str) else target
        plugin = obj() if isinstance(obj, type) else obj
        if getattr(plugin, "name", None) != name:
            plugin.name = name  # the name it is registered under (records, worker requests, a source's prefix)
        self._instances[name] = plugin
        return plugin
