"""`--preset paper-2022` and `--resident clip`: the options a preset sets, what a user gives still wins, and
the text tower counted as frozen parameters on the device."""

import pytest

from memprof import cli
from memprof.errors import UsageError
from memprof.plan import PRESETS, run_options
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec


def test_the_preset_sets_what_the_user_left_alone():
    opts = run_options("paper-2022")
    assert (opts["optim_impl"], opts["resident"], opts["models"]) == ("forloop", "tower,clip", "paper")
    mine = run_options("paper-2022", optim_impl="fused", models="paper")
    assert mine["optim_impl"] == "fused" and mine["resident"] == "tower,clip"
    with pytest.raises(UsageError, match="unknown preset 'paper-2021': did you mean paper-2022"):
        run_options("paper-2021")
    assert set(PRESETS) == {"paper-2022"}


def test_clip_resident_adds_the_frozen_text_tower():
    """ViT-B/16's text tower (63.4M parameters, fp32) sits on the device, frozen: parameters grow by exactly
    its bytes, trainable ones do not. The tower-only run is the negative control."""
    from memprof.reports.overhead import text_tower_bytes

    _, tower = predict(RunSpec("vit-b-16", "sgd-fe-nomom"))
    _, clip = predict(RunSpec("vit-b-16", "sgd-fe-nomom", resident="clip"))
    text = text_tower_bytes("ViT-B-16")
    buffers = 77 * 77 * 4  # the causal attention mask, a buffer
    assert clip["params_total"] - tower["params_total"] == (text - buffers - 4) // 4 + 1
    assert clip["params_trainable"] == tower["params_trainable"]
    assert clip["peak_allocated_bytes"] - tower["peak_allocated_bytes"] >= text - (1 << 20)


def test_text_tower_table_matches_open_clip():
    """The stored text-tower sizes are what open_clip builds today (a changed open_clip fails here)."""
    from memprof.reports.overhead import TEXT_TOWER_BYTES, count_text_tower_bytes

    assert {name: count_text_tower_bytes(name) for name in TEXT_TOWER_BYTES} == TEXT_TOWER_BYTES


def test_resident_clip_needs_a_clip_model(capsys, tmp_path):
    code = cli.main(["run", "--models", "test-vit", "--optims", "sgd", "--resident", "clip", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "--resident clip: test-vit is not an open_clip CLIP model" in err


def test_the_preset_on_a_small_grid_writes_the_2022_rows(capsys, tmp_path):
    code = cli.main(["run", "--preset", "paper-2022", "--models", "test-vit", "--resident", "tower", "--backend",
                     "simulate", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "forloop optimizer" in out and "NVML process memory" in out


@pytest.mark.slow
def test_the_preset_predicts_the_paper_grid_with_the_implied_overhead(capsys, tmp_path):
    code = cli.main(["run", "--preset", "paper-2022", "--backend", "simulate", "--no-progress",
                     "--out", str(tmp_path / "o")])
    assert code == 0
    md = (tmp_path / "o" / "table4.md").read_text()
    assert "forloop, whole CLIP resident; predicted" in md and "forloop; predicted" in md
    assert "The fixed overhead the paper's percentages imply" in md
