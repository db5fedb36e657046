"""Contrastive fine-tuning of both CLIP towers (`--objective contrastive`), as open_clip_train trains them.

The model is open_clip's own CLIP class for the architecture (CLIP, or CustomTextCLIP where the config says
`custom_text`, as open_clip.factory.create_model picks it), built with `output_dict=True` as open_clip_train builds
it; a SigLIP architecture (its config sets `init_logit_bias`) gets the logit scale and bias open_clip_train's
`--siglip` gives it. A step is open_clip_train.train.train_one_epoch's (accum_freq 1): images at the model's size
and random token ids of its text config's context length (ids below its vocab_size), the forward under autocast
for *-amp, open_clip's loss (open_clip.loss.SigLipLoss for SigLIP, ClipLoss with cache_labels otherwise: what
open_clip.factory.create_loss makes for a single process; one loss object for the run, as open_clip_train keeps
one), `sum(losses.values())`, backward (of the scaled loss with fp16-amp's GradScaler), optimizer step, then
`logit_scale.clamp_(0, log(100))` under no_grad. The gradients are cleared with zero_grad(set_to_none=True):
open_clip_train clears them before each forward, after the data is loaded, which holds the same memory as memprof's
after-step (no tensor of the step is alive between the step and the next forward).

`--lock-image` / `--lock-text` call open_clip's own model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
and model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True), open_clip_train's defaults for its flags of
the same names: the locked tower gets no gradient and no optimizer state (logit_scale and logit_bias still train).

A Hugging Face CLIP / SigLIP config (`hf:DIR`, model_type clip or siglip) trains as transformers' own CLIPModel /
SiglipModel with its own loss (`return_loss=True`: clip_loss, or SigLIP's sigmoid loss), the loss alone kept for
backward as the HF Trainer's compute_loss keeps it; its locks freeze `vision_model` + `visual_projection` /
`text_model` + `text_projection` (transformers has no lock methods), and there is no logit-scale clamp (HF's
training code has none).

`test-vit` trains as a tiny CLIP here: its image tower with the text tower TEST_TEXT_CFG (tests).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

from memprof.errors import UsageError
from memprof.optims import step as optim_step

OBJECTIVES = ("classify", "contrastive")  # classify: the image tower with a linear head (memprof's default)
CLASSIFY = OBJECTIVES[0]
TEST_TEXT_CFG = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}  # test-vit's text
EXAMPLES = "e.g. ViT-B-16, ViT-B-16-SigLIP, ViT-SO400M-14-SigLIP-384"


def objective(value, flag: str) -> str:
    """--objective: classify or contrastive (one value), with close matches for a typo."""
    from memprof.spec import _text, parse_names

    names = parse_names(_text(value, flag), flag, OBJECTIVES, "objective")
    if len(names) != 1:
        raise UsageError(f"{flag} {','.join(names)}: give one objective (classify or contrastive)")
    return names[0]


def clip_config(info) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg, ...) a contrastive run builds, or a UsageError
    in one line for a model without a text tower, or one whose loss is not CLIP's or SigLIP's."""
    cfg = None
    if info.name == "test-vit":
        cfg = {"embed_dim": info.embed_dim, "vision_cfg": dict(info.vision_cfg), "text_cfg": dict(TEST_TEXT_CFG)}
    elif info.source == "open_clip" and info.open_clip_config:
        import open_clip

        cfg = copy.deepcopy(open_clip.get_model_config(info.open_clip_config))
    if not cfg or "text_cfg" not in cfg:
        raise UsageError(f"contrastive needs a CLIP/SigLIP model: {info.name} has no text tower (give an open_clip "
                         f"architecture, {EXAMPLES}), or use --objective classify")
    if "multimodal_cfg" in cfg:
        raise UsageError(f"contrastive: {info.name} is a CoCa model, which open_clip_train trains with CoCaLoss "
                         f"(captioning too): not modelled; give a CLIP/SigLIP model ({EXAMPLES})")
    return cfg


def check(info) -> None:
    """A UsageError in one line where `info` cannot train contrastively (clip_config's; for hf: the dual model's)."""
    if info.source == "hf":
        import torch

        from memprof.model_sources.hf import dual_model

        with torch.device("meta"):
            dual_model(info.name)
    else:
        clip_config(info)


def is_siglip(cfg: dict) -> bool:
    """A SigLIP architecture: its config carries the logit bias SigLipLoss needs."""
    return cfg.get("init_logit_bias") is not None


def build_clip(info):
    """open_clip's CLIP (or CustomTextCLIP) for the architecture, on the current default device, randomly
    initialised (no base weights are fetched for a timm or HF tower), returning a dict as open_clip_train's does."""
    import numpy as np
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = clip_config(info)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    if is_siglip(cfg):  # open_clip_train --siglip
        cfg["init_logit_scale"], cfg["init_logit_bias"] = np.log(10), -10
    model = (CustomTextCLIP if custom_text else CLIP)(**cfg, output_dict=True)
    model.contrastive_text = (cfg["text_cfg"].get("context_length", 77), cfg["text_cfg"].get("vocab_size", 49408))
    model.contrastive_siglip = is_siglip(cfg)
    return model


def hf_contrastive(info):
    """transformers' CLIPModel / SiglipModel for an hf: dual config, as contrastive_step trains it: forward(images,
    texts) returns {"loss": the model's own contrastive loss}; `.visual` is the whole network (the hf source's
    embedding names, vision_model.embeddings..., are relative to it)."""
    import torch.nn as nn

    from memprof.model_sources.hf import dual_model

    net, text = dual_model(info.name)
    towers = {"image": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}

    class Model(nn.Module):
        hf_contrastive = True
        contrastive_siglip = False

        def __init__(self):
            super().__init__()
            self.net = net
            self.input_shape = info.input_shape
            self.contrastive_text = text

        @property
        def visual(self):
            return self.net

        def set_grad_checkpointing(self, enable=True):
            self.net.set_grad_checkpointing(enable)

        def _lock(self, tower: str) -> None:
            for name, p in self.net.named_parameters():
                if name.startswith(towers[tower]):
                    p.requires_grad_(False)

        def lock_image_tower(self, unlocked_groups=0, freeze_bn_stats=False):
            self._lock("image")

        def lock_text_tower(self, unlocked_layers=0, freeze_layer_norm=True):
            self._lock("text")

        def forward(self, images, texts):
            return {"loss": self.net(pixel_values=images, input_ids=texts, return_loss=True).loss}

    return Model()


def prepare(spec, optim) -> tuple:
    """(model, frozen parameter names) for harness.prepare under --objective contrastive: the CLIP model, gradient
    checkpointing in both towers (open_clip's model.set_grad_checkpointing, as open_clip_train's
    --grad-checkpointing), the locks, the embedding a freeze-embed optimizer (`optim`) freezes."""
    from memprof.models import freeze_embedding, resolve_model

    info = resolve_model(spec.model, False, spec.freeze, spec.input_shape)
    model = hf_contrastive(info) if info.source == "hf" else build_clip(info)
    if spec.grad_ckpt:
        model.set_grad_checkpointing(True)
    if spec.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if spec.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    model.train()
    frozen = freeze_embedding(model, info) if optim.freeze_embed else []
    return model, sorted({*frozen, *(n for n, p in model.named_parameters() if not p.requires_grad)})


def make_loss(model):
    """open_clip.factory.create_loss's loss for one process: SigLipLoss for SigLIP, else ClipLoss."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if getattr(model, "hf_contrastive", False):
        return _model_loss
    if getattr(model, "contrastive_siglip", False):
        return SigLipLoss(rank=0, world_size=1)
    return ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)


def _model_loss(loss, output_dict=True) -> dict:
    """An HF dual model's own loss, as open_clip's losses return theirs."""
    return {"contrastive_loss": loss}


def steps(model, spec, device, amp, scaler, dtype, in_backward: bool) -> tuple:
    """(batch, step) for harness.run_steps under --objective contrastive: a fresh batch of image-text pairs on the
    device (images in the model's dtype `dtype`), and one step of contrastive_step with the run's one loss object,
    autocast dtype `amp` and GradScaler `scaler`."""
    import torch

    from memprof.models import input_shape

    c, h, w = input_shape(model)
    context, vocab = model.contrastive_text
    step = functools.partial(contrastive_step, loss=make_loss(model), amp=amp, scaler=scaler,
                             device_type=torch.device(device).type, in_backward=in_backward,
                             clear_grads=spec.clear_grads)

    def batch():
        return (torch.randn(spec.batch_size, c, h, w, device=device, dtype=dtype),
                torch.randint(0, vocab, (spec.batch_size, context), device=device))

    return batch, step


def contrastive_step(model, optimizer, inputs, loss, amp=None, scaler=None, device_type: str = "cpu",
                     in_backward: bool = False, clear_grads: str = "after-step", micro: int = 0,
                     micro_steps: int = 1):
    """One step of open_clip_train's loop (accum_freq 1); returns the loss."""
    import torch

    images, texts = inputs
    with torch.autocast(device_type, dtype=amp) if amp else contextlib.nullcontext():
        model_out = model(images, texts)
        losses = loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
    if clear_grads == "before-backward" and not in_backward:
        optimizer.zero_grad(set_to_none=True)
    (scaler.scale(total_loss) if scaler is not None else total_loss).backward()
    if not in_backward:
        optim_step(optimizer, scaler)
    if not getattr(model, "hf_contrastive", False):  # open_clip_train clamps; HF's training code does not
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    if not in_backward and clear_grads == "after-step":
        optimizer.zero_grad(set_to_none=True)
    return total_loss


def plan(opts: dict, models) -> dict:
    """--objective, --lock-image and --lock-text checked against the run's other options and models (memprof.plan):
    the RunSpec fields (none for the default, classify, so its keys stay as they were)."""
    from memprof.options import parse

    chosen = parse("objective", opts.get("objective", CLASSIFY))
    locks = {name: bool(opts.get(name)) for name in ("lock_image", "lock_text")}
    if chosen == CLASSIFY:
        for name, on in locks.items():
            if on:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} applies to --objective contrastive (both CLIP towers trained with open_clip's "
                                 f"loss); the classify objective trains the image tower alone: add --objective "
                                 f"contrastive, or drop {flag}", option=name)
        return {}
    for info in models:
        try:
            check(info)
        except UsageError as exc:
            exc.option = "models"
            raise
    conflicts = (
        ("resident", parse("resident", opts.get("resident", "tower")) != ["tower"],
         "--resident clip keeps a frozen text tower beside the classifier; contrastive trains it: drop --resident"),
        ("train", opts.get("train", "all") != "all",
         "--train picks what trains in the classifier; for contrastive use --lock-image / --lock-text"),
        ("grad_accum", max(parse("grad_accum", opts.get("grad_accum", "1"))) > 1,
         "open_clip_train's --accum-freq caches features and re-runs each forward (not plain accumulation): not "
         "modelled, use --grad-accum 1"),
        ("parallel", parse("parallel", opts.get("parallel", "none")) != ["none"],
         "the gathered features of a data-parallel contrastive loss are not modelled: use --parallel none"),
        ("peft", parse("peft", opts.get("peft", "off")) != ["off"],
         "peft's adapters are placed on the classifier's image tower, not on both towers: not modelled, use --peft off"),
        ("pretrained", bool(opts.get("pretrained")),
         "whole-CLIP weights are not loaded (weights do not change the memory): drop --pretrained"),
    )
    for name, bad, why in conflicts:
        if bad:
            raise UsageError(f"--objective contrastive: {why}", option=name)
    return {"objective": chosen, **locks}
