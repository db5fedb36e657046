"""torchrun-style scripts on the simulated device (memprof.script.parallel): `memprof script --world-size N` runs a
script that starts a process group and wraps its model in DistributedDataParallel or fully_shard as rank 0 of N,
and predicts what `memprof run --parallel ddp|fsdp --world-size N` predicts for the same model. Negative controls:
the same script without its wrapper, and a script that starts a group without --world-size."""

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest

from memprof.errors import UsageError
from memprof.script import UnsupportedCall
from memprof.script.runner import run_script

ROOT = Path(__file__).parent.parent
TWIN = str(ROOT / "tests" / "data" / "scripts" / "registry_twin.py")
FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_phase", "peak_step", "breakdown_at_peak_bytes",
          "floor_bytes", "optimizer_state_bytes", "params_total", "phase_peak_allocated_bytes")

TORCHRUN = """import os
import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64).cuda())
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    loss = model(torch.randn(8, 64, device="cuda")).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
dist.all_reduce(loss)
print("RANK", rank, dist.get_rank(), "WORLD", world, dist.get_world_size())
dist.destroy_process_group()
"""


def run(path, *args, budget="titan-x", world_size=None):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run_script(str(path), list(args), budget=budget, world_size=world_size)
    return result, out.getvalue()


def registry(**options):
    from memprof.plan import execute, plan_run, run_options

    with tempfile.TemporaryDirectory() as tmp:
        return execute(plan_run(run_options(models="test-vit", optims="adam", budget="titan-x",
                                            out=os.path.join(tmp, "run"), progress=False, **options)))[-1]["metrics"]


def test_a_ddp_script_equals_memprof_run_parallel_ddp():
    script, _ = run(TWIN, "--parallel", "ddp", world_size=2)
    m, ran = script.record["metrics"], registry(parallel="ddp", world_size=2)
    for field in FIELDS:
        assert m[field] == ran[field], field
    assert abs(m["peak_allocated_bytes"] / ran["peak_allocated_bytes"] - 1) < 0.01
    assert m["ddp_bucket_count"] == ran["ddp_bucket_count"] and m["ddp_bucket_bytes"] == ran["ddp_bucket_bytes"]
    assert "ddp-gradient-buckets" in m["rules"] and script.key.endswith("/ddp2@simulate")
    capped, _ = run(TWIN, "--parallel", "ddp", "--bucket-cap-mb", "0.1", "--grad-as-bucket-view", world_size=8)
    ran_capped = registry(parallel="ddp", world_size=8, bucket_cap_mb=0.1, grad_as_bucket_view="on")
    for field in FIELDS:  # DDP's own bucket_cap_mb and gradient_as_bucket_view, as memprof run's options
        assert capped.record["metrics"][field] == ran_capped[field], field
    assert capped.key.endswith("/ddp8+cap0.1+view@simulate") and capped.ddp_bucket_count > script.ddp_bucket_count
    plain, _ = run(TWIN)  # negative control: the same script without DDP has no buckets and a lower peak
    assert plain.breakdown_at_peak_bytes["communication"] == 0 < script.breakdown_at_peak_bytes["communication"]
    assert plain.peak_allocated_bytes < script.peak_allocated_bytes and "ddp" not in plain.key


def test_an_fsdp_script_equals_memprof_run_parallel_fsdp():
    """fully_shard on each block and the root, as `memprof run --parallel fsdp` shards: the same figures, phase by
    phase (Adam's foreach=None resolves to foreach on FSDP's DTensors, as on CUDA)."""
    script, _ = run(TWIN, "--parallel", "fsdp", world_size=2)
    m, ran = script.record["metrics"], registry(parallel="fsdp", world_size=2)
    for field in FIELDS:
        assert m[field] == ran[field], field
    assert script.key.endswith("/fsdp2@simulate") and script.script_optimizers[0]["implementation"] == "foreach"
    wider, _ = run(TWIN, "--parallel", "fsdp", world_size=4)  # negative control: more ranks, smaller shards
    assert wider.floor_bytes < script.floor_bytes


def test_a_torchrun_script_needs_world_size_and_runs_as_rank_0(tmp_path):
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    originals = (dist.init_process_group, torch.nn.parallel.DistributedDataParallel, fsdp.fully_shard,
                 fsdp.FullyShardedDataParallel)
    path = tmp_path / "train_ddp.py"
    path.write_text(TORCHRUN)
    with pytest.raises(UnsupportedCall, match=r"train_ddp.py:5: torch.distributed.init_process_group\('nccl'\) .*"
                                              r"give memprof script --world-size N"):
        run(path)
    result, out = run(path, world_size=4)  # negative control: with --world-size it runs, as rank 0 of 4
    assert "RANK 0 0 WORLD 4 4" in out and result.status == "ok" and result.key.endswith("/ddp4@simulate")
    assert "RANK" not in os.environ or os.environ.get("WORLD_SIZE") != "4"  # torchrun's variables are restored
    assert not dist.is_initialized()
    with pytest.raises(UsageError, match="at least 1"):
        run(path, world_size=0)
    fsdp1 = tmp_path / "train_fsdp1.py"
    fsdp1.write_text(TORCHRUN.replace("torch.nn.parallel.DistributedDataParallel(", "FSDP(").replace(
        "import torch.distributed as dist\n", "import torch.distributed as dist\n"
        "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"))
    with pytest.raises(UnsupportedCall, match=r"train_fsdp1.py:9: FullyShardedDataParallel \(FSDP1\) .*fully_shard"):
        run(fsdp1, world_size=2)
    assert (dist.init_process_group, torch.nn.parallel.DistributedDataParallel, fsdp.fully_shard,
            fsdp.FullyShardedDataParallel) == originals  # all restored


def test_world_size_on_the_command_line(tmp_path, capsys):
    from memprof.cli import main

    path = tmp_path / "train_ddp.py"
    path.write_text(TORCHRUN)
    assert main(["script", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert "train_ddp.py:5" in err and "--world-size" in err
    assert main(["script", "--world-size", "2", str(path)]) == 0  # negative control
    out = capsys.readouterr().out
    assert "RANK 0 0 WORLD 2 2" in out and "predicted" in out
    assert main(["script", "--world-size", "0", str(path)]) == 2 and "at least 1" in capsys.readouterr().err


def test_a_measured_ddp_script_has_the_predicted_key():
    """`--backend cuda --world-size 1` (memprof.script.measure), run where torch.cuda is the simulated card: the script's
    own init_process_group("nccl") and DDP run, and the record's key is the prediction's (@cuda), ddp1 included."""
    from memprof.script import simulated_cuda

    predicted, _ = run(TWIN, "--parallel", "ddp", world_size=1)
    with simulated_cuda("titan-x", world_size=1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            measured = run_script(TWIN, ["--parallel", "ddp"], budget="titan-x", backend="cuda", world_size=1)
    assert measured.source == "measured" and measured.key == predicted.key.replace("@simulate", "@cuda")
    assert predicted.key.endswith("/ddp1@simulate") and measured.peak_allocated_bytes == predicted.peak_allocated_bytes
    with pytest.raises(UsageError, match="one GPU measures world size 1 only"):  # negative control
        run_script(TWIN, ["--parallel", "ddp"], backend="cuda", world_size=2)
