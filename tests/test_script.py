"""The simulated CUDA device (memprof.script) and `memprof script`: ordinary CUDA code, unchanged, predicted on a
card that is not there. Each honoured call has a negative control."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import memprof
from memprof.errors import UsageError
from memprof.results import read_records
from memprof.script import UnsupportedCall, simulated_cuda
from memprof.script.state import CudaError
from memprof.script.runner import run_script
from memprof.simulation.allocator import round_size

ROOT = Path(__file__).parent.parent
SCRIPTS = ROOT / "tests" / "data" / "scripts"
SMALL = str(SCRIPTS / "train_small.py")
TWIN = str(SCRIPTS / "registry_twin.py")
HF_STYLE = str(SCRIPTS / "train_hf_style.py")
MiB = 1 << 20


def run(path, *args, budget="a100-80g", steps=None, backend="simulate"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_script(str(path), list(args), budget=budget, steps=steps, backend=backend)
    return result, out.getvalue()


def write(tmp_path, text, name="train.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- torch.cuda describes the budget's card, and everything is restored ---------------------------------------

def test_cuda_queries_describe_the_budget_card_and_are_restored():
    originals = {n: getattr(torch.cuda, n) for n in ("is_available", "max_memory_allocated", "get_device_name")}
    top = {n: getattr(torch, n) for n in ("save", "load", "compile", "is_autocast_enabled", "get_autocast_dtype",
                                          "set_default_device", "get_default_device")}
    swap, swap_flag = torch.utils.swap_tensors, torch.__future__.get_swap_module_params_on_conversion
    device_property = FakeTensor.__dict__["device"]
    backward, init = torch.autograd.backward, torch.amp.autocast_mode.autocast.__init__
    with simulated_cuda("a100-80g"):
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        torch.cuda.set_device(0)
        props = torch.cuda.get_device_properties(0)
        assert torch.cuda.get_device_name(0) == props.name == "NVIDIA A100"
        assert (props.major, props.minor) == (8, 0) and props.total_memory == 80 * (1 << 30)
        free, total = torch.cuda.mem_get_info()
        assert total == 80 * (1 << 30) and free < total
        assert torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == "cuda"
        with pytest.raises(CudaError, match="invalid device ordinal"):  # as CUDA says it
            torch.cuda.set_device(1)
    with simulated_cuda("rtx4090"):  # negative control: another card answers otherwise
        assert torch.cuda.get_device_capability() == (8, 9) and "4090" in torch.cuda.get_device_name()
    assert not torch.cuda.is_available()
    assert {n: getattr(torch.cuda, n) for n in originals} == originals
    assert {n: getattr(torch, n) for n in top} == top
    assert torch.utils.swap_tensors is swap and torch.__future__.get_swap_module_params_on_conversion is swap_flag
    assert torch.accelerator.is_available() == torch.cuda.is_available()
    assert FakeTensor.__dict__["device"] is device_property
    assert torch.autograd.backward is backward and torch.amp.autocast_mode.autocast.__init__ is init
    optim_mod = importlib.import_module("torch.optim.optimizer")
    assert FakeTensor not in optim_mod._foreach_supported_types and not optim_mod._global_optimizer_pre_hooks
    assert not torch.__future__.get_swap_module_params_on_conversion()


def test_device_moves_factories_and_live_figures():
    cpu = torch.arange(6.0).reshape(2, 3)
    with simulated_cuda("a100-80g"):
        assert torch.cuda.memory_allocated() == 0
        a = cpu.cuda()
        b = cpu.to("cuda:0", non_blocking=True)
        c = cpu.to(torch.device("cuda"), torch.float16)
        d = torch.empty(MiB, device="cuda")  # 4 MiB
        assert a.device == torch.device("cuda", 0) and a.is_cuda and not a.is_cpu and a.get_device() == 0
        assert c.dtype == torch.float16 and d.device.type == "cuda"
        assert a.to("cuda") is a and b.cuda() is b  # already there: no copy, as on CUDA
        assert torch.cuda.memory_allocated() == 3 * round_size(24) + 4 * MiB
        assert torch.cuda.memory_reserved() == 2 * MiB + 20 * MiB  # a small segment and a large one
        pinned = cpu.pin_memory()
        assert not pinned.is_cuda and torch.equal(pinned, torch.arange(6.0).reshape(2, 3))  # real CPU data stays real
        before = torch.cuda.memory_allocated()
        real = cpu * 2 + 1  # negative control: CPU work allocates nothing on the device
        assert torch.cuda.memory_allocated() == before and real[1, 2].item() == 11.0
        e = a * 2  # device work does
        assert torch.cuda.memory_allocated() == before + round_size(24) and e.is_cuda
        del d
        assert torch.cuda.memory_allocated() == before + round_size(24) - 4 * MiB
        assert torch.cuda.max_memory_allocated() == before + round_size(24)
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == 2 * MiB  # the free large segment went back
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        stats = torch.cuda.memory_stats()
        assert stats["allocated_bytes.all.current"] == torch.cuda.memory_allocated()
        assert "predicted" in torch.cuda.memory_summary()


def test_default_device_contexts_factories_and_torchs_own_moves():
    with simulated_cuda("a100-80g") as sim:
        with torch.device("cuda"):
            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        assert model[0].weight.is_cuda
        t = torch.tensor([1, 2, 3], device="cuda")
        assert t.is_cuda and t.new_zeros(5).is_cuda and torch.zeros_like(t).is_cuda
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(8, 16, device="cuda")).pow(2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # torch moves tensors to their own device
        optimizer.step()
        assert norm.is_cuda
        torch.set_default_device("cuda")
        assert torch.randn(2).is_cuda and torch.get_default_device() == torch.device("cuda", 0)
        half = torch.nn.Linear(8, 8).to(torch.bfloat16)
        half(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
        assert half.weight.is_cuda and half.weight.dtype == torch.bfloat16
    assert not sim.notes  # nothing was read back by the user's code
    assert not torch.randn(2).is_cuda and torch.get_default_device().type == "cpu"  # the default device is restored
    assert sim.precision() == "bf16" or "torch.bfloat16" in sim.param_dtypes()


def test_deepcopy_and_load_state_dict_allocate_as_on_cuda():
    import copy

    with simulated_cuda("a100-80g"):
        model = torch.nn.Linear(256, 256).cuda()
        before = torch.cuda.memory_allocated()
        ema = copy.deepcopy(model)  # an EMA copy: new device memory of the model's size
        assert ema.weight.is_cuda and isinstance(ema.weight, torch.nn.Parameter) and ema.weight is not model.weight
        assert torch.cuda.memory_allocated() - before == round_size(256 * 256 * 4) + round_size(256 * 4)
        after_copy = torch.cuda.memory_allocated()
        weight = ema.weight
        ema.load_state_dict(model.state_dict())  # in place, as on CUDA: nothing new stays allocated
        assert ema.weight is weight and torch.cuda.memory_allocated() == after_copy
        ema.to(torch.bfloat16)
        assert ema.weight.dtype == torch.bfloat16 and ema.weight is weight


def test_torch_load_to_the_device(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(1024, 256), "step": 3}, path)
    with simulated_cuda("titan-x"):
        on_device = torch.load(path, map_location="cuda")
        assert on_device["w"].is_cuda and on_device["step"] == 3
        assert torch.cuda.memory_allocated() == 1024 * 256 * 4
        on_cpu = torch.load(path, map_location="cpu")  # negative control: real data, nothing on the device
        assert not on_cpu["w"].is_cuda and on_cpu["w"].sum().item() == 1024 * 256
        assert torch.cuda.memory_allocated() == 1024 * 256 * 4


def test_a_model_the_script_drops_is_freed():
    with simulated_cuda("titan-x"):
        for width in (1024, 512):  # two experiments in one script, the first model dropped before the second
            model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()).cuda()
            optimizer = torch.optim.Adam(model.parameters())
            model(torch.randn(4, width, device="cuda")).sum().backward()
            optimizer.step()
            held = torch.cuda.memory_allocated()
            del model, optimizer
            workspaces = 2 * 8519680  # cuBLAS keeps one per thread (titan-x, sm_75), never freed
            assert torch.cuda.memory_allocated() == workspaces < held  # negative control: held while alive


def _build_cpu_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 8))
    torch.nn.init.trunc_normal_(model[0].weight, std=0.02)
    torch.nn.init.zeros_(model[2].weight)
    with torch.no_grad():  # timm's trunc_normal_, in-place op by op; a 0-dim factor changed after its use
        bias, scale = model[0].bias, torch.tensor(3.0)
        bias.uniform_(-0.5, 0.5).erfinv_().mul_(scale).add_(0.25).clamp_(-2.0, 2.0)
        scale.fill_(100.0)
    return model


def test_cpu_initialisation_is_deferred_until_read_and_stays_exact(monkeypatch):
    """The CPU's random fills run only when something could see them (memprof.script.deferred): values and the CPU
    generator's stream as in an eager run; skipped for a model that goes to the device unread, with a note, and
    no figure changes."""
    eager = _build_cpu_model()
    eager_draw, eager_out = torch.randn(3), eager(torch.ones(2, 64))
    with simulated_cuda("titan-x") as sim:
        model = _build_cpu_model()
        assert torch.equal(torch.randn(3), eager_draw)  # a draw settles the queue first
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
        assert torch.equal(model(torch.ones(2, 64)), eager_out)  # a CPU model stays a real one
    assert sim.result.record["metrics"]["script_cpu_fills_skipped"] == 0  # every fill was needed, and ran

    def train():
        with simulated_cuda("titan-x") as sim:
            model = _build_cpu_model().cuda()
            model(torch.randn(16, 64, device="cuda")).sum().backward()
            print_peak = torch.cuda.max_memory_allocated()
        return sim, print_peak

    deferred, peak = train()
    assert deferred.result.record["metrics"]["script_cpu_fills_skipped"] >= 5 and not deferred.notes
    from memprof.script import deferred as module

    monkeypatch.setattr(module.DeferredFills, "deferrable", lambda self, t, generator=None: False)
    eager_run, eager_peak = train()  # negative control: nothing deferred, the same figures
    assert eager_run.result.record["metrics"]["script_cpu_fills_skipped"] == 0 and peak == eager_peak
    assert eager_run.result.peak_reserved_bytes == deferred.result.peak_reserved_bytes


def test_values_read_back_are_known_where_the_script_gave_them_and_stand_ins_elsewhere():
    with simulated_cuda("titan-x") as sim:
        x = torch.ones(3, device="cuda")  # known: a factory with a fill
        s = x.sum()
        assert s.item() == 3.0 and float(s) == 3.0 and int(s) == 3 and bool(s)
        labels = torch.tensor([3, 1, 4]).cuda()  # known: copied from the CPU
        assert labels.tolist() == [3, 1, 4] and (labels != 1).sum().item() == 2
        assert x.tolist() == [1.0, 1.0, 1.0] and x.cpu().numpy().tolist() == [1.0, 1.0, 1.0]
        y = torch.randn(3, device="cuda")  # unknown: the device's own random values
        loss = (y * x).mean()
        assert loss.item() == 1.0 and "device='cuda:0'" in repr(loss) and f"{loss:.2f}" == "1.00"
        assert not torch.isnan(loss) and torch.isfinite(loss) and torch.isfinite(y).all()  # the finite path
        assert not bool(loss < 0.1)  # an unknown comparison reads False: not "converged"
        with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
            x.numpy()  # as on CUDA: .cpu() first
    notes = [n for n in sim.notes.values() if "read back" in n]
    assert len(notes) == 1 and " exact" in notes[0] and "stand-ins" in notes[0]


# --- a script's printed peak is the record's, and the registry path's ----------------------------------------

def test_a_script_printing_its_peak_prints_the_record_and_the_registry_figures():
    result, out = run(TWIN, "--print-peak", budget="titan-x")
    printed = [line.split() for line in out.splitlines() if line.startswith("PEAK")][0]
    m = result.record["metrics"]
    assert int(printed[1]) == m["peak_allocated_bytes"] and int(printed[2]) == m["peak_reserved_bytes"]
    registry = memprof.predict("test-vit", optimizer="adam")  # what `memprof run --models test-vit --optims adam` predicts
    for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "peak_op", "breakdown_at_peak_bytes",
                  "floor_bytes", "optimizer_state_bytes"):
        assert m[field] == registry.record["metrics"][field], field
    assert result.source == "predicted" and m["script_optimizers"][0]["implementation"] == "foreach"
    assert m["rules"] == registry.record["metrics"]["rules"]  # the precision rules installed for every run are not listed
    bigger, _ = run(TWIN, "--batch-size", "8", budget="titan-x")  # negative control: the script's own flag is seen
    assert bigger.peak_allocated_bytes > result.peak_allocated_bytes and bigger.script_batch_size == 8


def _registry(model, **options):
    from memprof.plan import execute, plan_run, run_options

    with tempfile.TemporaryDirectory() as tmp:
        return execute(plan_run(run_options(models=model, out=os.path.join(tmp, "run"), progress=False,
                                            **options)))[-1]["metrics"]


def test_a_timm_script_with_bf16_autocast_and_fused_adamw_equals_memprof_run():
    """`autocast("cuda", bfloat16)` and `AdamW(fused=True)` in a script give what `memprof run --precision bf16-amp
    --optim-impl fused` predicts, to the byte (timm ViT-Ti/16 at batch 8)."""
    args = ["--model", "timm:vit_tiny_patch16_224", "--optim", "adamw", "--fused", "--amp", "bf16", "--batch-size", "8"]
    script, _ = run(TWIN, *args, budget="h100-80g")
    registry = _registry("timm:vit_tiny_patch16_224", optims="adamw", precision="bf16-amp", optim_impl="fused",
                         batch_size="8", budget="h100-80g")
    for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "breakdown_at_peak_bytes"):
        assert script.record["metrics"][field] == registry[field], field
    assert script.script_precision == "bf16-amp" and script.script_optimizers[0]["implementation"] == "fused"
    assert script.key.split("@")[0].split("/", 1)[1] == "adamw/ckpt-off/32bit/bs8/bf16-amp+fused/steps2/h100-80g"


def test_a_script_with_optimizers_in_backward_hooks_equals_memprof_run_in_backward():
    """Per-parameter optimizers stepped from post-accumulate-grad hooks registered before the loop give what
    `memprof run --optim-in-backward on` predicts."""
    script, _ = run(TWIN, "--in-backward", budget="titan-x")
    registry = _registry("test-vit", optims="adam", optim_in_backward="on", budget="titan-x")
    for field in ("peak_allocated_bytes", "peak_reserved_bytes", "optimizer_state_bytes"):
        assert script.record["metrics"][field] == registry[field], field
    plain, _ = run(TWIN, budget="titan-x")  # negative control: the hooks change the figure
    assert plain.peak_allocated_bytes != script.peak_allocated_bytes and "in-backward" in script.key


# --- autocast, GradScaler, optimizers, hooks, checkpointing -------------------------------------------------------

def test_autocast_cuda_follows_cuda_policy_and_removing_it_predicts_higher():
    fp32, _ = run(SMALL)
    bf16, _ = run(SMALL, "--amp", "bf16")
    assert bf16.peak_allocated_bytes < fp32.peak_allocated_bytes  # negative control: no autocast, higher
    assert bf16.script_precision == "bf16-amp" and fp32.script_precision == "fp32"
    assert "cuda-autocast-policy" in bf16.rules and "cuda-autocast-policy" not in fp32.rules
    assert bf16.autocast_casts > 0 and bf16.record["spec"]["precision"] == "bf16-amp"
    assert bf16.key != fp32.key


def test_autocast_state_queries_and_checkpoint_recompute_under_autocast():
    with simulated_cuda("a100-80g"):
        assert not torch.is_autocast_enabled("cuda")
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cuda") and torch.is_autocast_enabled()
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16
            with torch.autocast("cuda", enabled=False):  # a region forced back to fp32
                y = torch.nn.functional.linear(torch.randn(2, 4, device="cuda"), torch.randn(3, 4, device="cuda"))
            assert y.dtype == torch.float32
    both, _ = run(SMALL, "--ckpt", "--amp", "bf16")
    ckpt, _ = run(SMALL, "--ckpt")
    assert both.script_checkpointing and both.peak_allocated_bytes < ckpt.peak_allocated_bytes


def test_grad_scaler_cuda_runs_and_takes_the_finite_path():
    fp16, out = run(SMALL, "--amp", "fp16")
    assert fp16.script_grad_scaler and fp16.script_precision == "fp16-amp" and fp16.script_steps == 2
    assert "grad-scaler-fake-step" in fp16.rules and "step 1 loss 1.0000" in out
    with simulated_cuda("titan-x"):  # the older spellings
        scaler = torch.cuda.amp.GradScaler()
        with torch.cuda.amp.autocast():
            y = torch.nn.Linear(4, 4).cuda()(torch.randn(2, 4, device="cuda"))
        assert y.dtype == torch.float16 and scaler.is_enabled()


def test_optimizers_resolve_foreach_and_fused_as_on_cuda():
    default, _ = run(SMALL)
    forloop, _ = run(SMALL, "--foreach", "off")
    fused, _ = run(SMALL, "--fused")
    impl = {r.script_optimizers[0]["implementation"] for r in (default, forloop, fused)}
    assert impl == {"foreach", "forloop", "fused"}
    assert default.script_optimizers[0]["implementation"] == "foreach"
    opt_peak = lambda r: r.phase_peak_allocated_bytes["optimizer"]  # noqa: E731
    assert opt_peak(forloop) < opt_peak(default)  # negative control: foreach's full-size temporaries
    assert opt_peak(fused) < opt_peak(default)
    assert "forloop" in forloop.key and "fused" in fused.key


def test_bitsandbytes_8bit_optimizers_keep_8bit_states():
    bnb = pytest.importorskip("bitsandbytes")
    results = {}
    for cls in (torch.optim.AdamW, bnb.optim.AdamW8bit):
        with simulated_cuda("a100-80g") as sim:
            model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)).cuda()
            optimizer = cls(model.parameters())
            for _ in range(2):
                model(torch.randn(8, 512, device="cuda")).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
        results[cls.__name__] = sim.result
    eight, full = results["AdamW8bit"], results["AdamW"]
    assert eight.optimizer_state_bytes < full.optimizer_state_bytes / 3  # negative control: the 32-bit states
    assert "/8bit/" in eight.key and "/32bit/" in full.key


def test_hooks_registered_before_the_move_survive():
    """Per-parameter optimizers stepped from post-accumulate-grad hooks registered before model.to(device)."""
    hooked, _ = run(SMALL, "--in-backward")
    assert hooked.script_optimizer_in_backward and hooked.script_steps == 2
    assert hooked.optimizer_state_bytes == 2 * 4 * hooked.params_trainable  # Adam's two states per parameter
    assert len(hooked.script_optimizers) == 28 and "in-backward" in hooked.key
    with simulated_cuda("titan-x") as sim:  # negative control: the same model without hooks steps nothing
        model = torch.nn.Linear(8, 8)
        seen = []
        model.weight.register_hook(lambda g: seen.append("tensor hook") or g)
        model.register_forward_hook(lambda *_: seen.append("module hook"))
        model.cuda()
        model(torch.randn(4, 8, device="cuda")).sum().backward()
    assert seen == ["module hook", "tensor hook"] and sim.result.optimizer_state_bytes == 0


def test_checkpointing_is_seen_and_lowers_the_peak():
    plain, _ = run(SMALL)
    ckpt, _ = run(SMALL, "--ckpt")
    assert ckpt.script_checkpointing and not plain.script_checkpointing
    assert ckpt.breakdown_at_peak_bytes["activations"] < plain.breakdown_at_peak_bytes["activations"]
    assert "ckpt-on" in ckpt.key


def test_hf_style_gradient_checkpointing_enable_is_honoured():
    """A model with transformers' own switch, `gradient_checkpointing_enable()` (checkpoint with use_reentrant=True
    by default, or the kwargs given), as a script calls it (tests/data/scripts/train_hf_style.py)."""
    plain, _ = run(HF_STYLE)
    reentrant, _ = run(HF_STYLE, "--ckpt", "reentrant")
    non_reentrant, _ = run(HF_STYLE, "--ckpt", "non-reentrant")
    assert not plain.script_checkpointing and "ckpt-off" in plain.key  # negative control: the switch left off
    for ckpt in (reentrant, non_reentrant):
        assert ckpt.script_checkpointing and "ckpt-on" in ckpt.key and ckpt.script_steps == 2
        assert ckpt.breakdown_at_peak_bytes["activations"] < plain.breakdown_at_peak_bytes["activations"] / 10
        assert ckpt.peak_allocated_bytes < plain.peak_allocated_bytes


def test_steps_are_counted_once_for_both_devices_and_a_reentrant_recompute_is_no_step():
    """One counter (memprof.script.detection) for the simulated and the measured device; the backward a reentrant
    checkpoint runs inside the outer one is part of it, so optimizers stepped from hooks count one step per backward."""
    from torch.utils.checkpoint import checkpoint

    from memprof.script.detection import Detection
    from memprof.script.device import SimulatedCuda
    from memprof.script.measure import MeasuredCuda

    assert issubclass(SimulatedCuda, Detection) and issubclass(MeasuredCuda, Detection)
    assert "_step_done" not in vars(SimulatedCuda) and "_step_done" not in vars(MeasuredCuda)
    for reentrant in (True, False):
        with simulated_cuda("titan-x") as sim:
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).cuda()
            optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda q: optimizers[q].step())
            for _ in range(3):
                x = torch.randn(4, 8, device="cuda", requires_grad=True)
                checkpoint(model, x, use_reentrant=reentrant).sum().backward()
        assert sim.detected["steps"] == 3 and sim.detected["optimizer_in_backward"], reentrant


def test_timm_set_grad_checkpointing_torch_save_and_compile(tmp_path):
    timm = pytest.importorskip("timm")
    target = tmp_path / "weights.pt"
    results = {}
    for ckpt in (False, True):
        with simulated_cuda("a100-80g") as sim:
            model = timm.create_model("vit_tiny_patch16_224", num_classes=10).cuda()
            model.set_grad_checkpointing(ckpt)
            compiled = torch.compile(model)
            optimizer = torch.optim.AdamW(model.parameters())
            for _ in range(2):
                compiled(torch.randn(2, 3, 224, 224, device="cuda")).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            torch.save(model.state_dict(), target)
        results[ckpt] = sim.result
        assert compiled is model and target.stat().st_size < 100_000  # eager; a placeholder of shapes, no values
    assert results[True].script_checkpointing and not results[False].script_checkpointing
    assert results[True].peak_allocated_bytes < results[False].peak_allocated_bytes  # negative control
    notes = " ".join(results[True].notes)
    assert "torch.save at" in notes and "without values" in notes and "torch.compile runs eager" in notes
    torch.save({"x": torch.ones(2)}, target)  # outside the simulation torch.save writes values again
    assert torch.load(target)["x"].tolist() == [1.0, 1.0]


def test_a_restricted_sdpa_backend_is_said_not_silently_replaced():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(restrict):
        with simulated_cuda("a100-80g") as sim:
            q = torch.randn(2, 4, 16, 8, device="cuda", requires_grad=True)
            with sdpa_kernel([SDPBackend.MATH]) if restrict else contextlib.nullcontext():
                torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        return sim

    assert any("SDPA backends were restricted" in n and "to math at" in n for n in attend(True).notes.values())
    assert not attend(False).notes  # negative control


def test_sdpa_kernel_and_backend_flags_choose_the_modelled_kernel():
    """sdpa_kernel(MATH) or enable_flash_sdp(False) + enable_mem_efficient_sdp(False) in a bf16-autocast script:
    attention runs CUDA's math path (fp32 scores), predicted higher; left on default it is flash, as `memprof run`."""
    args = ["--amp", "bf16", "--batch-size", "64"]
    default, _ = run(TWIN, *args)
    math, _ = run(TWIN, *args, "--sdpa", "math")
    flags, _ = run(TWIN, *args, "--sdpa", "flags")
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()  # restored
    assert math.attention_kernels == flags.attention_kernels == {"math": 4} and default.attention_kernels == {"flash": 4}
    assert math.peak_allocated_bytes == flags.peak_allocated_bytes > default.peak_allocated_bytes
    assert any("restricted" in n and "to math at" in n for n in math.notes) and not default.notes
    registry = _registry("test-vit", optims="adam", precision="bf16-amp", batch_size="64", budget="a100-80g")
    assert default.peak_allocated_bytes == registry["peak_allocated_bytes"]  # negative control: the default kernel
    fp32, _ = run(TWIN, "--batch-size", "64")
    fp32_math, _ = run(TWIN, "--batch-size", "64", "--sdpa", "math")  # fp32: math instead of memory-efficient
    assert fp32_math.peak_allocated_bytes > fp32.peak_allocated_bytes


# --- steps, data, errors --------------------------------------------------------------------------------------

def test_a_script_that_does_not_fit_says_where_it_runs_out():
    from memprof.script.runner import summary

    big, _ = run(SMALL, "--batch-size", "256", "--width", "512", budget="1GiB")
    assert big.status == "oom" and big.fits is False and big.oom["phase"] in ("forward", "backward")
    assert "OUT OF MEMORY (predicted)" in summary(big)
    small, _ = run(SMALL, "--batch-size", "4", budget="1GiB")  # negative control
    assert small.status == "ok" and "OUT OF MEMORY" not in summary(small)


def test_fit_searches_the_scripts_own_batch_flag(tmp_path):
    from memprof.script.runner import fit_script, with_batch

    assert with_batch(["--width", "8", "--batch-size=3"], "--batch-size", 5) == ["--width", "8", "--batch-size", "5"]
    seen = []
    best, failing, probes = fit_script(SMALL, ["--width", "512"], "--batch-size", budget="700MiB",
                                       on_probe=lambda b, r: seen.append(b))
    assert best is not None and failing == best.script_batch_size + 1 and sorted(seen) == [b for b, _ in probes]
    assert best.fits is True and not dict(probes)[failing].fits  # the next batch is the negative control
    with pytest.raises(UsageError, match="give the script's flag"):
        fit_script(SMALL, [], "batch-size")


def test_memprof_fit_script_spelling(capsys, tmp_path):
    """`memprof fit --script FILE --batch-arg=FLAG [ARGS...]`: the same search as `memprof script --fit-batch-arg`,
    with the same one-line errors."""
    from memprof.cli import main

    assert main(["fit", "--budget", "700MiB", "--steps", "1", "--out", str(tmp_path / "fit"), "--script", SMALL,
                 "--batch-arg=--batch-size", "--width", "512", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    best = int(out.split("largest fitting: --batch-size ")[1].split()[0])
    assert f"; {best + 1} does not fit (predicted)" in out  # the next batch: the negative control
    (rec,) = [r for r in read_records(str(tmp_path / "fit")) if r["metrics"]["script_batch_size"] == best]
    assert rec["metrics"]["script_args"] == ["--width", "512", "--batch-size", str(best)]  # its own flag replaced
    for argv, says in ((["--batch-arg=--batchsize"], "exited when run with --batchsize 1 (train_small.py: error: "
                                                     "unrecognized arguments: --batchsize 1)"),
                       (["--batch-arg=batch-size"], "--batch-arg batch-size: give the script's flag"),
                       ([], "give the script's batch flag right after it")):
        assert main(["fit", "--script", SMALL, *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert main(["fit", "--models", "test-vit", "--script", SMALL, "--batch-arg=--batch-size"]) == 2
    assert "--models is an option of a registry fit" in capsys.readouterr().err


def test_steps_stop_the_script_after_n_optimizer_steps():
    r, out = run(SMALL, "--forever", steps=3)
    assert r.script_steps == 3 and r.record["spec"]["steps"] == 3 and "step 3 loss" not in out
    two, _ = run(SMALL)
    assert two.script_steps == 2


def test_steps_end_a_simulated_cuda_block_cleanly():
    model = torch.nn.Linear(8, 8)
    done = []
    with simulated_cuda("titan-x", steps=2) as sim:
        model.cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(100):
            model(torch.randn(4, 8, device="cuda")).sum().backward()
            optimizer.step()
            done.append(i)
    assert done == [0] and sim.result.script_steps == 2  # the second step's post-hook ended the block


def test_an_image_script_with_accumulation_channels_last_and_eval():
    pytest.importorskip("torchvision")
    accum, out = run(SCRIPTS / "train_resnet.py", budget="titan-x")
    assert accum.script_steps == 2 and accum.script_batch_size == 8  # two micro-batches per optimizer step
    assert "accuracy 0.125" in out and accum.script_optimizers[0]["name"] == "SGD"  # (an unknown count reads 1)
    every, _ = run(SCRIPTS / "train_resnet.py", "--accum", "1", budget="titan-x")
    assert every.script_steps == 4 and every.key != accum.key  # negative control
    with simulated_cuda("titan-x"):
        x = torch.randn(2, 3, 8, 8).to("cuda", memory_format=torch.channels_last)
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_a_dataloader_with_workers_loads_real_cpu_data(tmp_path):
    path = write(tmp_path, """
import torch
from torch.utils.data import DataLoader, TensorDataset
data = TensorDataset(torch.arange(64.0).reshape(16, 4), torch.arange(16) % 2)
loader = DataLoader(data, batch_size=4, num_workers=2, pin_memory=True)
model = torch.nn.Linear(4, 2).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
total = 0.0
for x, y in loader:
    total += float(x.sum())          # real data on the CPU
    x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step(); opt.zero_grad()
print("TOTAL", total)
""")
    r, out = run(path)
    assert "TOTAL 2016.0" in out and r.script_steps == 4 and r.script_batch_size == 4


def test_what_cannot_be_simulated_names_the_users_line(tmp_path):
    path = write(tmp_path, "import torch\nx = torch.randn(8, device='cuda')\ny = x[x > 0]\n")
    with pytest.raises(UnsupportedCall, match=r"train.py:3: `y = x\[x > 0\]` needs tensor data"):
        run(path)
    ok = write(tmp_path, "import torch\nm = torch.nn.Linear(4, 2).cuda()\nloss = m(torch.randn(3, 4).cuda())\n", "ok.py")
    assert run(ok)[0].status == "incomplete"  # negative control: it runs (and trains no step)


@pytest.mark.slow
def test_memprof_script_command_line(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "memprof", "script", "--budget", "rtx4090", "--out", str(out), SMALL,
           "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "predicted" in proc.stdout and "batch size 4" in proc.stdout and "fits: yes" in proc.stdout
    (rec,) = read_records(str(out))
    assert rec["source"] == "predicted" and rec["metrics"]["script_args"] == ["--batch-size", "4"]
    assert rec["key"].endswith("/rtx4090@simulate") and "/bs4/" in rec["key"]
    m = rec["metrics"]
    assert (out / m["timeline_file"]).is_file() and os.path.isfile(m["snapshot_file"]) and (out / "report.html").is_file()
    assert "report.html" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "memprof", "script", str(tmp_path / "nope.py")], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("memprof: error: no script at") and "Traceback" not in bad.stderr
    nogpu = subprocess.run([sys.executable, "-m", "memprof", "script", "--backend", "cuda", SMALL], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=300)
    assert nogpu.returncode == 2 and "has none" in nogpu.stderr and "Traceback" not in nogpu.stderr
    failing = write(tmp_path, "import torch\nx = torch.randn(8, device='cuda')\nprint(x[x > 0])\n", "dd.py")
    proc = subprocess.run([sys.executable, "-m", "memprof", "script", failing], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "dd.py:3" in proc.stderr


def test_the_measuring_backend_gives_the_same_key_and_reads_torch_cuda():
    """`memprof script --backend cuda` (memprof.script.measure) run where torch.cuda is the simulated card: its
    phase-by-phase torch.cuda readings give the predicted peak, under the predicted record's key (@cuda)."""
    predicted, _ = run(TWIN, budget="a100-80g")
    with simulated_cuda("a100-80g"):
        measured, _ = run(TWIN, budget="a100-80g", backend="cuda")
    assert measured.source == "measured" and measured.key == predicted.key.replace("@simulate", "@cuda")
    assert measured.peak_allocated_bytes == predicted.peak_allocated_bytes
    assert measured.peak_reserved_bytes == predicted.peak_reserved_bytes
    assert measured.phase_peak_allocated_bytes["optimizer"] == predicted.phase_peak_allocated_bytes["optimizer"]
    assert measured.script_optimizers == predicted.script_optimizers and measured.fits is True
    from memprof.reports.fidelity import fidelity_rows

    (row,) = fidelity_rows([measured.record], [predicted.record])  # `memprof fidelity` pairs them
    assert row["allocated_error_pct"] == 0.0 and row["reserved_error_pct"] == 0.0
    with pytest.raises(UsageError, match="has none"):  # negative control: no GPU here
        run(TWIN, backend="cuda")


# --- predict_step on the simulated device ---------------------------------------------------------------------

def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


def _step(model, optimizer, inputs):
    x, y = inputs
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batch():
    return torch.randn(32, 64), torch.randint(0, 8, (32,))


def test_predict_step_build_may_use_cuda_and_resolves_foreach():
    def plain():
        model = _mlp()
        return model, torch.optim.AdamW(model.parameters())

    def on_cuda():
        model = _mlp().to("cuda")
        return model, torch.optim.AdamW(model.parameters())

    def forloop():
        model = _mlp().cuda()
        return model, torch.optim.AdamW(model.parameters(), foreach=False)

    a = memprof.predict_step(plain, _step, _batch)
    b = memprof.predict_step(on_cuda, _step, _batch)
    c = memprof.predict_step(forloop, _step, _batch)
    assert a.peak_allocated_bytes == b.peak_allocated_bytes
    assert a.script_optimizers[0]["implementation"] == "foreach"
    assert c.script_optimizers[0]["implementation"] == "forloop"  # negative control: foreach=False is honoured
    assert c.phase_peak_allocated_bytes["optimizer"] != a.phase_peak_allocated_bytes["optimizer"]
    assert a.key != c.key and "/bs32/" in a.key


def test_predict_step_keeps_hooks_registered_in_build():
    def build():
        model = _mlp()
        opts = {p: torch.optim.Adam([p], foreach=False) for p in model.parameters()}
        def hook(q):
            opts[q].step()
            opts[q].zero_grad(set_to_none=True)

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)
        return model, next(iter(opts.values()))

    def step(model, optimizer, inputs):
        x, y = inputs
        torch.nn.functional.cross_entropy(model(x), y).backward()

    r = memprof.predict_step(build, step, _batch)
    n = sum(p.numel() for p in _mlp().parameters())
    assert r.optimizer_state_bytes == 2 * 4 * n and r.script_optimizer_in_backward  # the hooks stepped
    assert r.breakdown_at_peak_bytes["gradients"] < 4 * n  # never every gradient at once


def test_predict_step_and_memprof_script_agree(tmp_path):
    path = write(tmp_path, """
import torch
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).cuda()
optimizer = torch.optim.AdamW(model.parameters())
for _ in range(2):
    x, y = torch.randn(32, 64).cuda(), torch.randint(0, 8, (32,)).cuda()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del x, y
""")
    script, _ = run(path, budget="titan-x")

    def build():
        model = _mlp()
        return model, torch.optim.AdamW(model.parameters())

    step = memprof.predict_step(build, _step, _batch, budget="titan-x")
    for field in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "optimizer_state_bytes"):
        assert script.record["metrics"][field] == step.record["metrics"][field], field


def test_a_model_instance_passed_to_predict_is_refused_with_what_to_pass():
    with pytest.raises(UsageError, match="instance; pass a zero-argument factory"):
        memprof.predict(torch.nn.Linear(4, 2), "sgd", input_shape="4")
    assert memprof.predict(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), "sgd",
                           input_shape="3x2x2").status == "ok"  # negative control: the factory is taken


# --- the tutorial's case ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_tutorial_script_equals_memprof_run(tmp_path):
    """torchvision vit_l_16, Adam(model.parameters()), batch 1, model.cuda(): `memprof script` equals
    `memprof run --models torchvision:vit_l_16 --optims adam` within 1%."""
    path = write(tmp_path, """
import torch, torchvision
model = torchvision.models.vit_l_16()
model.cuda()
optimizer = torch.optim.Adam(model.parameters())
for _ in range(2):
    x = torch.randn(1, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (1,), device="cuda")
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
""")
    script, _ = run(path, budget="titan-x")
    registry = memprof.predict("torchvision:vit_l_16", optimizer="adam", num_classes=1000)  # the tutorial keeps 1000 classes
    assert abs(script.peak_allocated_bytes - registry.peak_allocated_bytes) <= 0.01 * registry.peak_allocated_bytes
    assert script.script_optimizers[0]["implementation"] == "foreach"


@pytest.mark.slow
def test_a_vit_h_script_with_bf16_autocast_and_fused_adamw_equals_memprof_run():
    """The issue's third case: timm ViT-H/14, autocast("cuda", bfloat16), AdamW(fused=True), batch 8, within 1% of
    `memprof run --models timm:vit_huge_patch14_224 --precision bf16-amp --optim-impl fused --batch-size 8`."""
    args = ["--model", "timm:vit_huge_patch14_224", "--optim", "adamw", "--fused", "--amp", "bf16", "--batch-size", "8"]
    script, _ = run(TWIN, *args, budget="h100-80g")
    registry = _registry("timm:vit_huge_patch14_224", optims="adamw", precision="bf16-amp", optim_impl="fused",
                         batch_size="8", budget="h100-80g")
    assert abs(script.peak_allocated_bytes - registry["peak_allocated_bytes"]) <= 0.01 * registry["peak_allocated_bytes"]
