"""One way to replace, for the length of a block, what a device needs replaced in torch and the libraries, and to
put every piece back.

`Patches` is an ExitStack: `set(obj, name, value)` replaces an attribute (restored on close, or deleted again when
`obj` only inherited it), `wrap(obj, name, make)` replaces it with `make(original)`, `hooks(*handles)` removes
hooks, and `callback` anything else. The simulated device (memprof.script.device), the measured one
(memprof.script.measure) and the torchrun layer (memprof.script.parallel) install every patch through it; the
device closes it in its __exit__, in the reverse order of installation.
"""

from __future__ import annotations

import contextlib


class Patches(contextlib.ExitStack):
    """An ExitStack that restores the attributes it replaced (see the module docstring)."""

    def set(self, obj, name: str, value) -> None:
        own = vars(obj)
        had, old = name in own, own.get(name)
        setattr(obj, name, value)
        self.callback(_restore, obj, name, had, old)

    def wrap(self, obj, name: str, make) -> None:
        """Replace `obj.name` by `make(original)`."""
        self.set(obj, name, make(getattr(obj, name)))

    def hooks(self, *handles) -> None:
        for handle in handles:
            self.callback(handle.remove)


def _restore(obj, name: str, had: bool, old) -> None:
    if had:
        setattr(obj, name, old)
    else:
        delattr(obj, name)
