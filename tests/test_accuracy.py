"""Accuracy mode: verdicts per configuration, and the negative controls that must fail the right check."""

import subprocess
import sys

import pytest
import torch

from memprof import accuracy
from memprof.spec import RunSpec


def test_digits_ship_with_scikit_learn(digits):
    assert digits.num_classes == 10
    assert digits.x_train.shape[1:] == (3, 32, 32) and len(digits.y_train) + len(digits.y_test) == 1797
    assert float(digits.x_train.min()) >= -1 and float(digits.x_train.max()) <= 1


@pytest.mark.slow  # 2 min: its halves pass in the quick tests below (learns: the --accuracy run; 8-bit and
# checkpointing: their negative controls' sound twins)
def test_a_sound_setting_passes_every_check(digits):
    r = accuracy.evaluate_config(RunSpec("test-vit", "sgd-fe", grad_ckpt=True, state_bits=8), digits)
    assert r["verdict"] == "pass", r["failed"]
    assert set(r["checks"]) == {"learns", "frozen", "checkpointing_exact", "eight_bit_tracks_32bit"}
    assert r["checks"]["frozen"]["frozen"] == ["visual.conv1.weight", "visual.ln_pre.bias", "visual.ln_pre.weight"]
    assert r["checks"]["checkpointing_exact"]["max_abs_grad_diff"] <= 1e-6


def test_zero_learning_rate_fails_learns(digits):
    r = accuracy.evaluate_config(RunSpec("test-vit", "adamw"), digits, steps=60, lr=0.0)
    assert r["verdict"] == "fail" and "learns" in r["failed"]


def test_silently_freezing_everything_fails_frozen(digits):
    def freeze_all(model, optimizer):  # the optimizer updates copies: the model never changes, nothing says so
        for group in optimizer.param_groups:
            group["params"] = [p.detach().clone().requires_grad_() for p in group["params"]]

    r = accuracy.evaluate_config(RunSpec("test-vit", "sgd"), digits, steps=60, optimizer_hook=freeze_all)
    assert r["verdict"] == "fail" and "frozen" in r["failed"]
    assert len(r["checks"]["frozen"]["trained_that_did_not_move"]) == r["checks"]["frozen"]["trained"]


def test_unfrozen_embedding_fails_frozen(digits):
    """The setting freezes the embedding, but the optimizer is handed it anyway: the check must see it move."""
    def unfreeze_embedding(model):
        for p in (*model.visual.conv1.parameters(), *model.visual.ln_pre.parameters()):
            p.requires_grad_(True)

    spec = RunSpec("test-vit", "sgd-fe")
    sound = accuracy.check_frozen(accuracy.train(spec, digits, 60, 0.01))
    broken = accuracy.check_frozen(accuracy.train(spec, digits, 60, 0.01, model_hook=unfreeze_embedding))
    assert sound["pass"] and not broken["pass"]
    assert broken["frozen_that_moved"] == sound["frozen"] and broken["trained_that_did_not_move"] == []


@pytest.mark.bitsandbytes
def test_eight_bit_run_that_diverges_fails_the_accuracy_half(digits):
    """Same first EIGHT_BIT_STEPS steps as the healthy 8-bit run (so the cosine half passes), then every
    update is blown up 1000x: held-out accuracy collapses and only the within-10-points half can catch it."""
    from memprof.recipe import EIGHT_BIT_ACC_MARGIN, EIGHT_BIT_STEPS

    def diverge_after_k(model, optimizer):
        params, before, count = [p for g in optimizer.param_groups for p in g["params"]], [], [0]

        def remember(*_):
            before[:] = [p.detach().clone() for p in params]

        def blow_up(*_):
            count[0] += 1
            if count[0] > EIGHT_BIT_STEPS:
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b + 1000 * (p - b))

        optimizer.register_step_pre_hook(remember)
        optimizer.register_step_post_hook(blow_up)

    # batch 16 for 80 steps reaches ~45% held-out accuracy (chance 10%): room for a 10-point fall
    spec32, spec8 = RunSpec("test-vit", "adamw", batch_size=16), RunSpec("test-vit", "adamw", batch_size=16, state_bits=8)
    t32 = accuracy.train(spec32, digits, 80, 1e-3, seed=0)
    t8 = accuracy.train(spec8, digits, 80, 1e-3, seed=0)
    broken = accuracy.train(spec8, digits, 80, 1e-3, seed=0, optimizer_hook=diverge_after_k)
    healthy, diverged = accuracy.check_eight_bit(t8, t32), accuracy.check_eight_bit(broken, t32)
    assert healthy["pass"], healthy
    assert torch.equal(broken.update_at_k, t8.update_at_k)  # identical up to step k
    assert diverged["update_cosine"] == healthy["update_cosine"] and diverged["update_cosine"] >= 0.9
    assert not diverged["pass"] and diverged["accuracy_8bit"] < diverged["accuracy_32bit"] - EIGHT_BIT_ACC_MARGIN


def test_perturbed_recompute_fails_checkpointing(digits):
    """Blocks that compute differently when autograd re-runs them (inside backward) break exactness."""
    def perturb_recompute(model):
        for block in model.visual.transformer.resblocks:
            forward = block.forward

            def perturbed(x, *args, _forward=forward, **kwargs):
                recomputing = torch._C._current_graph_task_id() != -1  # autograd re-runs the block in backward
                return _forward(x + 1e-2 * x.roll(1, -1) if recomputing else x, *args, **kwargs)  # not LN-invariant

            block.forward = perturbed

    spec = RunSpec("test-vit", "sgd", grad_ckpt=True)
    r = accuracy.evaluate_config(spec, digits, steps=60, model_hook=perturb_recompute)
    assert "checkpointing_exact" in r["failed"]
    assert r["checks"]["checkpointing_exact"]["max_abs_grad_diff"] > 1e-6
    sound = accuracy.check_checkpointing(spec, digits, 0.01, 0, "cpu", None)  # the same check without the perturbation
    assert sound["pass"] and sound["max_abs_grad_diff"] <= 1e-6


@pytest.mark.bitsandbytes
def test_eight_bit_check_fails_against_an_unrelated_run(digits):
    t8 = accuracy.train(RunSpec("test-vit", "adamw", state_bits=8), digits, 60, 1e-3, seed=0)
    other = accuracy.train(RunSpec("test-vit", "adamw"), digits, 60, 1e-3, seed=7)  # another init and order
    assert not accuracy.check_eight_bit(t8, other)["pass"]
    same = accuracy.train(RunSpec("test-vit", "adamw"), digits, 60, 1e-3, seed=0)
    assert accuracy.check_eight_bit(t8, same)["pass"]


def test_image_folder_data(tmp_path):
    from PIL import Image

    for cls, shade in (("cats", 30), ("dogs", 220)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 20), (shade, shade, shade)).save(tmp_path / cls / f"{i}.png")
    data = accuracy.load_data((32, 32), str(tmp_path))
    assert data.num_classes == 2 and len(data.y_train) == 8 and data.x_test.shape[1:] == (3, 32, 32)


def memprof(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def usage_error(capsys, *args) -> str:
    """Bad input, in this process (torch is loaded already): exit 2 and one line, no exception."""
    from memprof import cli

    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("setup, expect", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "one sub-folder of images per class"),
    (lambda p: (p / "only").mkdir(parents=True) or __import__("PIL.Image").Image.new("RGB", (4, 4)).save(
        p / "only" / "a.png"), "only one class"),
])
def test_bad_data_folders_exit_2(tmp_path, setup, expect, capsys):
    folder = tmp_path / "data"
    setup(folder)
    assert expect in usage_error(capsys, "accuracy", "--state-bits", "32", "--data", str(folder), "--out", str(tmp_path / "o"))


@pytest.mark.parametrize("args, expect", [
    (["accuracy", "--models", "vit-b-61"], "did you mean vit-b-16"),
    pytest.param(["accuracy", "--models", "vit-b-16", "--state-bits", "32"], "would take hours on the CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="assumes no GPU: with one, ViT-B/16 is allowed")),
    (["accuracy", "--train-steps", "10"], "at least 60"),
    (["accuracy", "--lr-sgd", "-0.1"], "zero or positive"),
])
def test_bad_accuracy_input_exit_2(args, expect, tmp_path, capsys):
    assert expect in usage_error(capsys, *args, "--out", str(tmp_path / "o"))


def test_mismatched_pretrained_file_exit_2(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 4, 4)}, other)  # test-vit's conv1 is 64x3x8x8
    err = usage_error(capsys, "accuracy", "--state-bits", "32", "--pretrained", str(other), "--out", str(tmp_path / "o"))
    assert "does not match this architecture" in err


@pytest.mark.slow
def test_run_with_accuracy_puts_verdicts_beside_memory(tmp_path):
    r = memprof("run", "--models", "test-vit", "--optims", "sgd-fe", "--accuracy", "--state-bits", "32",
                "--grad-ckpt", "off", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "table4.md").read_text()
    assert "trains: pass" in table and (tmp_path / "accuracy.md").exists()
