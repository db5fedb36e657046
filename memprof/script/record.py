"""The record of a script's run: the RunSpec its fields say was detected, and the Result (memprof.results) a
finished simulated block gives, through the engine's one entrance (SimulatedCuda.predict)."""

from __future__ import annotations

import hashlib
import os
import time


def _args_tag(args: list[str]) -> str:
    return hashlib.sha1("\0".join(args).encode()).hexdigest()[:8] if args else ""


def record_spec(sim):
    """The RunSpec a simulated run's record carries: its fields say what was detected."""
    from memprof.spec import RunSpec

    d = sim.detected
    opts = d["optimizers"]
    names = list(dict.fromkeys(o["name"].lower() for o in opts))
    impls = list(dict.fromkeys(o["implementation"] for o in opts))
    impl = impls[0] if len(impls) == 1 else ("+".join(impls) if impls else "none")
    precision = sim.precision()
    eight_bit = any(o["class"].startswith("bitsandbytes") and "8bit" in o["name"] for o in opts)
    return RunSpec(model=sim.label, optim="+".join(names) if names else "none", grad_ckpt=d["checkpointing"],
                   state_bits=8 if eight_bit else 32,
                   batch_size=d["batch_size"] or 0, precision=precision, steps=d["steps"], budget=sim.budget,
                   optim_impl=impl, optim_in_backward=d["optimizer_in_backward"], **parallel_fields(sim))


def parallel_fields(sim) -> dict:
    """The RunSpec's parallelism fields from what the script started (none: a single-process run)."""
    d = sim.detected
    kind = d.get("parallel", "none")
    if kind == "none":
        return {}
    out = {"parallel": kind, "world_size": getattr(sim, "world_size", None) or 1}
    if kind == "ddp":
        out.update(bucket_cap_mb=d["bucket_cap_mb"], grad_as_bucket_view=d["grad_as_bucket_view"])
    else:
        out["reshard_after_forward"] = d["reshard_after_forward"]
    return out


def result_of(sim, out_dir: str | None = None, snapshot_dir: str | None = None):
    """The Result of a finished SimulatedCuda block (predicted); with `out_dir` / `snapshot_dir`, its timeline and
    predicted allocator snapshot are written there (memprof.backends.simulate.write_artifacts)."""
    from memprof.backends.base import PREDICTED
    from memprof.results import Result, environment, make_record

    status, metrics = sim.predict(out_dir, snapshot_dir, record_spec(sim).key)
    d = sim.detected
    metrics.update({
        "script_batch_size": d["batch_size"],
        "script_precision": sim.precision(),
        "script_autocast_dtypes": [str(t).removeprefix("torch.") for t in d["autocast_dtypes"]],
        "script_parameter_dtypes": [t.removeprefix("torch.") for t in sim.param_dtypes()],
        "script_grad_scaler": d["grad_scaler"],
        "script_checkpointing": d["checkpointing"],
        "script_optimizers": d["optimizers"],
        "script_optimizer_in_backward": d["optimizer_in_backward"],
        "script_steps": d["steps"],
        "script_steps_limit": sim.max_steps,
        "notes": [*metrics.get("notes", []), *sim.notes.values()],  # the rules' notes, then the script's
        # random fills of CPU tensors that went to the device unread, skipped (memprof.script.deferred)
        "script_cpu_fills_skipped": sim._deferred.skipped,
    })
    if getattr(sim, "script_args", None) is not None:
        metrics["script_args"] = sim.script_args
        metrics["script_path"] = sim.user_file
    env = environment("simulate", "cpu-simulated")
    return Result(make_record(record_spec(sim), status, PREDICTED, env, metrics,
                              elapsed_s=time.perf_counter() - sim._start))


def script_label(path: str, args: list[str]) -> str:
    """`script:<path>[~<hash of the arguments>]`, the path relative to the working directory when inside it, its
    separators written ':' (a record key's segments are separated by '/')."""
    rel = os.path.relpath(path)
    name = rel if not rel.startswith("..") else os.path.abspath(path)
    tag = _args_tag(args)
    return f"script:{name.strip(os.sep).replace(os.sep, ':')}" + (f"~{tag}" if tag else "")
