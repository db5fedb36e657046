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
                   optim_impl=impl, optim_in_backward=d["optimizer_in_backward"], **parallel_fields(sim),
                   **peft_fields(sim))


def peft_fields(sim) -> dict:
    """The RunSpec's --peft fields from the adapters the script's model holds (none: not wrapped by peft; a
    method memprof's --peft does not name, LoHa or IA3, is said in the record's script_peft alone)."""
    found = sim.detected.get("peft")
    if not found or found["method"] not in ("lora", "dora"):
        return {}
    return {"peft": found["method"], "lora_rank": found["rank"], "lora_alpha": found["alpha"]}


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


def detected_metrics(device) -> dict:
    """The record's `script_*` fields: what a script's run was seen to do (memprof.script.detection), the same for
    the simulated device and the measured one."""
    d = device.detected
    out = {
        "script_batch_size": d["batch_size"],
        "script_precision": device.precision(),
        "script_autocast_dtypes": [str(t).removeprefix("torch.") for t in d["autocast_dtypes"]],
        "script_parameter_dtypes": [t.removeprefix("torch.") for t in device.param_dtypes()],
        "script_grad_scaler": d["grad_scaler"],
        "script_checkpointing": d["checkpointing"],
        "script_optimizers": d["optimizers"],
        "script_optimizer_in_backward": d["optimizer_in_backward"],
        "script_steps": d["steps"],
        "script_forwards": d["forwards"],
        "script_backwards": d["backwards"],
        "script_steps_limit": device.max_steps,
    }
    if d.get("peft"):
        from memprof.adapters import detected_words

        trainable = sum(n for _, n, _, rg, _ in device._param_info.values() if rg)
        out["script_peft"] = detected_words(d["peft"], trainable)
    if getattr(device, "script_args", None) is not None:
        out["script_args"] = device.script_args
        out["script_path"] = device.user_file
    return out


def script_result(device, status: str, source: str, env: dict, metrics: dict):
    """The Result of a finished device block: an `ok` run that completed no training step (or put nothing on the
    device) is `incomplete`, with the reason and no verdict on the card."""
    from memprof.results import Result, make_record

    metrics = {**metrics, **detected_metrics(device)}
    if "script_peft" in metrics:
        metrics["notes"] = [*metrics.get("notes", []), metrics["script_peft"]]
    reason = device.incomplete(bool(metrics.get("peak_allocated_bytes")))
    error = getattr(device, "error", None)
    if error is not None:  # the script's own error: what ran before it, no verdict on the card
        status = "error"
    elif status == "ok" and reason is not None:
        status = "incomplete"
        metrics["incomplete_reason"] = reason
    if status in ("error", "incomplete"):
        metrics.pop("fits", None)
        metrics.pop("over_budget_bytes", None)
    return Result(make_record(record_spec(device), status, source, env, metrics, error=error,
                              elapsed_s=time.perf_counter() - device._start))


def result_of(sim, out_dir: str | None = None, snapshot_dir: str | None = None):
    """The Result of a finished SimulatedCuda block (predicted); with `out_dir` / `snapshot_dir`, its timeline and
    predicted allocator snapshot are written there (memprof.reports.artifacts.write_artifacts)."""
    from memprof.vocabulary import Source
    from memprof.results import environment

    status, metrics = sim.predict(out_dir, snapshot_dir, record_spec(sim).key)
    metrics["notes"] = [*metrics.get("notes", []), *sim.notes.values()]  # the rules' notes, then the script's
    # random fills of CPU tensors that went to the device unread, skipped (memprof.script.deferred)
    metrics["script_cpu_fills_skipped"] = sim.deferred.skipped
    return script_result(sim, status, Source.PREDICTED, environment("simulate", "cpu-simulated"), metrics)


def script_label(path: str, args: list[str]) -> str:
    """`script:<path>[~<hash of the arguments>]`, the path relative to the working directory when inside it, its
    separators written ':' (a record key's segments are separated by '/')."""
    rel = os.path.relpath(path)
    name = rel if not rel.startswith("..") else os.path.abspath(path)
    tag = _args_tag(args)
    return f"script:{name.strip(os.sep).replace(os.sep, ':')}" + (f"~{tag}" if tag else "")
