"""The py source: `py:package.module:factory`, a user's zero-argument callable returning an nn.Module (or a
factory handed to the Python API, named `py:@local:...` in this process). Resolving builds it once on the meta
device (no memory) to ask the network its input shape (timm's pretrained_cfg, an `image_size` attribute; else
`--input-shape` must say), its family's embedding and whether it has `set_grad_checkpointing`. Whatever the
user's code does wrong (raises, needs an argument, calls sys.exit) is one line naming their file:line."""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

from memprof.errors import UsageError, UserCodeError
from memprof.model_sources.base import ModelInfo, ModelSource, family_embedding, source_model

_LOCAL_FACTORIES: dict[str, object] = {}  # py:@local:... names of factories handed in by a Python caller


def factory_name(factory) -> str:
    """A model name for a zero-argument factory: `py:module:qualname` when a fresh process can import it,
    else a name that only this process knows (the simulation runs in-process; `measure` needs the former)."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            if obj is factory:
                return f"py:{module}:{qualname}"
        except (ImportError, AttributeError):
            pass
    name = f"py:@local:{qualname or 'factory'}:{id(factory):x}"
    _LOCAL_FACTORIES[name] = factory
    return name


_PACKAGE = Path(__file__).parents[1]  # memprof/: its frames are not the user's
_OURS = tuple({str(_PACKAGE) + "/", str(_PACKAGE.resolve()) + "/", "<frozen "})


def _user_frame(exc: BaseException, factory=None) -> str:
    """`file:line in function` of the user's code an exception came from: the innermost frame outside memprof,
    the import machinery and installed packages; else the factory's own definition; else the innermost frame."""
    import inspect
    import sysconfig
    import traceback

    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    installed = tuple(p.rstrip("/") + "/" for p in {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
                      if p)
    frames = traceback.extract_tb(exc.__traceback__)
    users = [f for f in frames if not f.filename.startswith(_OURS + installed) and not f.filename.startswith("<")]
    if users:
        return f"{users[-1].filename}:{users[-1].lineno} in {users[-1].name}"
    try:
        code = inspect.unwrap(factory).__code__
        return f"{code.co_filename}:{code.co_firstlineno} in {code.co_name}"
    except AttributeError:
        last = frames[-1] if frames else None
        return f"{last.filename}:{last.lineno} in {last.name}" if last else "unknown location"


def _what_it_did(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    if isinstance(exc, SyntaxError):
        return f"has a syntax error ({exc.msg})"
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still gets named
        message = "<message not printable>"
    return f"raised {type(exc).__name__}: {message}" if message else f"raised {type(exc).__name__}"


def call_factory(name: str, factory, error=UsageError):
    """factory(), with whatever the user's code does wrong (raises, needs an argument, calls sys.exit) turned
    into one `error` naming their file:line (Ctrl-C still interrupts)."""
    try:
        return factory()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a factory's sys.exit must not end memprof
        hint = ""
        if isinstance(exc, TypeError) and exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            hint = "; memprof calls it with no arguments: give a zero-argument factory (e.g. functools.partial)"
        raise error(f"model '{name}': the factory {_what_it_did(exc)} (at {_user_frame(exc, factory)}){hint}") from None


def py_factory(name: str):
    """The callable a py: name names (imported), or a UsageError saying what is wrong and where."""
    if name in _LOCAL_FACTORIES:
        return _LOCAL_FACTORIES[name]
    module, _, attr = name[len("py:"):].rpartition(":")
    if not module or not attr:
        raise UsageError(f"model '{name}': give py:package.module:factory (a callable returning an nn.Module)")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as exc:
        if exc.name == module or (exc.name and module.startswith(exc.name + ".")):
            raise UsageError(f"model '{name}': cannot import {module} ({exc}); put it on PYTHONPATH") from None
        raise UsageError(f"model '{name}': importing {module} failed: {_what_it_did(exc)} (at "
                         f"{_user_frame(exc)})") from None
    except AttributeError:
        raise UsageError(f"model '{name}': {module} has no {attr}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever the module does on import (sys.exit included)
        raise UsageError(f"model '{name}': importing {module} failed: its code {_what_it_did(exc)} (at "
                         f"{_user_frame(exc)})") from None
    if not callable(obj):
        raise UsageError(f"model '{name}': {module}.{attr} is not callable; give a factory returning an nn.Module")
    return obj


def declared_input_shape(net) -> tuple[int, int, int] | None:
    """The input shape a network says it takes: timm's pretrained_cfg, or an `image_size` attribute."""
    cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    size = getattr(net, "image_size", None)
    if isinstance(size, int):
        return (3, size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (3, *size)
    return None


@lru_cache(maxsize=64)
def _info(name: str) -> ModelInfo:
    """What a user's factory makes, built once on the meta device (no memory) to ask its network."""
    import torch

    factory = py_factory(name)
    with torch.device("meta"):
        net = call_factory(name, factory)
    if not isinstance(net, torch.nn.Module):
        raise UsageError(f"model '{name}': the factory returned {type(net).__name__}, not an nn.Module")
    return ModelInfo(name, f"user model {type(net).__qualname__} from {name[3:]}",
                     embedding_modules=family_embedding(type(net).__module__), vit=False, source="py",
                     input_shape=declared_input_shape(net), ckpt_switch=hasattr(net, "set_grad_checkpointing"))


class PySource(ModelSource):
    name = "py"
    rebuilds_alike = False  # the user's code may build something else on the next call

    def local_only(self, name: str) -> bool:
        return name in _LOCAL_FACTORIES or name.startswith("py:@local:")

    def names(self) -> list[str]:
        raise UsageError("--source py: a py: model is a factory of yours (py:package.module:factory), so there is "
                         "no list; use open_clip, timm or torchvision")

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        return _info(name)

    def build(self, info: ModelInfo, num_classes: int):
        return source_model(call_factory(info.name, py_factory(info.name), UserCodeError), info.input_shape)
