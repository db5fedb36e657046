"""Models: a name (`vit-h-14`, `ViT-B-32`, `timm:NAME`, `torchvision:NAME`, `py:package.module:factory`, or a
name of a source registered from outside) resolved through its model source (memprof.model_sources: one module per
source behind one protocol, found by its registry) into a ModelInfo, and built as a module whose `.visual` is the
network, so freezing, gradient checkpointing and weights work the same way for every source.

Each model declares its embedding layer (the patch embedding and what follows it); `--freeze GLOB[,GLOB]`
overrides the declaration for any model, `--input-shape` the input of a source that takes one. This module is the
front the rest of memprof calls; it asks sources, never their names.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import replace

from memprof.errors import UsageError
from memprof.model_sources.base import ModelInfo
from memprof.model_sources.open_clip import PAPER_MODELS
from memprof.model_sources.registry import get as get_source, source_of


def source_names(name: str, pattern: str | None = None) -> list[str]:
    """Architecture names one source accepts (`memprof list models --source NAME`), those matching a glob if given;
    an unknown source is a UsageError with close matches."""
    return [n for n in get_source(name).names() if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def source_prefix(name: str) -> str:
    """How a source's names are written: `timm:` (`timm:NAME`), or nothing for a bare source (open_clip)."""
    return "" if get_source(name).bare else f"{name}:"


def takes_input_shape(info: ModelInfo) -> bool:
    """Whether `--input-shape` sets this model's input (an open_clip tower keeps its config's image size)."""
    return get_source(info.source).takes_input_shape


def rebuilds_alike(name: str) -> bool:
    """Whether a model name builds the same network every time (the simulation may then trace its forward once for
    every optimizer); not a user's factory."""
    return source_of(name).rebuilds_alike


def local_only(name: str) -> bool:
    """Whether a model name is known in this process alone (a factory handed to the Python API)."""
    return source_of(name).local_only(name)


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


def resolve_model(name: str, simulated: bool = True, freeze: str | None = None,
                  input_shape: str | None = None) -> ModelInfo:
    """A model with its overrides: `--freeze` globs replace the declared embedding, `--input-shape` the
    input shape of a source that takes one (an open_clip tower keeps its config's image size). A model of such a
    source must end with an input shape (its own, --input-shape, or its source's default).

    `simulated`: the simulation will trace it, so a name it cannot predict is a UsageError with the reason
    (memprof.backends.simulate checks with check_simulatable)."""
    info = source_of(name).resolve(name, simulated)  # the source its prefix names, or the bare one that owns it
    origin = get_source(info.source)
    if freeze is not None:
        info = replace(info, embedding_modules=parse_freeze(freeze))
    if input_shape is not None:
        shape = parse_input_shape(input_shape)
        if origin.takes_input_shape:
            info = replace(info, input_shape=shape)
    if origin.takes_input_shape and info.input_shape is None:
        if origin.default_input_shape is None:
            raise UsageError(f"model '{name}' does not say what input it takes: add --input-shape, e.g. "
                             f"--input-shape 3x224x224")
        info = replace(info, input_shape=origin.default_input_shape)
    return info


def check_simulatable(name: str) -> None:
    """A UsageError for a model the simulation cannot predict (open_clip's UNSUPPORTED), with its reason."""
    source_of(name).check_simulatable(name)


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


def build_model(info: ModelInfo, num_classes: int):
    """The model its source builds, on the current default device: the network as `.visual` with a new randomly
    initialised classification head (an open_clip tower plus a linear head; a timm/torchvision model with its
    own head for `num_classes`; a user's model as its factory makes it).

    Built under FakeTensorMode (the simulation) this allocates no memory and takes well under a second
    even for ViT-H/14.
    """
    return get_source(info.source).build(info, num_classes)


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

def read_pretrained(info: ModelInfo, pretrained: str) -> dict:
    """The image-tower state dict from a local file, or the file the model's source has for a tag (open_clip's:
    its and Hugging Face's caches)."""
    import os

    import torch

    path = pretrained if os.path.sep in pretrained or os.path.exists(pretrained) else None
    if path is None:
        path = get_source(info.source).pretrained_file(info, pretrained)
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
    return get_source(info.source).text_config(info)


def build_text_tower(info: ModelInfo):
    """CLIP's text tower and logit scale, frozen (`--resident clip`), from the model's source."""
    return get_source(info.source).text_tower(info)


# --- partial fine-tuning (`--train`): where each family's residual blocks, final norm and head are ----------------

# Per family (the module that defines the network's class, as the embedding's FAMILY_EMBEDDING is keyed), names
# relative to the model memprof builds: `visual.` is the network, a wrapper's own modules (open_clip's linear
# `head`) are named without it. blocks: the nn.ModuleList of residual blocks, in order (None: the model cannot
# say: a ResNet's stages are four lists); tail: what follows the blocks before the head (final norms, open_clip's
# output projection); head: the classification head.
FAMILY_LAYOUT = {
    "open_clip.transformer": {"blocks": "visual.transformer.resblocks", "tail": ("visual.ln_post", "visual.proj"),
                              "head": ("head",)},
    "open_clip.modified_resnet": {"blocks": None, "tail": (), "head": ("head",)},
    "open_clip.timm_model": {"blocks": None, "tail": (), "head": ("head",)},
    "timm.models.vision_transformer": {"blocks": "visual.blocks", "tail": ("visual.norm", "visual.fc_norm"),
                                       "head": ("visual.head",)},
    "timm.models.convnext": {"blocks": None, "tail": (), "head": ("visual.head",)},
    "timm.models.resnet": {"blocks": None, "tail": (), "head": ("visual.fc",)},
    "torchvision.models.vision_transformer": {"blocks": "visual.encoder.layers", "tail": ("visual.encoder.ln",),
                                              "head": ("visual.heads",)},
    "torchvision.models.convnext": {"blocks": None, "tail": (), "head": ("visual.classifier",)},
    "torchvision.models.resnet": {"blocks": None, "tail": (), "head": ("visual.fc",)},
}


def layout(model) -> dict | None:
    """The family layout of a built model (FAMILY_LAYOUT), or None where memprof does not know the family (a
    `py:` factory's network)."""
    return FAMILY_LAYOUT.get(type(model.visual).__module__)


def _network_name(name: str) -> str:
    """A name of the built model as --freeze and --train globs read it: relative to the network (`visual.`
    dropped), a wrapper's own modules (open_clip's `head`) as they are."""
    return name[len("visual."):] if name.startswith("visual.") else ("" if name == "visual" else name)


def _under(params: dict, prefixes) -> set:
    """Names of the parameters at or under any of the full names `prefixes`."""
    return {n for n in params for pre in prefixes if n == pre or n.startswith(pre + ".")}


def trained_parameters(model, info: ModelInfo, train: str) -> set:
    """Full names of the parameters `--train` trains: all of them, the head, the last N blocks with the tail and
    the head, or those at or under modules (or parameters) matching a glob. What the model cannot say, or a glob
    that matches nothing, is a UsageError in one line."""
    from memprof.spec import TRAIN_HEAD, TRAIN_LAST, TRAIN_WHOLE

    params = dict(model.named_parameters())
    if train == TRAIN_WHOLE:
        return set(params)
    known = layout(model)
    if train == TRAIN_HEAD or train.startswith(TRAIN_LAST):
        if known is None or (train != TRAIN_HEAD and known["blocks"] is None):
            what = "its classification head is" if train == TRAIN_HEAD else "its residual blocks are (as one list)"
            raise UsageError(f"--train {train}: {info.name} ({type(model.visual).__name__}) does not say where "
                             f"{what}: name the modules that train with globs instead, e.g. --train "
                             f"'{_example_glob(model)}'")
        chosen = set(known["head"])
        if train.startswith(TRAIN_LAST):
            n = int(train[len(TRAIN_LAST):])
            blocks = dict(model.named_modules())[known["blocks"]]
            if n > len(blocks):
                raise UsageError(f"--train {train}: {info.name} has {len(blocks)} blocks; use --train "
                                 f"last:{len(blocks)} or fewer (or all)")
            chosen |= {f"{known['blocks']}.{i}" for i in range(len(blocks) - n, len(blocks))} | set(known["tail"])
        return _under(params, chosen)
    modules = {_network_name(n): n for n, _ in model.named_modules() if n not in ("", "visual")}
    relative = {_network_name(n): n for n in params}
    out: set = set()
    for glob in (g.strip() for g in train.split(",") if g.strip()):
        hits = [full for rel, full in modules.items() if fnmatch.fnmatchcase(rel, glob)]
        direct = [full for rel, full in relative.items() if fnmatch.fnmatchcase(rel, glob)]
        if not hits and not direct:
            import difflib

            close = [n for n in modules if fnmatch.fnmatchcase(n, "*" + glob)][:3] or difflib.get_close_matches(
                glob, list(modules) + list(relative), n=3, cutoff=0.5)  # the glob anchored anywhere, else spelling
            hint = (f"did you mean {', '.join(close)}?" if close else
                    f"top-level modules: {', '.join(n for n in modules if '.' not in n)}")
            raise UsageError(f"--train '{glob}' matches no module or parameter of {info.name} ({hint}); fix --train")
        out |= _under(params, hits) | set(direct)
    return out


def _example_glob(model) -> str:
    """A --train glob that names the network's last top-level module: what a linear probe trains in most models."""
    names = [n for n, _ in model.visual.named_children()]
    return names[-1] if names else "head"


def train_only(model, info: ModelInfo, train: str) -> list[str]:
    """requires_grad=False on every parameter `--train` does not train; returns their names."""
    keep = trained_parameters(model, info, train)
    frozen = []
    for name, p in model.named_parameters():
        if name not in keep:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
