"""Model registry: memprof names onto open_clip image towers, each with a new linear classification head,
and model sources: `timm:<name>`, `torchvision:<name>` and `py:package.module:factory` (a user's callable).

A registry model is open_clip's own VisionTransformer (built from open_clip's JSON architecture config), so
the layers, attention code and gradient checkpointing are exactly what a user of open_clip trains. Each
entry declares its embedding layer as the seed paper's Appendix A does: for CLIP ViTs the patch embedding
(`conv1`) and the layer norm after it (`ln_pre`). Other sources declare theirs per family (FAMILY_EMBEDDING);
`--freeze GLOB[,GLOB]` overrides the declaration for any model. Every model is built as a module whose
`.visual` is the network (the tower, or the whole timm/torchvision/user model), so freezing, gradient
checkpointing and weights work the same way for all of them.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import sys
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from memprof.errors import UsageError, UserCodeError, unknown_name

CLIP_VIT_EMBEDDING = ("conv1", "ln_pre")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    open_clip_config: str | None = None  # an open_clip architecture name (model_configs/<name>.json)
    vision_cfg: tuple = ()  # (key, value) pairs of a vision config, for models open_clip does not ship
    embed_dim: int = 0  # output width of the tower when vision_cfg is given
    embedding_modules: tuple[str, ...] = CLIP_VIT_EMBEDDING  # submodules of the tower that freeze-embed freezes
    paper: bool = False  # one of the seed paper's Table 4 models
    vit: bool = True  # open_clip's VisionTransformer (its set_grad_checkpointing works; ResNet/timm towers differ)
    source: str = "open_clip"  # open_clip, timm, torchvision or py (a user's factory)
    input_shape: tuple[int, int, int] | None = None  # (channels, height, width); None: the tower's image_size
    ckpt_switch: bool | None = None  # has set_grad_checkpointing (None: `vit` says, for open_clip towers)

    @property
    def grad_ckpt_reason(self) -> str | None:
        """Why gradient checkpointing cannot run on this model (None: it can, through the model's own switch)."""
        if self.source == "open_clip":
            return None if self.vit else (f"{self.name} is not an open_clip VisionTransformer: its gradient "
                                          f"checkpointing is not supported")
        return None if self.ckpt_switch else (f"{self.name} has no gradient-checkpointing switch "
                                              f"(set_grad_checkpointing)")


REGISTRY: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo("vit-b-16", "CLIP ViT-B/16 image tower (open_clip ViT-B-16), 86M parameters",
              open_clip_config="ViT-B-16", paper=True),
    ModelInfo("vit-l-14", "CLIP ViT-L/14 image tower (open_clip ViT-L-14), 304M parameters",
              open_clip_config="ViT-L-14", paper=True),
    ModelInfo("vit-h-14", "OpenCLIP ViT-H/14 image tower (open_clip ViT-H-14), 632M parameters",
              open_clip_config="ViT-H-14", paper=True),
    ModelInfo("test-vit", "tiny open_clip VisionTransformer for tests: 32 px, patch 8, width 64, 2 layers",
              vision_cfg=(("image_size", 32), ("patch_size", 8), ("width", 64), ("layers", 2),
                          ("head_width", 32), ("mlp_ratio", 4.0)), embed_dim=32),
)}

PAPER_MODELS = tuple(m.name for m in REGISTRY.values() if m.paper)


@lru_cache(maxsize=1)
def open_clip_names() -> tuple[str, ...]:
    """open_clip.list_models(), read as open_clip's factory reads it (model_configs/*.json holding embed_dim,
    vision_cfg and text_cfg, in its natural order) without importing open_clip and torch, so a misspelled
    name is refused at once. Once open_clip is imported, its own list (configs added at run time included)."""
    if "open_clip" not in sys.modules:
        found = importlib.util.find_spec("open_clip")
        if found is not None and found.submodule_search_locations:
            names = []
            for path in sorted(Path(found.submodule_search_locations[0], "model_configs").glob("*.json")):
                with open(path, encoding="utf-8") as fh:
                    config = json.load(fh)
                if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
                    names.append(path.stem)
            return tuple(sorted(names, key=lambda n: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", n.lower())]))
    import open_clip

    return tuple(open_clip.list_models())


# open_clip architecture names the simulation cannot predict: name -> (one-line reason, whether the `cpu`
# backend runs it). Filled from the coverage benchmark (benchmarks/open_clip_coverage.py); every other
# name in open_clip.list_models() predicts.
UNSUPPORTED: dict[str, tuple[str, bool]] = {}



def unsupported_table_problems(table: dict | None = None) -> list[str]:
    """What is wrong with the UNSUPPORTED table (or `table`): names open_clip does not list, memprof's own
    names (which always run), entries without a one-line reason or without the cpu flag. Empty when sound."""
    table = UNSUPPORTED if table is None else table
    problems = []
    for name, entry in table.items():
        if name in REGISTRY:
            problems.append(f"{name}: a memprof model, which always runs")
        elif name not in open_clip_names():
            problems.append(f"{name}: not an open_clip architecture name (stale entry)")
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], bool)):
            problems.append(f"{name}: entry must be (reason, cpu backend runs it)")
        elif not isinstance(entry[0], str) or not entry[0].strip() or "\n" in entry[0]:
            problems.append(f"{name}: reason must be one non-empty line")
    return problems


def source_names(source: str, pattern: str | None = None) -> list[str]:
    """Architecture names one source accepts (timm, torchvision, open_clip), those matching a glob if given."""
    if source == "timm":
        import timm

        names = timm.list_models()
    elif source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
    elif source == "open_clip":
        names = listed_models()[0]
    else:
        raise UsageError(f"--source {source}: use timm, torchvision or open_clip")
    return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def listed_models() -> tuple[list[str], dict[str, str]]:
    """What `memprof list models` shows besides REGISTRY: (the open_clip names every backend runs, in
    open_clip's order; {name: reason} for the ones the simulation cannot predict). Together they are
    exactly open_clip.list_models()."""
    names = open_clip_names()
    return [n for n in names if n not in UNSUPPORTED], {n: UNSUPPORTED[n][0] for n in names if n in UNSUPPORTED}


SOURCES = ("open_clip", "timm", "torchvision", "py")

# the embedding layer freeze-embed freezes, per family (the module that defines the model class): globs over
# the network's module (or parameter) names
FAMILY_EMBEDDING = {
    "timm.models.vision_transformer": ("patch_embed", "norm_pre"),
    "timm.models.convnext": ("stem",),
    "timm.models.resnet": ("conv1", "bn1"),
    "torchvision.models.vision_transformer": ("conv_proj",),
    "torchvision.models.convnext": ("features.0",),
    "torchvision.models.resnet": ("conv1", "bn1"),
}
DEFAULT_INPUT_SHAPE = (3, 224, 224)  # torchvision's classification models (their weights' crop size)


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """`3x224x224` -> (3, 224, 224)."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(text))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise UsageError(f"--input-shape '{text}': give channels x height x width, e.g. --input-shape 3x224x224")
    return tuple(int(g) for g in m.groups())


def parse_freeze(text: str) -> tuple[str, ...]:
    globs = tuple(g.strip() for g in str(text).split(",") if g.strip())
    if not globs:
        raise UsageError(f"--freeze '{text}': give module-name globs, e.g. --freeze 'patch_embed,norm_pre'")
    return globs


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


_OURS = tuple({str(Path(__file__).parent) + "/", str(Path(__file__).resolve().parent) + "/", "<frozen "})


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


def _py_factory(name: str):
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


@lru_cache(maxsize=64)
def _source_info(name: str) -> ModelInfo:
    """What a timm:/torchvision:/py: model is, without building it where the source can say (timm,
    torchvision); a user's factory is built once on the meta device (no memory) to ask its network."""
    source, _, arch = name.partition(":")
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise unknown_name("timm model", arch, timm.list_models(), "memprof list models --source timm")
        family = timm.models.model_entrypoint(arch).__module__
        cfg = timm.models.get_pretrained_cfg(arch)
        shape = tuple(cfg.input_size) if cfg is not None and cfg.input_size else DEFAULT_INPUT_SHAPE
        return ModelInfo(name, f"timm {arch} ({family.rsplit('.', 1)[-1]})", embedding_modules=FAMILY_EMBEDDING.get(
            family, ()), vit=False, source="timm", input_shape=shape, ckpt_switch=True)
    if source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if arch not in names:
            raise unknown_name("torchvision model", arch, names, "memprof list models --source torchvision")
        family = torchvision.models.get_model_builder(arch).__module__
        return ModelInfo(name, f"torchvision {arch} ({family.rsplit('.', 1)[-1]})", embedding_modules=FAMILY_EMBEDDING.get(
            family, ()), vit=False, source="torchvision", input_shape=None, ckpt_switch=False)
    import torch

    factory = _py_factory(name)
    with torch.device("meta"):
        net = call_factory(name, factory)
    if not isinstance(net, torch.nn.Module):
        raise UsageError(f"model '{name}': the factory returned {type(net).__name__}, not an nn.Module")
    family = type(net).__module__
    return ModelInfo(name, f"user model {type(net).__qualname__} from {name[3:]}",
                     embedding_modules=FAMILY_EMBEDDING.get(family, ()), vit=False, source="py",
                     input_shape=_declared_input_shape(net), ckpt_switch=hasattr(net, "set_grad_checkpointing"))


def _declared_input_shape(net) -> tuple[int, int, int] | None:
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


def resolve_model(name: str, simulated: bool = True, freeze: str | None = None,
                  input_shape: str | None = None) -> ModelInfo:
    """A model with its overrides: `--freeze` globs replace the declared embedding, `--input-shape` the
    input shape of a timm/torchvision/py model (an open_clip tower keeps its config's image size). A timm:/torchvision:/py: model must end with an input shape (its own or --input-shape)."""
    info = _resolve(name, simulated)
    if freeze is not None:
        info = replace(info, embedding_modules=parse_freeze(freeze))
    if input_shape is not None:  # open_clip towers take the image size of their config (positional embeddings)
        shape = parse_input_shape(input_shape)
        if info.source != "open_clip":
            info = replace(info, input_shape=shape)
    if info.source == "torchvision" and info.input_shape is None:
        info = replace(info, input_shape=DEFAULT_INPUT_SHAPE)
    if info.source == "py" and info.input_shape is None:
        raise UsageError(f"model '{name}' does not say what input it takes: add --input-shape, e.g. "
                         f"--input-shape 3x224x224")
    return info


def check_simulatable(name: str) -> None:
    """A UsageError for an open_clip architecture the simulation cannot predict (UNSUPPORTED), with its reason."""
    if name in UNSUPPORTED:
        _resolve(name, simulated=True)


def _resolve(name: str, simulated: bool = True) -> ModelInfo:
    """A registered memprof name, or any open_clip architecture name (ViT-B-32, ViT-g-14, ...), or a source
    prefix (timm:, torchvision:, py:).

    `simulated`: the simulation will trace it, so a name in UNSUPPORTED raises a UsageError with its reason,
    suggesting `--backend cpu` where that runs it (memprof.backends.simulate checks with check_simulatable).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name.split(":", 1)[0] in SOURCES[1:] and ":" in name:
        return _source_info(name)
    if name in UNSUPPORTED and simulated:
        reason, cpu_runs = UNSUPPORTED[name]
        hint = ("use --backend cpu (measures on the CPU) or --backend cuda" if cpu_runs
                else "only --backend cuda (on a GPU) runs it")
        raise UsageError(f"model '{name}' cannot be predicted by the simulation: {reason}; {hint}")
    if name in open_clip_names():
        import open_clip

        vision = open_clip.get_model_config(name)["vision_cfg"]
        is_vit = isinstance(vision.get("layers"), int) and not vision.get("timm_model_name")
        return ModelInfo(name, f"open_clip {name} image tower", open_clip_config=name,
                         embedding_modules=CLIP_VIT_EMBEDDING if is_vit else (), vit=is_vit)
    raise unknown_name("model", name, list(REGISTRY) + list(open_clip_names()), "memprof list models")


def parse_models(text: str, simulated: bool = True, freeze: str | None = None,
                 input_shape: str | None = None) -> list[ModelInfo]:
    """A comma-separated list; `paper` is the three Table 4 models. `simulated`, `freeze` and `input_shape` as
    for resolve_model."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--models is empty: give model names, e.g. --models vit-b-16,vit-l-14 or --models paper")
    out: list[ModelInfo] = []
    for n in names:
        for m in (PAPER_MODELS if n == "paper" else (n,)):
            info = resolve_model(m, simulated, freeze, input_shape)
            if info not in out:
                out.append(info)
    return out


def _timm_model(info: ModelInfo, arch: str, num_classes: int):
    """timm's model at the input shape asked: a shape other than its pretrained config's is passed as `img_size=`
    (and `in_chans=`), which timm's ViT-style families take (positional embeddings and patch grid built for that
    size); a family whose constructor takes no img_size (CNNs) is built as it is and takes any size. One that fixes
    its size otherwise fails its first forward with timm's own message."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    native = tuple(cfg.input_size) if cfg is not None and cfg.input_size else None
    kwargs = {}
    if info.input_shape is not None and native is not None and tuple(info.input_shape) != native:
        if tuple(info.input_shape[1:]) != native[1:]:
            kwargs["img_size"] = tuple(info.input_shape[1:])
        if info.input_shape[0] != native[0]:
            kwargs["in_chans"] = info.input_shape[0]
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        kwargs.pop("img_size")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def build_model(info: ModelInfo, num_classes: int):
    """The image tower plus a new randomly initialised linear head, on the current default device (a
    timm/torchvision model with its own head for `num_classes`; a user's model as its factory makes it).

    Built under FakeTensorMode (the simulation) this allocates no memory and takes well under a second
    even for ViT-H/14.
    """
    import torch.nn as nn

    if info.source != "open_clip":
        class SourceModel(nn.Module):
            """A timm, torchvision or user network as `.visual`, with the input shape it takes."""

            def __init__(self, net, input_shape):
                super().__init__()
                self.visual = net
                self.input_shape = input_shape

            def forward(self, images):
                return self.visual(images)

        arch = info.name.split(":", 1)[1]
        if info.source == "timm":
            net = _timm_model(info, arch, num_classes)
        elif info.source == "torchvision":
            import torchvision

            net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        else:
            net = call_factory(info.name, _py_factory(info.name), UserCodeError)
        return SourceModel(net, info.input_shape)

    import open_clip
    from open_clip.model import _build_vision_tower  # open_clip's own tower builder (no text tower)

    if info.open_clip_config:
        cfg = open_clip.get_model_config(info.open_clip_config)
        embed_dim, vision_cfg = cfg["embed_dim"], cfg["vision_cfg"]
        quick_gelu = cfg.get("quick_gelu", False)
    else:
        embed_dim, vision_cfg, quick_gelu = info.embed_dim, dict(info.vision_cfg), False

    class ImageClassifier(nn.Module):
        """open_clip image tower -> embedding -> linear head (the paper fine-tunes the image tower only)."""

        def __init__(self):
            super().__init__()
            self.visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
            self.head = nn.Linear(embed_dim, num_classes)

        def forward(self, images):
            features = self.visual(images)
            if isinstance(features, tuple):  # towers with output_tokens (CoCa): (pooled, tokens)
                features = features[0]
            return self.head(features)

    return ImageClassifier()


def input_size(model) -> tuple[int, int]:
    return input_shape(model)[1:]


def input_shape(model) -> tuple[int, int, int]:
    """(channels, height, width) of one input image."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    size = model.visual.image_size
    return (3, size, size) if isinstance(size, int) else (3, *size)


def embedding_parameters(model, info: ModelInfo) -> dict:
    """The parameters freeze-embed freezes, by name: everything under the modules (or the parameters) whose
    names, relative to the network, match a declared glob. A glob that matches nothing is an error."""
    modules = dict(model.visual.named_modules())
    params = dict(model.visual.named_parameters())
    out = {}
    for glob in info.embedding_modules:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, glob)]
        direct = [n for n in params if fnmatch.fnmatchcase(n, glob)]
        if not hits and not direct:
            raise UsageError(f"{info.name}: embedding glob '{glob}' matches no module or parameter of the network "
                             f"(top-level modules: {', '.join(n for n, _ in model.visual.named_children())}); fix "
                             f"--freeze")
        for n in hits:
            out.update({f"visual.{n}.{k}": p for k, p in modules[n].named_parameters()})
        out.update({f"visual.{n}": params[n] for n in direct})
    return out


def freeze_embedding(model, info: ModelInfo) -> list[str]:
    """requires_grad=False on exactly the embedding parameters; returns their names."""
    params = embedding_parameters(model, info)
    for p in params.values():
        p.requires_grad_(False)
    return sorted(params)


# --- pretrained weights: local files and caches only (no model hub is reachable) -----------------------

def _cached_pretrained_file(info: ModelInfo, tag: str) -> str:
    import os

    import open_clip

    if not info.open_clip_config:
        raise UsageError(f"--pretrained {tag}: {info.name} has no published weights; pass a local file path")
    cfg = open_clip.get_pretrained_cfg(info.open_clip_config, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(info.open_clip_config)
        raise UsageError(f"--pretrained {tag}: not a known tag for {info.open_clip_config} "
                         f"(known: {', '.join(tags) or 'none'}), or pass a local file path")
    candidates = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub"].rstrip("/")
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str):
                candidates.append(hit)
    if cfg.get("url"):
        candidates.append(os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(cfg["url"]))))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UsageError(f"--pretrained {tag}: weights for {info.open_clip_config} are not in the local cache and no "
                     f"model hub is reachable; pass a local file with --pretrained PATH")


def read_pretrained(info: ModelInfo, pretrained: str) -> dict:
    """The image-tower state dict from a local file, or from open_clip/Hugging Face caches for a tag."""
    import os

    import torch

    path = pretrained if os.path.sep in pretrained or os.path.exists(pretrained) else None
    if path is None:
        path = _cached_pretrained_file(info, pretrained)
    if not os.path.isfile(path):
        raise UsageError(f"--pretrained {pretrained}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any unreadable file is bad input; say what the loader said
        raise UsageError(f"--pretrained {pretrained}: not loadable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); give a state_dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"--pretrained {pretrained}: not a state_dict; give a state_dict saved with torch.save")
    if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def check_pretrained(model, state: dict, source: str) -> None:
    """Keys and shapes must match the tower exactly; the error names the first mismatch."""
    own = model.visual.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                 else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise UsageError(f"--pretrained {source}: does not match this architecture ({first}); "
                         f"pick the file saved from the same open_clip model")


def text_config(info: ModelInfo) -> tuple[int, dict, bool]:
    """(embed_dim, text_cfg, quick_gelu) of an open_clip CLIP model, or a UsageError for a model without one."""
    import open_clip

    cfg = open_clip.get_model_config(info.open_clip_config) if info.open_clip_config else None
    if not cfg or "text_cfg" not in cfg:
        raise UsageError(f"--resident clip: {info.name} is not an open_clip CLIP model with a text tower; use "
                         f"--resident tower")
    return cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False)


def build_text_tower(info: ModelInfo):
    """CLIP's text tower and logit scale for an open_clip architecture, frozen: what a process that keeps the
    whole CLIP model on the GPU (fine-tuning only the image tower) holds besides it."""
    import torch
    import torch.nn as nn
    from open_clip.model import _build_text_tower

    embed_dim, text_cfg, quick_gelu = text_config(info)

    class TextSide(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
            self.logit_scale = nn.Parameter(torch.ones([]))

    side = TextSide()
    side.requires_grad_(False)
    return side
