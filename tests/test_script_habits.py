"""Ordinary script habits on the simulated device: grad modes, batches given by keyword, `step(closure)`, checkpoints
saved and loaded, guards on read-back values, the script's own errors and exit codes, threads, runs that train no
step. Each with a negative control."""

import contextlib
import io
import os
import signal
import subprocess
import sys

import pytest
import torch

from memprof.script import simulated_cuda
from memprof.script.runner import run_script
from memprof.simulation.memo import MEMO


def write(tmp_path, text, name="train.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def quiet_run(path, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_script(str(path), list(args), **kw)


# --- grad modes, with the dispatch front cache on and off ----------------------------------------------------------

def _grad_modes():
    with simulated_cuda("a100-80g") as sim:
        m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).cuda()
        opt = torch.optim.AdamW(m.parameters())
        for _ in range(3):  # each form twice or more, so the front cache serves repeats
            with torch.inference_mode():
                m(torch.randn(8, 16, device="cuda")).view(-1).t()
            with torch.no_grad():
                m(torch.randn(8, 16, device="cuda")).view(-1)
                with torch.enable_grad():
                    m(torch.randn(8, 16, device="cuda")).sum().backward()
            with torch.inference_mode():
                with torch.inference_mode(False):
                    m(torch.randn(8, 16, device="cuda")).view(-1).sum().backward()
            opt.step()
            opt.zero_grad()
    return sim.result


def test_grad_modes_nested_give_the_same_figures_with_the_front_cache_on_and_off(monkeypatch):
    on = _grad_modes()
    monkeypatch.setattr(MEMO, "_front_on", False)
    off = _grad_modes()
    assert on.status == off.status == "ok" and on.record["metrics"]["script_steps"] == 3
    for field in ("peak_allocated_bytes", "peak_reserved_bytes"):
        assert on.record["metrics"][field] == off.record["metrics"][field], field


def test_negative_control_an_inference_tensor_view_built_outside_its_mode_is_refused():
    """What the front cache must not do (build a view of a normal tensor as an inference tensor): torch refuses it."""
    base = torch.ones(4)
    with torch.inference_mode():
        wrong = torch.empty(4)  # an inference tensor
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        with torch.no_grad():
            wrong.set_(base.untyped_storage(), 0, (4,), (1,))
            wrong.add_(1)


# --- the batch the model sees, from positional and keyword inputs --------------------------------------------------

class _Keyword(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, pixel_values=None, labels=None):
        return self.lin(pixel_values)


class _DictIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, batch):
        return self.lin(batch["pixel_values"])


@pytest.mark.parametrize("call", ["positional", "keyword", "dict", "batch_feature"])
def test_the_batch_size_is_found_in_positional_keyword_and_mapping_inputs(call):
    from collections import UserDict

    with simulated_cuda("a100-80g") as sim:
        x, y = torch.randn(6, 8, device="cuda"), torch.arange(6, device="cuda")
        if call == "positional":
            out = _Keyword().cuda()(x)
        elif call == "keyword":
            out = _Keyword().cuda()(pixel_values=x, labels=y)
        elif call == "dict":
            out = _DictIn().cuda()({"pixel_values": x, "labels": y})
        else:  # HF's BatchFeature is a UserDict
            out = _DictIn().cuda()(UserDict({"pixel_values": x, "labels": y}))
        out.sum().backward()
    assert sim.detected["batch_size"] == 6


def test_negative_control_a_batch_held_only_on_the_cpu_is_no_device_batch():
    with simulated_cuda("a100-80g") as sim:
        model = _Keyword()  # a CPU model, CPU inputs: nothing of the device's
        model(pixel_values=torch.randn(6, 8))
    assert sim.detected["batch_size"] is None and sim.detected["forwards"] == 0


# --- optimizer.step(closure) -------------------------------------------------------------------------------------

def _closure_run(use_closure: bool):
    with simulated_cuda("a100-80g") as sim:
        model = torch.nn.Linear(64, 64).cuda()
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(2):
            x = torch.randn(32, 64, device="cuda")

            def closure():
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
    return sim.result


def test_step_with_a_closure_puts_the_update_in_the_optimizer_phase():
    with_closure, plain = _closure_run(True), _closure_run(False)
    phases = with_closure.record["metrics"]["phase_peak_allocated_bytes"]
    written_out = plain.record["metrics"]["phase_peak_allocated_bytes"]
    assert phases["optimizer"] > 0 and with_closure.record["metrics"]["script_steps"] == 2
    assert phases["forward"] == written_out["forward"] and phases["backward"] == written_out["backward"]
    # as the same loop written out, but for the loss the closure returns: step() holds it through the update
    assert phases["optimizer"] - written_out["optimizer"] == 512


def test_negative_control_a_step_hook_that_ignores_the_closure_mislabels_the_update(monkeypatch):
    """As before the fix: the pre hook opens the optimizer phase before the closure's forward and backward, so the
    update lands in the backward phase."""
    from memprof.script.detection import Detection

    original = Detection._optimizer_pre
    monkeypatch.setattr(Detection, "_optimizer_pre",
                        lambda self, optimizer, args, kwargs: original(self, optimizer, args[:1], {}))
    with_closure, plain = _closure_run(True), _closure_run(False)
    phases = with_closure.record["metrics"]["phase_peak_allocated_bytes"]
    written_out = plain.record["metrics"]["phase_peak_allocated_bytes"]
    assert phases["optimizer"] - written_out["optimizer"] != 512 or phases["backward"] != written_out["backward"]


def test_step_with_a_closure_under_lbfgs_runs_and_counts_steps():
    with simulated_cuda("a100-80g") as sim:
        model = torch.nn.Linear(8, 1).cuda()
        opt = torch.optim.LBFGS(model.parameters(), max_iter=3)
        x = torch.randn(4, 8, device="cuda")

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
    assert sim.detected["steps"] == 1 and sim.result.record["metrics"]["phase_peak_allocated_bytes"]["optimizer"] > 0


# --- checkpoints: a real, small file that loads back ---------------------------------------------------------------

def test_torch_save_writes_a_placeholder_that_replaces_loads_and_loads_back(tmp_path):
    target, tmp = tmp_path / "checkpoint.pth", tmp_path / "tmp.pth"
    with simulated_cuda("a100-80g") as sim:
        model = torch.nn.Linear(256, 256).cuda()
        torch.save({"model": model.state_dict(), "epoch": 3}, tmp)
        os.replace(tmp, target)  # timm's CheckpointSaver saves then renames
        assert target.stat().st_size < 20_000  # shapes, not 256 KiB of values
        cpu = torch.load(target, map_location="cpu")
        assert cpu["epoch"] == 3 and cpu["model"]["weight"].shape == (256, 256) and not cpu["model"]["weight"].is_cuda
        model.load_state_dict(cpu["model"])
        on_device = torch.load(target, map_location="cuda")
        assert on_device["model"]["weight"].is_cuda
    assert any("torch.save at" in n for n in sim.notes.values())


def test_safetensors_save_and_load_file_round_trip_under_the_simulation(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    with simulated_cuda("a100-80g") as sim:
        model = torch.nn.Linear(64, 32).cuda()
        state = model.state_dict()
        from safetensors.torch import storage_ptr  # transformers and safetensors tell storages apart by address

        assert storage_ptr(state["weight"]) != storage_ptr(state["bias"])
        st.save_file(state, str(path))
        loaded = st.load_file(str(path))
        assert loaded["weight"].shape == (32, 64) and not loaded["weight"].is_cuda
    assert any("safetensors" in n for n in sim.notes.values())
    st.save_file({"x": torch.ones(2)}, str(path))  # negative control: outside, safetensors writes values again
    assert st.load_file(str(path))["x"].tolist() == [1.0, 1.0]


# --- guards on read-back values --------------------------------------------------------------------------------

GUARDS = """
import torch
model = torch.nn.Linear(256, 256).cuda()
opt = torch.optim.AdamW(model.parameters())
scaler = torch.amp.GradScaler("cuda")
for step in range(4):
    x = torch.randn(64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().square().mean()
    if not torch.isfinite(loss):
        raise RuntimeError("loss is not finite")
    if loss.item() < 0.1:
        break  # converged
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
print("SCALE", scaler.get_scale())
"""


def test_a_training_loops_guards_pass_and_it_trains_every_step(tmp_path):
    path = write(tmp_path, GUARDS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_script(path, [], budget="a100-80g")
    assert result.status == "ok" and result.record["metrics"]["script_steps"] == 4
    assert "SCALE 65536.0" in out.getvalue()  # the scaler's own state is known: no inf was found, no backoff


def test_negative_control_zero_stand_ins_would_stop_the_loop_early(tmp_path, monkeypatch):
    from memprof.script import standins

    monkeypatch.setattr(standins, "default_value", lambda dtype: 0)  # the old stand-in: zeros
    result = quiet_run(write(tmp_path, GUARDS))
    assert result.record["metrics"]["script_steps"] == 0 and result.status == "incomplete"


# --- the script's own errors, exit codes, runs that train nothing --------------------------------------------------

def _cli(tmp_path, *argv):
    from memprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["script", *argv])
    return code, out.getvalue(), err.getvalue()


THREE_STEPS = """
import torch
m = torch.nn.Linear(64, 64).cuda(); opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(3):
    m(torch.randn(4, 64, device="cuda")).sum().backward(); opt.step(); opt.zero_grad()
"""


def test_steps_on_the_command_line_stops_the_script_there(tmp_path):
    code, out, _ = _cli(tmp_path, "--steps", "1", write(tmp_path, THREE_STEPS))
    assert code == 0 and "ran 1 forward, 1 backward, 1 optimizer step\n" in out.replace("\n    ", " "), out


def test_negative_control_without_steps_the_script_runs_to_its_end(tmp_path):
    code, out, _ = _cli(tmp_path, write(tmp_path, THREE_STEPS))
    assert code == 0 and "ran 3 forwards, 3 backwards, 3 optimizer steps" in out.replace("\n    ", " "), out


@pytest.mark.parametrize("body,code,says", [
    ("import torch\nx = torch.randn(2, 4, device='cuda')\nx.topk(5)\n", 1, "k not in range"),
    ("import torch\nm = torch.nn.Linear(4, 2).cuda()\nloss = m(torch.randn(3, 4))\n", 1, "same device"),
    ("import torch\nx = torch.randn(2, 4, device='cuda', requires_grad=True)\ny = (x * x).sum()\ny.backward()\n"
     "y.backward()\n", 1, "backward through the graph a second time"),
    ("import torch\nx = torch.randn(-1, device='cuda')\n", 1, "RuntimeError"),
    ("input('batch? ')\n", 1, "EOFError"),
    ("raise ValueError('my own error')\n", 1, "ValueError: my own error"),
    ("import sys\nsys.exit(3)\n", 3, None),
    ("import torch\ntorch.zeros(2, device='cuda:1')\n", 1, "invalid device ordinal"),
])
def test_the_scripts_own_error_reads_as_pythons_with_its_exit_code(tmp_path, monkeypatch, body, code, says):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    path = write(tmp_path, body)
    got, out, err = _cli(tmp_path, path)
    assert got == code, err
    if says is not None:
        assert "Traceback (most recent call last)" in err and f"{path}\", line" in err and says in err, err
        assert "memprof/" not in err.split("Traceback")[1]  # memprof's own frames are not the script's
    assert "no verdict: the script failed" in out or code == 3 and "exited with status 3" in out


def test_negative_control_what_cannot_be_simulated_is_still_one_line_exit_2(tmp_path):
    path = write(tmp_path, "import torch\nx = torch.randn(8, device='cuda')\ny = x[x > 0]\n")
    code, out, err = _cli(tmp_path, path)
    assert code == 2 and "needs tensor data" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("body,args,reason", [
    ("", [], "put nothing on the CUDA device"),
    ("import torch\nm = torch.nn.Linear(4, 2)\nm(torch.randn(3, 4)).sum().backward()\n", [],
     "put nothing on the CUDA device"),
    ("import argparse\nargparse.ArgumentParser().parse_args()\n", ["--help"], "put nothing on the CUDA device"),
    ("import torch\nm = torch.nn.Linear(4, 2).cuda()\nm(torch.randn(3, 4, device='cuda')).sum().backward()\n", [],
     "no training step completed (1 forward, 1 backward"),
])
def test_a_run_that_trains_no_step_is_incomplete_never_fits(tmp_path, body, args, reason):
    code, out, err = _cli(tmp_path, write(tmp_path, body), *args)
    assert code == 0 and "no verdict: incomplete" in out and reason in out.replace("\n    ", " ")
    assert "fits: yes" not in out


def test_negative_control_a_run_that_trains_a_step_gets_a_verdict(tmp_path):
    body = ("import torch\nm = torch.nn.Linear(4, 2).cuda()\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "m(torch.randn(3, 4, device='cuda')).sum().backward()\nopt.step()\n")
    code, out, err = _cli(tmp_path, write(tmp_path, body))
    assert code == 0 and "fits: yes" in out and "incomplete" not in out


def test_a_yaml_file_is_the_scripts_syntax_error(tmp_path):
    code, out, err = _cli(tmp_path, write(tmp_path, "model: vit\nbatch: [1, 2\n", "config.yaml"))
    assert code == 1 and "SyntaxError" in err


def test_os_exit_in_the_script_still_leaves_a_record(tmp_path):
    body = ("import os, torch\nm = torch.nn.Linear(4, 2).cuda()\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "m(torch.randn(3, 4, device='cuda')).sum().backward()\nopt.step()\nos._exit(0)\n")
    out_dir = tmp_path / "out"
    code, out, err = _cli(tmp_path, "--out", str(out_dir), write(tmp_path, body))
    assert code == 0 and (out_dir / "results.jsonl").exists() and "fits: yes" in out


def test_a_thread_the_script_starts_runs_on_the_simulated_device(tmp_path):
    body = """
import threading, torch
made = []
def prefetch():
    made.append(torch.randn(1024, 1024).cuda(non_blocking=True))
t = threading.Thread(target=prefetch)
t.start(); t.join()
m = torch.nn.Linear(1024, 2).cuda()
opt = torch.optim.SGD(m.parameters(), lr=0.1)
m(made[0]).sum().backward()
opt.step()
assert made[0].is_cuda
"""
    result = quiet_run(write(tmp_path, body))
    assert result.status == "ok" and result.peak_allocated_bytes >= 4 << 20
    assert any("thread" in n for n in result.record["metrics"]["notes"])


def test_the_users_exception_inside_simulated_cuda_propagates_unchanged():
    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        with simulated_cuda("a100-80g"):
            torch.ones(2, device="cuda")
            raise Mine()


def test_simulated_cuda_takes_a_budget_in_bytes_or_says_what_it_takes():
    from memprof.errors import UsageError

    with simulated_cuda(budget=8 << 30) as sim:
        assert torch.cuda.get_device_properties(0).total_memory == 8 << 30
    assert sim.device.total_bytes == 8 << 30
    with pytest.raises(UsageError, match="give a card name"):
        simulated_cuda(budget=[8])


# --- fit --script: a failing or flag-ignoring script is never an answer ------------------------------------------

def _fit(tmp_path, body, *extra):
    from memprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", "--budget", "a100-80g", "--script", write(tmp_path, body), *extra])
    return code, out.getvalue(), err.getvalue()


TRAINS = """
import argparse, torch
p = argparse.ArgumentParser(); p.add_argument("--batch-size", type=int, default=4); a = p.parse_args()
m = torch.nn.Linear(512, 512).cuda(); opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(2):
    m(torch.randn({batch}, 512, device="cuda")).sum().backward(); opt.step(); opt.zero_grad()
"""


def test_fit_script_refuses_a_flag_that_changes_nothing(tmp_path):
    code, out, err = _fit(tmp_path, TRAINS.format(batch=8), "--batch-arg=--batch-size")
    assert code == 2 and "changes nothing the script runs" in err and "65536" not in out


def test_fit_script_fails_when_the_script_fails(tmp_path):
    fails_at_2 = TRAINS.format(batch="a.batch_size").replace("for _ in", "if a.batch_size > 1:\n    raise "
                                                             "ValueError('late')\nfor _ in")
    code, out, err = _fit(tmp_path, fails_at_2, "--batch-arg=--batch-size")
    assert code == 1 and "ValueError: late" in err and "largest fitting" not in out


def test_negative_control_fit_script_answers_for_a_script_that_reads_its_flag(tmp_path):
    code, out, err = _fit(tmp_path, TRAINS.format(batch="a.batch_size"), "--batch-arg=--batch-size")
    assert code == 0 and "largest fitting: --batch-size" in out, err


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="no SIGTERM")
def test_sigterm_ends_fit_script_with_143_whatever_the_script_catches(tmp_path):
    import time

    mark = tmp_path / "ready"
    body = f"""
import argparse, time, torch
p = argparse.ArgumentParser(); p.add_argument("--batch-size", type=int); p.parse_args()
try:
    open({str(mark)!r}, "w").close()
    time.sleep(60)
except KeyboardInterrupt:
    pass  # timm's train.py catches Ctrl-C this way
"""
    path = write(tmp_path, body)
    proc = subprocess.Popen([sys.executable, "-m", "memprof", "fit", "--script", path, "--batch-arg=--batch-size"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not mark.exists():
            time.sleep(0.2)
        assert mark.exists(), "the probe never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, proc.stderr.read()


# --- composites that branch on the device (F.one_hot), Python functionals that name it ------------------------------

def test_one_hot_of_device_labels_is_made_on_the_device():
    with simulated_cuda("a100-80g"):
        labels = torch.tensor([0, 2, 1, 2]).cuda()
        before = torch.cuda.memory_allocated()
        hot = torch.nn.functional.one_hot(labels, 3)
        assert hot.is_cuda and hot.shape == (4, 3) and torch.cuda.memory_allocated() > before
        assert hot.sum(0).tolist() == [1, 1, 2]  # known labels: the values are exact


def test_a_python_functional_naming_the_device_makes_its_tensors_there():
    """torch runs a functional's Python body with the function mode popped: `multi_head_attention_forward`'s
    `torch.zeros(..., device=k.device)` (add_zero_attn) reaches dispatch naming cuda:0, and is the device's."""
    with simulated_cuda("a100-80g"):
        attention = torch.nn.MultiheadAttention(8, 2, add_zero_attn=True).cuda()
        x = torch.randn(3, 2, 8, device="cuda")
        assert attention(x, x, x)[0].is_cuda


def test_negative_control_without_the_dispatch_factories_cuda_itself_is_called(monkeypatch):
    from memprof.script import moves

    monkeypatch.setattr(moves, "dispatch_factory", lambda *args: None)
    with pytest.raises(Exception, match="NVIDIA driver|CUDA"):
        with simulated_cuda("a100-80g"):
            attention = torch.nn.MultiheadAttention(8, 2, add_zero_attn=True).cuda()
            x = torch.randn(3, 2, 8, device="cuda")
            attention(x, x, x)


def test_timms_chunking_rule_stands_aside_for_a_timm_without_chunking(monkeypatch):
    timm_helpers = pytest.importorskip("timm.optim._helpers")
    from memprof.budget import parse_budget
    from memprof.simulation.rules import TimmForeachChunks

    rule = TimmForeachChunks(parse_budget("h100-80g"))
    original = timm_helpers._foreach_chunk_elements
    with rule.mode():
        assert timm_helpers._foreach_chunk_elements is not original  # the card's L2 decides the chunks
    assert timm_helpers._foreach_chunk_elements is original
    monkeypatch.delattr(timm_helpers, "_foreach_chunk_elements")  # a timm from before chunking (or after a rename)
    with rule.mode():  # (it raised AttributeError here: timm's own train.py run from a timm checkout failed)
        assert not hasattr(timm_helpers, "_foreach_chunk_elements")
