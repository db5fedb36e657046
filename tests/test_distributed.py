"""DDP and FSDP2 as rank 0 sees them, predicted on a fake process group (memprof.simulation.distributed)."""

import math
import subprocess
import sys

import pytest
import torch

from memprof.errors import UsageError
from memprof.plan import plan_run, run_options
from memprof.simulation.simulate import predict, predict_cpu
from memprof.spec import RunSpec

TOL = 0.01  # the bound: per-rank bytes within 1% of the unsharded figures / N (plus padding)


def unsharded(model: str) -> dict:
    """Bytes of the unsharded model's parameters, and of the padded dim-0 shards FSDP keeps per rank."""
    from memprof.harness import prepare

    with torch.device("meta"):
        params = list(prepare(RunSpec(model=model, optim="adamw"), load_weights=False).model.parameters())
    return {"bytes": sum(p.numel() * p.element_size() for p in params), "params": params}


def padded_shard_bytes(params, n: int) -> int:
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) * p.element_size() if p.dim() else
               p.element_size() for p in params)


def sharded_as_expected(metrics: dict, full_bytes: int, padded_bytes: int, n: int) -> bool:
    """Parameter, gradient and AdamW state bytes on rank 0 within 1% of the unsharded figures / N, or of the
    padded shards (FSDP pads dim 0 to a multiple of N)."""
    for key, copies in (("rank_parameter_bytes", 1), ("rank_gradient_bytes", 1), ("rank_optimizer_state_bytes", 2)):
        got = metrics[key]
        if not (abs(got - copies * full_bytes / n) <= TOL * copies * full_bytes / n or
                abs(got - copies * padded_bytes) <= TOL * copies * padded_bytes):
            return False
    return True


def check_fsdp_shards(model: str, n: int):
    u = unsharded(model)
    status, m = predict(RunSpec(model=model, optim="adamw", parallel="fsdp", world_size=n, budget="h100-80g"))
    assert status == "ok"
    assert m["rank_parameter_bytes"] == padded_shard_bytes(u["params"], n)
    assert sharded_as_expected(m, u["bytes"], padded_shard_bytes(u["params"], n), n)
    assert m["breakdown_at_peak_bytes"]["communication"] > 0 or m["phase_peak_allocated_bytes"]["forward"] > 0
    return u, m


def test_fsdp_shards_parameters_gradients_and_state_by_world_size():
    u, m = check_fsdp_shards("test-vit", 4)
    assert not sharded_as_expected(m, u["bytes"], u["bytes"], 1)  # negative control: unsharded figures fail


def test_the_shard_check_fails_on_an_unsharded_run():
    """Negative control: DDP keeps every byte on every rank, so the FSDP check rejects it."""
    u = unsharded("test-vit")
    _, m = predict(RunSpec(model="test-vit", optim="adamw", parallel="ddp", world_size=4))
    assert not sharded_as_expected(m, u["bytes"], padded_shard_bytes(u["params"], 4), 4)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit-b-16", "vit-h-14"])
def test_fsdp_shards_paper_models(model):
    check_fsdp_shards(model, 8)


@pytest.mark.parametrize("n", [1, 8])
def test_ddp_adds_its_gradient_buckets_and_nothing_else(n):
    _, base = predict(RunSpec(model="test-vit", optim="adamw"))
    _, ddp = predict(RunSpec(model="test-vit", optim="adamw", parallel="ddp", world_size=n))
    grads = base["floor_bytes"] - base["params_total"] * 4 - base["optimizer_state_bytes"]
    assert ddp["ddp_bucket_bytes"] == grads  # every trainable gradient, once
    b, d = base["breakdown_at_peak_bytes"], ddp["breakdown_at_peak_bytes"]
    assert b["communication"] == 0 and d["communication"] == 512 * math.ceil(grads / 512)
    assert {k: v for k, v in d.items() if k != "communication"} == {k: v for k, v in b.items() if k != "communication"}
    assert ddp["peak_allocated_bytes"] - base["peak_allocated_bytes"] == d["communication"]


def test_gradient_as_bucket_view_puts_the_gradients_in_the_buckets():
    """Negative control of the bucket check: with gradient_as_bucket_view the buckets are the gradients."""
    _, base = predict(RunSpec(model="test-vit", optim="adamw"))
    _, view = predict(RunSpec(model="test-vit", optim="adamw", parallel="ddp", world_size=8, grad_as_bucket_view=True))
    assert view["breakdown_at_peak_bytes"]["communication"] == 0
    assert view["peak_allocated_bytes"] <= base["peak_allocated_bytes"]


def test_ddp_buckets_follow_bucket_cap_mb():
    _, one = predict(RunSpec(model="test-vit", optim="adamw", parallel="ddp", world_size=2))
    _, many = predict(RunSpec(model="test-vit", optim="adamw", parallel="ddp", world_size=2, bucket_cap_mb=0.1))
    assert one["ddp_bucket_count"] == 1 and many["ddp_bucket_count"] >= 4
    assert one["ddp_bucket_bytes"] == many["ddp_bucket_bytes"]


def test_keeping_parameters_unsharded_after_forward_costs_memory():
    _, on = predict(RunSpec(model="test-vit", optim="adamw", parallel="fsdp", world_size=4))
    _, off = predict(RunSpec(model="test-vit", optim="adamw", parallel="fsdp", world_size=4,
                             reshard_after_forward=False))
    assert off["breakdown_at_peak_bytes"]["parameters"] > on["breakdown_at_peak_bytes"]["parameters"]


def fsdp_mem_tracker_peak(spec: RunSpec) -> dict:
    """torch's own FSDPMemTracker around the same harness (FSDP2 on fake tensors), peak of the second step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from memprof.simulation import distributed
    from memprof.simulation.fake_compat import fake_storage
    from memprof.harness import prepare, train_steps
    from memprof.optims import build_optimizer

    one_step = RunSpec(**{**spec.to_dict(), "steps": 1})
    with distributed.process_group(spec):
        with torch.device("meta"):
            prep = prepare(spec, load_weights=False)
        with FakeTensorMode():
            fake_storage(prep.model)
            distributed.shard(prep.model, spec)
            trainable = [p for p in prep.model.parameters() if p.requires_grad]
            opt = build_optimizer(prep.optim_info, trainable, 32, False, "foreach", False)
            fmt = FSDPMemTracker(prep.model, opt)
            with fmt:
                for step in range(spec.steps):
                    train_steps(prep.model, opt, one_step, "cpu", lambda *a: None)
                    if step == 0:
                        fmt.reset_mod_stats()  # (required after the first iteration)
            snap = next(iter(fmt.get_tracker_snapshot("peak").values()))  # the one device: cpu
            n_steps = sum(1 for s in opt.state.values() if "step" in s)
    return {str(getattr(k, "value", k)): v for k, v in snap.items()} | {"step_counter_bytes": 4 * n_steps}


def compare_with_fsdp_mem_tracker(ours: dict, theirs: dict) -> bool:
    """Our peak live bytes equal torch's FSDPMemTracker's peak Total, less the optimizer's step counters
    (host memory on CUDA, which we do not count), within 0.1%; and the sharded state agrees."""
    total = theirs["Total"] - theirs["step_counter_bytes"]
    return (abs(ours["peak_live_bytes"] - total) <= 0.001 * total and
            ours["rank_parameter_bytes"] == theirs["Sharded Param"] and
            ours["rank_optimizer_state_bytes"] == theirs["OptState"] - theirs["step_counter_bytes"])


def test_fsdp_prediction_agrees_with_torchs_fsdp_mem_tracker():
    spec = RunSpec(model="test-vit", optim="adamw", parallel="fsdp", world_size=4)
    _, ours = predict_cpu(spec)
    theirs = fsdp_mem_tracker_peak(spec)
    assert compare_with_fsdp_mem_tracker(ours, theirs), (ours["peak_live_bytes"], theirs)
    b = ours["breakdown_at_peak_bytes"]
    assert b["communication"] == theirs["All Gather"] + theirs["Reduce Scatter"]
    assert b["parameters"] == theirs["Sharded Param"] + theirs["Unsharded Param"]
    # negative control: another world size does not agree with this tracker run
    _, other = predict_cpu(RunSpec(model="test-vit", optim="adamw", parallel="fsdp", world_size=8))
    assert not compare_with_fsdp_mem_tracker(other, theirs)


def test_default_keys_are_unchanged_and_parallel_ones_say_it():
    assert RunSpec(model="m", optim="o").key == "m/o/ckpt-off/32bit/bs1/fp32/steps2/titan-x"
    assert RunSpec(model="m", optim="o", parallel="ddp", world_size=8, bucket_cap_mb=10,
                   grad_as_bucket_view=True).key.endswith("/titan-x/ddp8+cap10+view")
    assert RunSpec(model="m", optim="o", parallel="fsdp", world_size=64, reshard_after_forward=False).key.endswith(
        "/fsdp64+keep")


@pytest.mark.parametrize("given, word", [
    ({"parallel": "fsdp", "world_size": 0}, "--world-size 0"),
    ({"world_size": 8}, "--parallel ddp"),
    ({"parallel": "fsdp", "world_size": 2000}, "at most 1024"),
    ({"parallel": "fsdp", "world_size": 8, "state_bits": "8"}, "cannot step FSDP"),
    ({"parallel": "ddp", "world_size": 8, "bucket_cap_mb": -1.0}, "--bucket-cap-mb"),
    ({"parallel": "zero3"}, "zero3"),
])
def test_bad_parallel_input_is_a_usage_error(tmp_path, given, word):
    with pytest.raises(UsageError, match=word.replace("+", r"\+")):
        plan_run(run_options(models="test-vit", optims="adamw", backend="simulate", out=str(tmp_path), **given))


@pytest.mark.bitsandbytes
def test_fsdp_with_8bit_states_in_a_mixed_grid_is_skipped_with_its_reason(tmp_path):
    plan = plan_run(run_options(models="test-vit", optims="adamw", backend="simulate", out=str(tmp_path),
                                parallel="none,fsdp", world_size=1, state_bits="32,8"))
    reasons = {e.spec.key: e.skip_reason for e in plan.entries}
    assert any("cannot step FSDP" in (r or "") for r in reasons.values())
    assert sum(1 for r in reasons.values() if r is None) >= 2


def test_world_size_without_parallel_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memprof", "run", "--models", "test-vit", "--optims", "sgd",
                           "--backend", "simulate", "--world-size", "8", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--parallel" in proc.stderr


def test_the_world_size_1_measurement_trains_real_ddp_and_fsdp_on_gloo():
    """What the cuda backend measures for a parallel spec (memprof.backends.distributed), here on the CPU with
    gloo: both wrappers train for real in a world-size-1 process group, which is gone afterwards."""
    import torch.distributed as dist

    from memprof.backends.distributed import world1, wrap
    from memprof.harness import materialize, prepare, train_steps
    from memprof.optims import build_optimizer

    for parallel in ("ddp", "fsdp"):
        spec = RunSpec(model="test-vit", optim="sgd", parallel=parallel, world_size=1, budget="device")
        with world1(spec, "cpu"):
            with torch.device("meta"):
                prep = prepare(spec, load_weights=False)
            materialize(prep.model, "cpu")
            model = wrap(prep.model, spec, "cpu")
            assert (type(model).__name__ == "DistributedDataParallel") == (parallel == "ddp")
            before = [p.detach().clone() for p in prep.model.parameters()]
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_optimizer(prep.optim_info, trainable)
            train_steps(model, optimizer, spec, "cpu", lambda *a: None)
            assert any(not torch.equal(a, b.detach()) for a, b in zip(before, prep.model.parameters()))
        assert not dist.is_initialized()


def test_world1_refuses_a_larger_world_and_is_a_no_op_without_parallel():
    from memprof.backends.distributed import world1
    from memprof.errors import UsageError

    with world1(RunSpec("test-vit", "sgd")):  # negative control: nothing to set up
        pass
    with pytest.raises(UsageError, match="world size 1"):
        with world1(RunSpec("test-vit", "sgd", parallel="ddp", world_size=8)):
            pass


def test_per_gpu_table_has_a_column_per_parallelism_and_sgds_saving():
    from memprof.reports.table4 import per_gpu_rows, render_per_gpu
    from memprof.results import environment, make_record

    env = environment("simulate", "cpu-simulated")
    peaks = {("adamw", "none", 1): 400, ("sgd", "none", 1): 200, ("adamw", "fsdp", 8): 100, ("sgd", "fsdp", 8): 80}
    recs = [make_record(RunSpec(model="vit-b-16", optim=o, parallel=p, world_size=n), "ok", "predicted", env,
                        {"peak_allocated_bytes": v << 20}) for (o, p, n), v in peaks.items()]
    headers, rows = per_gpu_rows(recs)
    assert headers == ["model", "method", "none (predicted)", "fsdp8 (predicted)"]
    assert rows[-1] == ["vit-b-16", "SGD saves over AdamW", "50%", "20%"]
    assert render_per_gpu(recs).startswith("## Per GPU under DDP and FSDP")
    # negative control: without a parallel run there is no per-GPU section
    assert render_per_gpu([r for r in recs if r["spec"]["parallel"] == "none"]) == ""


def test_a_gpu_measures_world_size_1_and_the_cpu_backend_no_parallel_run():
    from memprof.plan import parallel_axes

    assert parallel_axes({"parallel": "ddp,fsdp", "world_size": 1}, [32], "cuda") == [
        {"parallel": "ddp", "world_size": 1, "bucket_cap_mb": None, "grad_as_bucket_view": False},
        {"parallel": "fsdp", "world_size": 1, "reshard_after_forward": True}]
    with pytest.raises(UsageError, match="world size 1"):
        parallel_axes({"parallel": "fsdp", "world_size": 8}, [32], "cuda")
    with pytest.raises(UsageError, match="cpu backend has no parallel"):
        parallel_axes({"parallel": "ddp", "world_size": 1}, [32], "cpu")
    assert len(parallel_axes({"parallel": "fsdp", "world_size": 8}, [32], "simulate")) == 1  # control
