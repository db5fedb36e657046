"""Accuracy mode: does each memory setting still train correctly? A verdict per configuration.

Each configuration trains for real (CPU, or CUDA where present) at its micro-batch size for `steps`
steps with the paper's recipe (cosine learning-rate schedule to 0; SGD-scale and AdamW-scale learning
rates), then four checks, each with its figures:

- learns: training loss on a fixed probe set (128 training images) falls by at least 10%, and held-out
  accuracy ends at least at twice chance;
- frozen: every parameter the setting freezes is bit-identical to its initial value, and every parameter
  it trains has changed;
- checkpointing exact (gradient checkpointing on): on one batch, gradients with checkpointing equal those
  without (rtol 1e-5, atol 1e-7), and the first 3 training losses match (same seed, same batches);
- 8-bit tracks 32-bit (8-bit states): after 50 steps the parameter update points the same way as the
  32-bit run's (cosine similarity >= 0.9), and final held-out accuracy is within 10 points of it;
- implementation matches foreach (--optim-impl fused or forloop): the same seed and batches for the first
  5 steps give a parameter update within 2% (relative L2 norm) of the foreach run's;
- in-backward matches the ordinary step (--optim-in-backward on): likewise against the same configuration
  stepped after backward.
Mixed precision (bf16-amp, fp16-amp with its GradScaler, bf16) is judged by `learns`: AMP must still learn.

Data: scikit-learn's digits (1,797 8x8 images, 10 classes, shipped inside the package), resized to the
model's input, 80/20 split with a fixed seed; or `--data PATH`, an ImageFolder. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from memprof.errors import UsageError
from memprof.results import ACCURACY_FILE
from memprof.harness import apply_precision, autocast_dtype, classification_step, grad_scaler, model_dtype, prepare
from memprof.optims import build_optimizer
from memprof.spec import RunSpec

from memprof.recipe import (CKPT_ATOL, CKPT_LOSS_STEPS, CKPT_RTOL, DEFAULT_LR_ADAPTIVE, DEFAULT_LR_SGD,
                            DEFAULT_STEPS, EIGHT_BIT_ACC_MARGIN, EIGHT_BIT_COSINE, EIGHT_BIT_STEPS,
                            LEARN_ACC_OVER_CHANCE, LEARN_LOSS_DROP, PROBE_SIZE)


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str


def _split(x: torch.Tensor, y: torch.Tensor, source: str) -> Dataset:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return Dataset(x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]], int(y.max()) + 1, source)


@lru_cache(maxsize=4)
def load_data(size: tuple[int, int], path: str | None = None) -> Dataset:
    """Images in [-1, 1], 3 channels, resized to `size`."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        return _split(x * 2 - 1, torch.tensor(digits.target), "scikit-learn digits (1,797 images, 10 classes)")
    if not os.path.isdir(path):
        raise UsageError(f"--data {path}: no such folder; give an ImageFolder (one sub-folder per class)")
    from torchvision import datasets, transforms

    try:
        folder = datasets.ImageFolder(path, transform=transforms.Compose([transforms.Resize(size),
                                                                         transforms.ToTensor()]))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(f"--data {path}: {str(exc).splitlines()[0]}; give one sub-folder of images per class") from None
    if len(folder.classes) < 2:
        raise UsageError(f"--data {path}: only one class ({folder.classes[0]}); accuracy needs at least 2")
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.tensor(folder.targets)
    return _split(x * 2 - 1, y, f"ImageFolder {path} ({len(y)} images, {len(folder.classes)} classes)")


def default_lr(optim_info) -> float:
    """SGD-scale for SGD and LARS, AdamW-scale for the adaptive ones (those keeping second moments)."""
    return DEFAULT_LR_ADAPTIVE if optim_info.state_tensors_per_param == 2 else DEFAULT_LR_SGD


@dataclass
class Training:
    initial: dict  # name -> tensor (CPU copy), before training
    final: dict
    frozen: list  # what the setting freezes (memprof.models.freeze_embedding)
    trainable: set  # every other parameter: what the setting is meant to train
    probe_loss_start: float
    probe_loss_end: float
    test_acc: float
    losses: list  # every training loss
    update_at_k: torch.Tensor | None  # flattened parameter update after EIGHT_BIT_STEPS steps
    seconds: float


MATCH_STEPS, MATCH_UPDATE_RTOL = 5, 0.02  # implementation / in-backward checks


def _evaluate(model, data: Dataset, device) -> tuple[float, float]:
    model.eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        probe = F.cross_entropy(model(data.x_train[:PROBE_SIZE].to(device, dtype)).float(),
                                data.y_train[:PROBE_SIZE].to(device))
        correct = sum(int((model(data.x_test[i:i + 256].to(device, dtype)).argmax(1).cpu() == data.y_test[i:i + 256]).sum())
                      for i in range(0, len(data.y_test), 256))
    model.train()
    return float(probe), correct / len(data.y_test)


def _build(spec: RunSpec, data: Dataset, seed: int, device, model_hook=None):
    torch.manual_seed(seed)
    prepared = prepare(dataclasses.replace(spec, num_classes=data.num_classes))
    apply_precision(prepared.model, spec)
    model = prepared.model.to(device)
    if model_hook is not None:
        model_hook(model)
    return prepared, model


def _order(data: Dataset, steps: int, batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, len(data.y_train), (steps, batch), generator=torch.Generator().manual_seed(seed + 1))


def train(spec: RunSpec, data: Dataset, steps: int, lr: float, seed: int = 0, device="cpu",
          model_hook=None, optimizer_hook=None) -> Training:
    """Train `spec` for real; hooks (tests, negative controls) may alter the model or the optimizer."""
    prepared, model = _build(spec, data, seed, device, model_hook)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(dataclasses.replace(prepared.optim_info, lr=lr), trainable_params,
                                spec.state_bits, spec.paged, spec.optim_impl, spec.optim_in_backward)
    if optimizer_hook is not None:
        optimizer_hook(model, optimizer)
    stepped = list(optimizer.optimizers.values()) if spec.optim_in_backward else [optimizer]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps, eta_min=0.0) for o in stepped]
    device_type = torch.device(device).type
    amp, scaler, dtype = autocast_dtype(spec), grad_scaler(spec, device), model_dtype(spec)
    names = dict(model.named_parameters())
    trainable = set(names) - set(prepared.frozen)
    initial = {n: p.detach().cpu().clone() for n, p in names.items()}
    probe_start, _ = _evaluate(model, data, device)
    order, losses, update_at_k = _order(data, steps, spec.batch_size, seed), [], None
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step]
        loss = classification_step(model, optimizer, (data.x_train[idx].to(device, dtype), data.y_train[idx].to(device)),
                                   amp, scaler, device_type, spec.optim_in_backward)
        for schedule in schedules:
            schedule.step()
        losses.append(loss.item())
        if step + 1 == EIGHT_BIT_STEPS:
            update_at_k = torch.cat([(p.detach().cpu() - initial[n]).flatten() for n, p in names.items()
                                     if n in trainable])
    seconds = time.perf_counter() - start
    probe_end, acc = _evaluate(model, data, device)
    final = {n: p.detach().cpu().clone() for n, p in names.items()}
    return Training(initial, final, prepared.frozen, trainable, probe_start, probe_end, acc, losses, update_at_k,
                    seconds)


# --- checks: each returns {"pass": bool, ...figures} -----------------------------------------------------

def check_learns(t: Training, num_classes: int) -> dict:
    chance = 1 / num_classes
    drop = 1 - t.probe_loss_end / t.probe_loss_start if t.probe_loss_start else 0.0
    ok = math.isfinite(t.probe_loss_end) and drop >= LEARN_LOSS_DROP and t.test_acc >= LEARN_ACC_OVER_CHANCE * chance
    return {"pass": bool(ok), "probe_loss_start": round(t.probe_loss_start, 4), "probe_loss_end": round(t.probe_loss_end, 4),
            "loss_drop": round(drop, 4), "test_accuracy": round(t.test_acc, 4), "chance": round(chance, 4),
            "rule": f"probe loss falls >= {LEARN_LOSS_DROP:.0%} and accuracy >= {LEARN_ACC_OVER_CHANCE:g} x chance"}


def check_frozen(t: Training) -> dict:
    moved_frozen = sorted(n for n in t.frozen if not torch.equal(t.initial[n], t.final[n]))
    still = sorted(n for n in t.trainable if torch.equal(t.initial[n], t.final[n]))
    return {"pass": not moved_frozen and not still, "frozen": sorted(t.frozen), "trained": len(t.trainable),
            "frozen_that_moved": moved_frozen, "trained_that_did_not_move": still}


def check_checkpointing(spec: RunSpec, data: Dataset, lr: float, seed: int, device, model_hook=None) -> dict:
    """Same seed, same batch: gradients with and without checkpointing, and the first losses of each."""
    grads, losses = {}, {}
    batch = _order(data, 1, spec.batch_size, seed)[0]
    for ckpt in (False, True):
        s = dataclasses.replace(spec, grad_ckpt=ckpt)
        _, model = _build(s, data, seed, device, model_hook)
        F.cross_entropy(model(data.x_train[batch].to(device)), data.y_train[batch].to(device)).backward()
        grads[ckpt] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        losses[ckpt] = train(s, data, CKPT_LOSS_STEPS, lr, seed, device, model_hook).losses
    worst = max(float((grads[True][n] - grads[False][n]).abs().max()) for n in grads[False])
    same_grads = grads[True].keys() == grads[False].keys() and all(
        torch.allclose(grads[True][n], grads[False][n], rtol=CKPT_RTOL, atol=CKPT_ATOL) for n in grads[False])
    same_losses = all(math.isclose(a, b, rel_tol=CKPT_RTOL, abs_tol=CKPT_ATOL) for a, b in zip(losses[True], losses[False]))
    return {"pass": bool(same_grads and same_losses), "max_abs_grad_diff": worst,
            "losses_without": losses[False], "losses_with": losses[True],
            "rule": f"gradients allclose(rtol={CKPT_RTOL}, atol={CKPT_ATOL}); first {CKPT_LOSS_STEPS} losses equal"}


def check_eight_bit(t8: Training, t32: Training) -> dict:
    cos = float(F.cosine_similarity(t8.update_at_k, t32.update_at_k, dim=0)) if (
        t8.update_at_k is not None and t32.update_at_k is not None) else float("nan")
    ok = cos >= EIGHT_BIT_COSINE and t8.test_acc >= t32.test_acc - EIGHT_BIT_ACC_MARGIN
    return {"pass": bool(ok), "update_cosine": round(cos, 4), "accuracy_8bit": round(t8.test_acc, 4),
            "accuracy_32bit": round(t32.test_acc, 4),
            "rule": f"update cosine after {EIGHT_BIT_STEPS} steps >= {EIGHT_BIT_COSINE}; accuracy within "
                    f"{EIGHT_BIT_ACC_MARGIN:.0%} of 32-bit"}


def check_matches(spec: RunSpec, reference: RunSpec, data: Dataset, lr: float, seed: int, device,
                  model_hook=None, optimizer_hook=None) -> dict:
    """`spec` and `reference` trained from the same seed on the same batches for MATCH_STEPS steps (hooks act on
    `spec`'s run only): every parameter allclose at the end."""
    a = train(spec, data, MATCH_STEPS, lr, seed, device, model_hook, optimizer_hook)
    b = train(reference, data, MATCH_STEPS, lr, seed, device)
    if a.final.keys() != b.final.keys():
        return {"pass": False, "reference": reference.key, "rule": "the same parameters"}
    names = sorted(b.trainable)
    update_a = torch.cat([(a.final[n].float() - a.initial[n].float()).flatten() for n in names])
    update_b = torch.cat([(b.final[n].float() - b.initial[n].float()).flatten() for n in names])
    rel = float((update_a - update_b).norm() / update_b.norm()) if float(update_b.norm()) else float("inf")
    worst = max(float((a.final[n].float() - b.final[n].float()).abs().max()) for n in b.final)
    return {"pass": rel <= MATCH_UPDATE_RTOL, "update_rel_diff": round(rel, 6), "max_abs_param_diff": worst,
            "reference": reference.key,
            "rule": f"after {MATCH_STEPS} steps from the same seed and batches, |update - reference update| <= "
                    f"{MATCH_UPDATE_RTOL} x |reference update| (rounding order differs between implementations)"}


def evaluate_config(spec: RunSpec, data: Dataset, steps: int = DEFAULT_STEPS, lr: float | None = None,
                    seed: int = 0, device="cpu", cache: dict | None = None, model_hook=None,
                    optimizer_hook=None) -> dict:
    """All checks for one configuration; returns {"verdict", "failed", "checks", "seconds", "lr"}."""
    from memprof.optims import REGISTRY

    cache = {} if cache is None else cache
    lr = lr if lr is not None else default_lr(REGISTRY[spec.optim])
    start = time.perf_counter()
    hooks = model_hook is not None or optimizer_hook is not None

    def run(s: RunSpec) -> Training:
        key = (s, steps, lr, seed, str(device))
        if hooks:
            return train(s, data, steps, lr, seed, device, model_hook, optimizer_hook)
        if key not in cache:
            cache[key] = train(s, data, steps, lr, seed, device)
        return cache[key]

    t = run(spec)
    checks = {"learns": check_learns(t, data.num_classes), "frozen": check_frozen(t)}
    if spec.grad_ckpt:
        checks["checkpointing_exact"] = check_checkpointing(spec, data, lr, seed, device, model_hook)
    if spec.state_bits == 8:
        checks["eight_bit_tracks_32bit"] = check_eight_bit(t, run(dataclasses.replace(spec, state_bits=32, paged=False)))
    if spec.optim_impl != "foreach":
        checks["matches_foreach"] = check_matches(spec, dataclasses.replace(spec, optim_impl="foreach"), data, lr,
                                                  seed, device, model_hook, optimizer_hook)
    if spec.optim_in_backward:
        checks["in_backward_matches_step"] = check_matches(spec, dataclasses.replace(spec, optim_in_backward=False),
                                                           data, lr, seed, device, model_hook, optimizer_hook)
    failed = [name for name, c in checks.items() if not c["pass"]]
    return {"verdict": "fail" if failed else "pass", "failed": failed, "checks": checks, "lr": lr,
            "train_steps": steps, "seconds": round(time.perf_counter() - start, 2)}




def run_accuracy(entries, out_dir: str, device: str, steps: int, lr_sgd: float | None, lr_adaptive: float | None,
                 data_path: str | None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Verdicts for every grid entry, appended to out_dir/accuracy.jsonl as each finishes."""
    import sys

    from tqdm import tqdm

    from memprof.models import build_model, input_shape, resolve_model
    from memprof.optims import REGISTRY
    from memprof.results import append, environment

    env = environment(f"accuracy-{device}", device)
    path = os.path.join(out_dir, ACCURACY_FILE)
    cache, records, sizes = {}, [], {}
    for entry in tqdm(entries, desc="accuracy", unit="config", file=sys.stderr, disable=None if progress else True):
        spec = entry.spec
        key = spec.config + f"/train{steps}"
        record = {"key": key, "spec": spec.to_dict(), "source": "measured", "environment": env,
                  "weights": f"pretrained: {spec.pretrained}" if spec.pretrained else "random init"}
        if entry.skip_reason:
            record.update(verdict="skipped", skip_reason=entry.skip_reason)
        else:
            try:
                if spec.model not in sizes:
                    with torch.device("meta"):
                        sizes[spec.model] = input_shape(build_model(resolve_model(spec.model), 2))[1:]
                data = load_data(sizes[spec.model], data_path)
                record["data"] = data.source
                adaptive = REGISTRY[spec.optim].state_tensors_per_param == 2
                lr = (lr_adaptive if adaptive else lr_sgd)
                record.update(evaluate_config(spec, data, steps, lr, seed, device, cache))
            except UsageError:
                raise
            except Exception as exc:  # a configuration that cannot train is a result too
                record.update(verdict="error", error=f"{type(exc).__name__}: {exc}")
        append(path, record)
        records.append(record)
    return records


