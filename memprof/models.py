"""Model registry: memprof names onto open_clip image towers, each with a new linear classification head.

A model is open_clip's own VisionTransformer (built from open_clip's JSON architecture config), so the
layers, attention code and gradient checkpointing are exactly what a user of open_clip trains. Each entry
declares its embedding layer as the seed paper's Appendix A does: for CLIP ViTs the patch embedding
(`conv1`) and the layer norm after it (`ln_pre`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from memprof.errors import UsageError, unknown_name

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


def listed_models() -> tuple[list[str], dict[str, str]]:
    """What `memprof list models` shows besides REGISTRY: (the open_clip names every backend runs, in
    open_clip's order; {name: reason} for the ones the simulation cannot predict). Together they are
    exactly open_clip.list_models()."""
    names = open_clip_names()
    return [n for n in names if n not in UNSUPPORTED], {n: UNSUPPORTED[n][0] for n in names if n in UNSUPPORTED}


def resolve_model(name: str, backend: str | None = "simulate") -> ModelInfo:
    """A registered memprof name, or any open_clip architecture name (ViT-B-32, ViT-g-14, ...).

    `backend` is the backend that will run it (simulate, cpu, cuda; None: no check): a name in
    UNSUPPORTED raises a UsageError with its reason for the simulation, suggesting `--backend cpu` where
    that runs it.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name in UNSUPPORTED and backend == "simulate":
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


def parse_models(text: str, backend: str | None = "simulate") -> list[ModelInfo]:
    """A comma-separated list; `paper` is the three Table 4 models. `backend` as for resolve_model."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--models is empty: give model names, e.g. --models vit-b-16,vit-l-14 or --models paper")
    out: list[ModelInfo] = []
    for n in names:
        for m in (PAPER_MODELS if n == "paper" else (n,)):
            info = resolve_model(m, backend)
            if info not in out:
                out.append(info)
    return out


def build_model(info: ModelInfo, num_classes: int):
    """The image tower plus a new randomly initialised linear head, on the current default device.

    Built under FakeTensorMode (the simulation) this allocates no memory and takes well under a second
    even for ViT-H/14.
    """
    import open_clip
    import torch.nn as nn
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
    size = model.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def embedding_parameters(model, info: ModelInfo) -> dict:
    """The parameters freeze-embed freezes, by name: everything under the declared embedding modules."""
    out = {}
    for mod_name in info.embedding_modules:
        module = getattr(model.visual, mod_name, None)
        if module is None:
            raise ValueError(f"{info.name}: declared embedding module visual.{mod_name} does not exist")
        out.update({f"visual.{mod_name}.{n}": p for n, p in module.named_parameters()})
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
