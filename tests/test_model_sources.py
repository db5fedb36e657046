"""Model sources beyond open_clip: timm:, torchvision:, py:package.module:factory; the embedding each family
declares and --freeze; input shapes; gradient checkpointing through the model's own switch; a model that
cannot be traced; `memprof list models --source`."""

import json

import pytest
import torch

import memprof
from memprof.cli import main
from memprof.errors import UsageError
from memprof.models import build_model, freeze_embedding, parse_input_shape, resolve_model
from memprof.plan import execute, plan_run, run_options

USER_MODELS = '''
import torch


class Untraceable(torch.nn.Module):
    """Reads a value out of a tensor in forward (data under fake tensors)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        scale = float(x.abs().max().item())
        return self.lin(x.flatten(1)) / (1.0 + scale)


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()

    def forward(self, x):
        return self.inner(x)


def untraceable():
    return Wrapper()


def small():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))


def not_a_module():
    return 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    name = f"memprof_user_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def frozen_names(name: str, **overrides) -> list[str]:
    info = resolve_model(name, **overrides)
    with torch.device("meta"):
        return freeze_embedding(build_model(info, 10), info)


def test_timm_and_torchvision_declare_their_embedding_and_input():
    vit = resolve_model("timm:vit_base_patch16_clip_224")
    assert (vit.source, vit.embedding_modules, vit.input_shape, vit.grad_ckpt_reason) == (
        "timm", ("patch_embed", "norm_pre"), (3, 224, 224), None)
    assert resolve_model("timm:convnext_base").embedding_modules == ("stem",)
    assert resolve_model("timm:resnet50").embedding_modules == ("conv1", "bn1")
    tv = resolve_model("torchvision:vit_l_16")
    assert (tv.embedding_modules, tv.input_shape) == (("conv_proj",), (3, 224, 224))
    assert "no gradient-checkpointing switch" in tv.grad_ckpt_reason
    assert resolve_model("torchvision:convnext_base").embedding_modules == ("features.0",)


def test_freeze_embed_freezes_exactly_the_declared_layers():
    # as open_clip's conv1 (no bias) + ln_pre
    assert frozen_names("timm:vit_base_patch16_clip_224") == [
        "visual.norm_pre.bias", "visual.norm_pre.weight", "visual.patch_embed.proj.weight"]
    assert frozen_names("timm:vit_tiny_patch16_224") == ["visual.patch_embed.proj.bias",
                                                         "visual.patch_embed.proj.weight"]  # norm_pre: Identity
    assert frozen_names("torchvision:resnet18") == ["visual.bn1.bias", "visual.bn1.weight", "visual.conv1.weight"]
    assert frozen_names("torchvision:vit_b_16") == ["visual.conv_proj.bias", "visual.conv_proj.weight"]


def test_freeze_globs_override_and_a_glob_matching_nothing_is_a_usage_error():
    names = frozen_names("timm:vit_tiny_patch16_224", freeze="blocks.0,cls_token")
    assert "visual.cls_token" in names and all(n.startswith(("visual.blocks.0.", "visual.cls_token")) for n in names)
    assert len(names) == 13  # cls_token + block 0's 12 tensors
    with pytest.raises(UsageError, match="'stem' matches no module"):
        frozen_names("timm:vit_tiny_patch16_224", freeze="stem")


def test_input_shape_parsing():
    assert parse_input_shape("3x224x224") == (3, 224, 224)
    for bad in ("224x224", "0x2x2", "3 by 224", ""):
        with pytest.raises(UsageError, match="--input-shape"):
            parse_input_shape(bad)


def test_unknown_source_names_say_where_to_look():
    with pytest.raises(UsageError, match="memprof list models --source timm"):
        resolve_model("timm:vit_base_patch16_clip_2244")
    with pytest.raises(UsageError, match="memprof list models --source torchvision"):
        resolve_model("torchvision:resnet5")


def test_py_factories(user_module):
    info = resolve_model(f"py:{user_module}:small", input_shape="3x8x8")
    assert (info.source, info.input_shape, info.embedding_modules) == ("py", (3, 8, 8), ())
    with pytest.raises(UsageError, match="--input-shape"):
        resolve_model(f"py:{user_module}:small")
    with pytest.raises(UsageError, match="has no missing"):
        resolve_model(f"py:{user_module}:missing")
    with pytest.raises(UsageError, match="not an nn.Module"):
        resolve_model(f"py:{user_module}:not_a_module")
    with pytest.raises(UsageError, match="cannot import"):
        resolve_model("py:no_such_module_here:f")


def test_the_grid_skips_what_a_model_cannot_do_with_the_reason(user_module, tmp_path):
    plan = plan_run(run_options(models=f"torchvision:resnet18,py:{user_module}:small", optims="adamw-fe",
                                grad_ckpt="off,on", input_shape="3x8x8", backend="simulate", out=str(tmp_path / "r")))
    reasons = {(e.spec.model.split(":")[0], e.spec.grad_ckpt): e.skip_reason for e in plan.entries}
    assert reasons[("torchvision", False)] is None
    assert "no gradient-checkpointing switch" in reasons[("torchvision", True)]
    assert "declares no embedding layer" in reasons[("py", False)]


def test_a_user_model_through_the_cli_with_freeze_and_input_shape(user_module, tmp_path):
    out = tmp_path / "run"
    rc = main(["run", "--models", f"py:{user_module}:small", "--optims", "sgd-fe", "--input-shape", "3x8x8",
               "--freeze", "0", "--backend", "simulate", "--out", str(out), "--no-progress"])
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert rc == 0 and record["status"] == "ok", record["error"]
    assert record["metrics"]["frozen_parameter_names"] == ["visual.0.bias", "visual.0.weight"]
    assert record["spec"]["freeze"] == "0" and record["key"].endswith("/freeze-0/input-3x8x8@simulate")


def test_a_model_that_cannot_be_traced_is_one_line_and_the_grid_goes_on(user_module, tmp_path):
    plan = plan_run(run_options(models=f"py:{user_module}:untraceable,test-vit", optims="sgd", input_shape="3x8x8",
                                backend="simulate", out=str(tmp_path / "r"), progress=False, jobs=1))
    records = {r["spec"]["model"].split(":")[0]: r for r in execute(plan)}
    assert records["test-vit"]["status"] == "ok"
    error = records["py"]["error"]
    assert records["py"]["status"] == "error" and "\n" not in error
    assert "aten._local_scalar_dense" in error and "inner (Untraceable)" in error and "--backend cpu" in error
    # the cpu backend runs it (real tensors have data)
    from memprof.backends.cpu import measure
    from memprof.spec import RunSpec

    status, metrics = measure(RunSpec(f"py:{user_module}:untraceable", "sgd", input_shape="3x8x8", budget="device"))
    assert status == "ok" and metrics["peak_live_bytes"] > 0


def test_a_timm_model_predicts_with_its_stem_frozen():
    r = memprof.predict("timm:resnet18", "sgd-fe")
    assert r.status == "ok" and r.frozen_parameter_names == ["visual.bn1.bias", "visual.bn1.weight",
                                                             "visual.conv1.weight"]
    assert r.params_total - r.params_trainable == 64 * 3 * 7 * 7 + 2 * 64


def test_list_models_by_source(capsys):
    assert main(["list", "models", "--source", "timm", "--filter", "vit_base_patch16_clip_22*"]) == 0
    out = capsys.readouterr().out
    assert "vit_base_patch16_clip_224" in out and "timm:NAME" in out and "convnext" not in out
    assert main(["list", "models", "--source", "torchvision", "--filter", "resnet*"]) == 0
    assert "resnet50" in capsys.readouterr().out
    assert main(["list", "models", "--filter", "vit_*"]) == 2
    assert "--filter needs --source" in capsys.readouterr().err


@pytest.mark.slow
def test_timm_clip_vit_b_16_and_open_clip_vit_b_16_agree():
    """The same network from two sources: within 1% under AdamW. What differs is named: open_clip's tower ends in
    CLIP's 768 -> 512 projection before the head; timm's head reads the 768-wide features directly."""
    timm_r = memprof.predict("timm:vit_base_patch16_clip_224", "adamw")
    clip_r = memprof.predict("ViT-B-16", "adamw")
    assert clip_r.params_total - timm_r.params_total == 768 * 512 + (512 * 10 + 10) - (768 * 10 + 10)
    for field in ("peak_allocated_bytes", "peak_reserved_bytes"):
        a, b = getattr(timm_r, field), getattr(clip_r, field)
        assert abs(a - b) / b < 0.01, (field, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["torchvision:vit_l_16", "timm:vit_huge_patch14_224", "timm:convnext_base",
                                   "torchvision:resnet50"])
def test_paper_optimizers_predict_on_other_sources(model, tmp_path):
    plan = plan_run(run_options(models=model, optims="paper", backend="simulate", budget="a100-80g",
                                out=str(tmp_path / "r"), progress=False, jobs=1))
    records = {r["spec"]["optim"]: r for r in execute(plan)}
    assert {o: r["status"] for o, r in records.items()} == dict.fromkeys(("sgd", "adamw", "sgd-fe", "sgd-fe-nomom"),
                                                                         "ok")
    m = {o: r["metrics"] for o, r in records.items()}
    assert m["adamw"]["peak_allocated_bytes"] > m["sgd"]["peak_allocated_bytes"] > m["sgd-fe-nomom"][
        "peak_allocated_bytes"]
    assert m["sgd-fe"]["frozen_parameter_names"] and not m["sgd"]["frozen_parameter_names"]

