"""Registries, budgets and the grid: names resolve, bad names fail with close matches, skips say why."""

import pytest

from memprof.budget import GiB, PROFILES, parse_budget
from memprof.errors import UsageError
from memprof.model_sources.open_clip import PAPER_MODELS
from memprof.models import parse_models, resolve_model
from memprof.optims import PAPER_OPTIMS, REGISTRY as OPTIMS, parse_optims
from memprof.spec import RunSpec, expand_grid


def test_paper_names_expand():
    assert [m.name for m in parse_models("paper")] == list(PAPER_MODELS) == ["vit-b-16", "vit-l-14", "vit-h-14"]
    assert [o.name for o in parse_optims("paper")] == list(PAPER_OPTIMS) == ["adamw", "sgd", "sgd-fe", "sgd-fe-nomom"]
    assert [o.name for o in parse_optims("all")] == list(OPTIMS)


def test_registered_models_map_to_open_clip_configs():
    assert resolve_model("vit-h-14").open_clip_config == "ViT-H-14"
    assert resolve_model("vit-b-16").embedding_modules == ("conv1", "ln_pre")


def test_any_open_clip_architecture_is_accepted():
    assert resolve_model("ViT-B-32").open_clip_config == "ViT-B-32"
    assert resolve_model("RN50").embedding_modules == ()  # a ResNet: no ViT embedding layer declared


def test_unknown_names_give_close_matches():
    with pytest.raises(UsageError, match="did you mean vit-h-14"):
        parse_models("vit-h14")
    with pytest.raises(UsageError, match="did you mean lamb"):
        parse_optims("lamd")


@pytest.mark.parametrize("text, size", [("titan-x", 12 * GiB), ("12GiB", 12 * GiB), ("11264MiB", 11 * GiB),
                                        ("h100-80g", 80 * GiB)])
def test_budgets(text, size):
    assert parse_budget(text).total_bytes == size


@pytest.mark.parametrize("text", ["12", "12GB", "-3GiB", "titan", "100MiB"])
def test_bad_budgets(text):
    with pytest.raises(UsageError):
        parse_budget(text)


def test_budget_profiles_have_compute_capabilities():
    assert PROFILES["h100-80g"].compute_capability == (9, 0)
    assert PROFILES["titan-x"].usable_bytes < PROFILES["titan-x"].total_bytes


def test_spec_is_hashable_and_keyed():
    a, b = RunSpec("vit-b-16", "sgd"), RunSpec("vit-b-16", "sgd")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.key == "vit-b-16/sgd/ckpt-off/32bit/bs1/fp32/steps2/titan-x"


def test_grid_skips_say_why():
    models = parse_models("vit-b-16,RN50")
    grid = expand_grid(models, parse_optims("sgd-fe,sgd-fe-nomom,adamw"), [False], [32, 8], [1])
    reasons = {(e.spec.model, e.spec.optim, e.spec.state_bits): e.skip_reason for e in grid}
    assert reasons[("vit-b-16", "adamw", 32)] is None
    assert "nothing to freeze" in reasons[("RN50", "sgd-fe", 32)]
    assert "keeps no optimizer state" in reasons[("vit-b-16", "sgd-fe-nomom", 8)]
    assert reasons[("vit-b-16", "adamw", 8)] is None  # bitsandbytes AdamW8bit
    ckpt = expand_grid(models, parse_optims("sgd"), [True], [32], [1])
    assert [e.skip_reason is None for e in ckpt] == [True, False]  # RN50: no open_clip ViT checkpointing
    lars = expand_grid(models[:1], parse_optims("lars,sgd"), [False], [8], [1], paged=True)
    assert [e.skip_reason for e in lars] == ["bitsandbytes has no paged version of lars",
                                             "bitsandbytes has no paged version of sgd"]
