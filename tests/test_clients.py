"""The field's own training entry points, unmodified, through `memprof script` (as a user runs them: a fresh process,
`--out`), on tiny synthetic data with random weights and no network: open_clip's `open_clip_train.main`, Hugging
Face's Trainer, a Lightning Trainer, an accelerate loop. Each runs a whole short epoch with evaluation and a
checkpoint save to its end (exit 0, one record), detects its setup, stays under 1.5 GiB of host memory, and
equals `memprof run` on the same model and setup within 0.5% of peak allocated, or says why the setup cannot be
expressed. (timm's train.py and torchvision's reference script are not in a wheel: see README, "Tested against".)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memprof
from memprof.results import read_records

pytestmark = pytest.mark.slow

CLIENTS = Path(__file__).parent / "data" / "clients"
HOST_LIMIT = 1.5 * (1 << 30)
TOLERANCE = 0.005


def _needs(*modules):
    for name in modules:
        pytest.importorskip(name)


def script(tmp_path, *argv, name="run"):
    """`memprof script --budget a100-80g --out DIR ARGV...` in a fresh process: (its one record, its peak host
    memory in bytes, what it printed)."""
    out = tmp_path / name
    stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "memprof", "script", "--budget", "a100-80g", "--out", str(out),
                                 *argv], cwd=tmp_path, stdout=so, stderr=se,
                                env={**os.environ, "PYTHONPATH": str(CLIENTS), "HF_HUB_OFFLINE": "1",
                                     "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "100"})
        _, status, usage = os.wait4(proc.pid, 0)
    printed = stdout.read_text() + stderr.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, printed[-3000:]
    (record,) = read_records(str(out))
    assert usage.ru_maxrss * 1024 <= HOST_LIMIT, f"host memory {usage.ru_maxrss >> 10} MiB"
    return record, usage.ru_maxrss * 1024, printed


def close(record, run, why=""):
    got, want = record["metrics"]["peak_allocated_bytes"], run.record["metrics"]["peak_allocated_bytes"]
    assert abs(got - want) <= TOLERANCE * want, f"script {got} B, memprof run {want} B {why}"


def test_accelerate_loop_equals_memprof_run(tmp_path):
    _needs("accelerate", "timm")
    for precision, run_precision in (("bf16", "bf16-amp"), ("no", "fp32")):
        rec, _, printed = script(tmp_path, str(CLIENTS / "accelerate_loop.py"), "--mixed-precision", precision,
                                 "--out", str(tmp_path / f"state-{precision}"), name=precision)
        m = rec["metrics"]
        assert rec["status"] == "ok" and m["script_precision"] == run_precision and m["script_batch_size"] == 2
        assert m["script_steps"] == 4 and m["script_forwards"] == 8 and "accuracy" in printed
        assert any((tmp_path / f"state-{precision}").iterdir())  # accelerate's save_state wrote its files
        close(rec, memprof.predict("timm:vit_base_patch16_224", "adamw", precision=run_precision, batch_size=2,
                                   num_classes=5, budget="a100-80g"))


def test_hf_trainer_equals_memprof_run(tmp_path, monkeypatch):
    _needs("transformers", "accelerate")
    rec, _, printed = script(tmp_path, str(CLIENTS / "hf_trainer.py"), "--out", str(tmp_path / "hf"))
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["script_precision"] == "bf16-amp" and m["script_batch_size"] == 2
    assert m["script_optimizers"][0]["implementation"] == "fused" and m["script_steps"] == 4
    assert m["script_forwards"] == 12 and "eval_loss" in printed  # 4 steps, two evaluations of 4 batches
    assert (tmp_path / "hf" / "checkpoint-4" / "model.safetensors").exists()  # the Trainer's own checkpoint
    monkeypatch.syspath_prepend(str(CLIENTS))
    close(rec, memprof.predict("py:hf_models:vit", "adamw", precision="bf16-amp", batch_size=2, num_classes=5,
                               optim_impl="fused", input_shape="3x224x224", budget="a100-80g"))
    ckpt, _, _ = script(tmp_path, str(CLIENTS / "hf_trainer.py"), "--precision", "fp32", "--grad-ckpt",
                        "--optim", "adamw_torch", "--out", str(tmp_path / "hf-ckpt"), name="ckpt")
    assert ckpt["metrics"]["script_checkpointing"] and ckpt["metrics"]["script_precision"] == "fp32"


def test_lightning_trainer_equals_memprof_run_clearing_before_backward(tmp_path):
    """Lightning's automatic optimization calls zero_grad after the training step's forward: memprof run expresses
    it with --clear-grads before-backward (the default, after the step, would be 0.32 GiB lower in the forward)."""
    _needs("lightning", "torchvision")
    rec, _, printed = script(tmp_path, str(CLIENTS / "lightning_module.py"), "--out", str(tmp_path / "lit"))
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["script_precision"] == "bf16-amp" and m["script_batch_size"] == 2
    assert m["script_steps"] == 4 and m["script_forwards"] == 10  # 2 sanity-check batches, 4 + 4
    assert list((tmp_path / "lit" / "checkpoints").glob("*.ckpt"))  # Lightning's own checkpoint
    close(rec, memprof.predict("torchvision:vit_b_16", "adamw", precision="bf16-amp", batch_size=2, num_classes=5,
                               clear_grads="before-backward", budget="a100-80g"))


def _csv(tmp_path, n=8):
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (i * 30, 0, 0)).save(path)
        rows.append(f"{path}\ta photo of thing {i}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "data.csv")


def test_open_clip_train_runs_unmodified_with_evaluation_and_checkpoints(tmp_path):
    """open_clip_train trains both CLIP towers with the contrastive loss, with evaluation and checkpoints: the setup
    it detects is checked here; its figures against `memprof run --objective contrastive` in the test below."""
    _needs("open_clip_train", "pandas")
    data = _csv(tmp_path)
    common = ["-m", "open_clip_train.main", "--train-data", data, "--val-data", data, "--dataset-type", "csv",
              "--model", "ViT-B-16", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--save-frequency", "1",
              "--val-frequency", "1"]
    rec, _, printed = script(tmp_path, *common, "--precision", "amp_bf16", "--logs", str(tmp_path / "logs"))
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["script_precision"] == "bf16-amp" and m["script_batch_size"] == 2
    assert m["params_trainable"] == m["params_total"] == 149_620_737 and m["script_steps"] == 4
    assert m["script_forwards"] == 8 and "Eval Epoch" in printed
    assert list((tmp_path / "logs").glob("*/checkpoints/epoch_1.pt"))
    locked, _, _ = script(tmp_path, *common, "--precision", "fp32", "--lock-image", "--grad-checkpointing",
                          "--logs", str(tmp_path / "logs-locked"), name="locked")
    lm = locked["metrics"]
    assert lm["script_precision"] == "fp32" and lm["script_checkpointing"]
    assert 0 < lm["params_trainable"] < m["params_trainable"]  # the image tower is locked


def test_open_clip_train_synthetic_data(tmp_path):
    _needs("open_clip_train")
    rec, _, _ = script(tmp_path, "-m", "open_clip_train.main", "--train-data", "synthetic", "--dataset-type",
                       "synthetic", "--train-num-samples", "8", "--model", "ViT-B-16", "--batch-size", "2", "--epochs",
                       "1", "--workers", "0", "--precision", "amp_bf16", "--logs", str(tmp_path / "logs"))
    assert rec["status"] == "ok" and rec["metrics"]["script_steps"] == 4


@pytest.mark.parametrize("precision,run_precision,lock", [("fp32", "fp32", False), ("amp_bf16", "bf16-amp", True)])
def test_open_clip_train_equals_memprof_run_contrastive(tmp_path, precision, run_precision, lock):
    """Both towers, open_clip's ClipLoss, logit_scale trained and clamped: `memprof run --objective contrastive`
    (memprof.contrastive) on the same model, precision, batch and lock. open_clip_train clears the gradients before
    each forward (after loading the batch): memory-wise memprof's default --clear-grads after-step."""
    _needs("open_clip_train")
    rec, _, _ = script(tmp_path, "-m", "open_clip_train.main", "--train-data", "synthetic", "--dataset-type",
                       "synthetic", "--train-num-samples", "8", "--model", "ViT-B-16", "--batch-size", "2", "--epochs",
                       "1", "--workers", "0", "--precision", precision, *(["--lock-image"] if lock else []),
                       "--logs", str(tmp_path / "logs"), name=precision)
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["script_precision"] == run_precision and m["script_batch_size"] == 2
    run = memprof.predict("ViT-B-16", "adamw", objective="contrastive", lock_image=lock, precision=run_precision,
                          batch_size=2, budget="a100-80g")
    assert run.record["metrics"]["params_trainable"] == m["params_trainable"]
    close(rec, run, "(open_clip_train vs memprof run --objective contrastive)")
