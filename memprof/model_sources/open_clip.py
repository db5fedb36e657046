"""The open_clip source: memprof's own names (the seed paper's towers, the test model) and every open_clip
architecture name, written bare (`vit-h-14`, `ViT-B-32`), each built as open_clip's own image tower (from its
JSON architecture config) with a new linear classification head.

A tower is open_clip's VisionTransformer, so the layers, attention code and gradient checkpointing are exactly
what a user of open_clip trains. Each memprof name declares its embedding layer as the seed paper's Appendix A
does: for CLIP ViTs the patch embedding (`conv1`) and the layer norm after it (`ln_pre`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from memprof.errors import UsageError, unknown_name
from memprof.model_sources.base import CLIP_VIT_EMBEDDING, ModelInfo, ModelSource

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

# open_clip architecture names the simulation cannot predict: name -> (one-line reason, whether the `cpu`
# backend runs it). Filled from the coverage benchmark (benchmarks/open_clip_coverage.py); every other
# name in open_clip.list_models() predicts.
UNSUPPORTED: dict[str, tuple[str, bool]] = {}


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


def cached_pretrained_file(info: ModelInfo, tag: str) -> str:
    """The local file of open_clip's published weights `tag` for this architecture (open_clip's and Hugging
    Face's caches; no model hub is reachable)."""
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


class OpenClipSource(ModelSource):
    name = "open_clip"
    bare = True
    takes_input_shape = False  # a tower takes the image size of its config (positional embeddings)

    def names(self) -> list[str]:
        return listed_models()[0]

    def owns(self, name: str) -> bool:
        return name in REGISTRY or name in UNSUPPORTED or name in open_clip_names()

    def resolve(self, name: str, simulated: bool = True) -> ModelInfo:
        """A registered memprof name, or any open_clip architecture name (ViT-B-32, ViT-g-14, ...).

        `simulated`: the simulation will trace it, so a name in UNSUPPORTED raises a UsageError with its reason,
        suggesting `--backend cpu` where that runs it."""
        if name in REGISTRY:
            return REGISTRY[name]
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

    def check_simulatable(self, name: str) -> None:
        if name in UNSUPPORTED:
            self.resolve(name, simulated=True)

    def grad_ckpt_reason(self, info: ModelInfo) -> str | None:
        if info.vit:
            return None
        return f"{info.name} is not an open_clip VisionTransformer: its gradient checkpointing is not supported"

    def build(self, info: ModelInfo, num_classes: int):
        """open_clip's image tower plus a new randomly initialised linear head."""
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

    def pretrained_file(self, info: ModelInfo, tag: str) -> str:
        return cached_pretrained_file(info, tag)

    def text_config(self, info: ModelInfo) -> tuple[int, dict, bool]:
        """(embed_dim, text_cfg, quick_gelu) of an open_clip CLIP model, or a UsageError for a model without one."""
        import open_clip

        cfg = open_clip.get_model_config(info.open_clip_config) if info.open_clip_config else None
        if not cfg or "text_cfg" not in cfg:
            return super().text_config(info)
        return cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False)

    def text_tower(self, info: ModelInfo):
        """CLIP's text tower and logit scale for an open_clip architecture, frozen: what a process that keeps the
        whole CLIP model on the GPU (fine-tuning only the image tower) holds besides it."""
        import torch
        import torch.nn as nn
        from open_clip.model import _build_text_tower

        embed_dim, text_cfg, quick_gelu = self.text_config(info)

        class TextSide(nn.Module):
            def __init__(self):
                super().__init__()
                self.transformer = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
                self.logit_scale = nn.Parameter(torch.ones([]))

        side = TextSide()
        side.requires_grad_(False)
        return side
