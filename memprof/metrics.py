"""Every metric a results record may carry, declared once: its unit and what it is (as torch.cuda.memory_stats
documents its keys). Producers (the backends, the engine, the planner, the script runner) write these names;
reports and the baseline read them. tests/test_metrics.py fails on a record, from any front door, whose
metrics hold a name not declared here, and on a name any writer's source writes that is not declared (the
backends, the engine's rules' `metrics()` and its entrance, fit, the script runner).

Units: B (bytes), count, ratio, ms, s, text, flag (a bool), or a container of one of them.
"""

from __future__ import annotations

B, COUNT, RATIO, MS, S, TEXT, FLAG = "B", "count", "ratio", "ms", "s", "text", "flag"

METRICS: dict[str, tuple[str, str]] = {
    # the peaks (memprof.simulation.simulate predicts them; memprof.backends.cuda measures them)
    "peak_allocated_bytes": (B, "torch.cuda.max_memory_allocated over the steps: bytes in live tensors' blocks"),
    "peak_reserved_bytes": (B, "torch.cuda.max_memory_reserved: the caching allocator's segments, cache included"),
    "peak_live_bytes": (B, "the cpu backend's and CPU rules' peak of live tensor bytes (no allocator)"),
    "peak_allocated_bytes_upper": (B, "the prediction's upper band: every unmodelled allocation at its bound"),
    "peak_reserved_bytes_upper": (B, "the upper band of reserved: each unmodelled bound as a new segment"),
    "peak_phase": (TEXT, "the phase (setup, forward, backward, optimizer) the allocated peak falls in"),
    "peak_step": (COUNT, "the training step the allocated peak falls in"),
    "peak_op": (TEXT, "the op that made the allocation at the peak"),
    "phase_peak_allocated_bytes": ("dict of B", "the allocated peak of each phase"),
    "phase_peak_reserved_bytes": ("dict of B", "the reserved peak of each phase"),
    "phase_peak_live_bytes": ("dict of B", "the live-bytes peak of each phase (cpu)"),
    "breakdown_at_peak_bytes": ("dict of B", "the allocated peak by category (memprof.simulation.CATEGORIES)"),
    "top_modules_at_peak": ("list", "the modules holding most at the peak, with their categories"),
    "top_blocks_at_peak": ("list", "the same, a transformer block counted as one holder"),
    "floor_bytes": (B, "weights + gradients + optimizer state of the trainable parameters"),
    "peak_to_floor_ratio": (RATIO, "the allocated peak over the floor"),
    "optimizer_state_bytes": (B, "the optimizer's state tensors after its first step"),
    "state_bytes_per_trainable_param": (RATIO, "optimizer state bytes per trainable parameter"),
    "state_params_8bit": (COUNT, "parameters whose state bitsandbytes keeps in 8 bits"),
    "state_params_fp32_kept": (COUNT, "parameters too small for 8-bit state (kept fp32 by bitsandbytes)"),
    "paged_state_bytes": (B, "paged 8-bit state: CUDA managed memory outside torch's allocator"),
    "params_total": (COUNT, "parameters of the resident model"),
    "params_trainable": (COUNT, "parameters that train"),
    "params_frozen": (COUNT, "parameters that are frozen"),
    "parameter_bytes_frozen": (B, "peft: bytes of the frozen parameters (the base weights)"),
    "parameter_bytes_trainable": (B, "peft: bytes of the parameters that train (the adapters and the head)"),
    "script_peft": (TEXT, "memprof script: the peft adapters the script's model holds (method, rank, alpha, adapter "
                    "and trainable parameters)"),
    "adapter_params": (COUNT, "peft: the adapters' parameters (lora_A, lora_B, DoRA's magnitudes)"),
    "adapter_parameter_bytes": (B, "peft: the adapters' bytes (their gradients take as much again)"),
    "frozen_parameter_names": ("list of text", "the frozen parameters"),
    "alloc_requests": (COUNT, "allocations the step made (predicted)"),
    "unmodelled": ("list", "allocations the simulation does not model, each with its bound"),
    "rules": ("list", "the rules a prediction applied (name, summary, source)"),
    "notes": ("list of text", "what the record's reader should know (limits of the figure)"),
    "host_scalars_note": (TEXT, "CPU rules only: the optimizer's step counters, host memory on CUDA, which a CPU "
                                "allocator counts and a prediction does not"),
    # rule counters
    "attention_kernels": ("dict of count", "SDPA calls per kernel the rules chose (cudnn, flash, efficient, math)"),
    "autocast_casts": (COUNT, "casts autocast made"),
    "autocast_cache_hits": (COUNT, "casts served by autocast's weight-cast cache"),
    "in_place_accumulations": (COUNT, "gradients summed in place (autograd's input buffer)"),
    "cuda_branches": ("dict of count", "ops that took CUDA's branch of a device-dependent implementation "
                                       "(memprof.simulation.branches: dropout, rms_norm, ...)"),
    "foreach_chunk_elements": ("dict of count", "timm's foreach optimizers: elements per chunk of the update, by "
                                                "element size in bytes (null: one chunk), as timm decided for the card's "
                                                "L2 cache (memprof.simulation.rules.TimmForeachChunks)"),
    "ddp_bucket_bytes": (B, "DDP's gradient buckets"),
    "ddp_bucket_cap_bytes": (B, "DDP's bucket cap"),
    "ddp_first_bucket_cap_bytes": (B, "DDP's first bucket's cap"),
    "ddp_bucket_count": (COUNT, "DDP's buckets"),
    "ddp_bucket_copy_bytes": ("dict of B", "gradient bytes each backward copied into DDP's buckets, by step and "
                              "micro-step ('1.0': step 1's first; 0 for a micro-step under no_sync)"),
    "rank_parameter_bytes": (B, "rank 0's share of the parameters (FSDP)"),
    "rank_gradient_bytes": (B, "rank 0's share of the gradients (FSDP)"),
    "rank_optimizer_state_bytes": (B, "rank 0's share of the optimizer state (FSDP)"),
    # the budget and the verdict
    "budget_bytes": (B, "the card's memory (the budget)"),
    "budget_device": (TEXT, "the card the verdict is for"),
    "context_bytes_estimate": (B, "the CUDA context the prediction assumes (not visible to torch.cuda)"),
    "over_budget_bytes": (B, "how far an OOM's need goes past usable memory"),
    "fits": (TEXT, "yes, may not fit (the upper band reaches past the card) or no"),
    "oom": ("dict", "where an out-of-memory happened: phase, step, request, allocated and reserved then"),
    # measurements (memprof.backends.cuda, nvml, the cpu backend)
    "device_name": (TEXT, "the GPU measured"),
    "device_total_bytes": (B, "its memory"),
    "compute_capability": (TEXT, "its compute capability"),
    "context_bytes": (B, "the CUDA context, measured through NVML"),
    "nvml_device_before_init_bytes": (B, "device memory in use before CUDA was initialised (NVML)"),
    "sdpa_kernels_enabled": ("dict of flag", "the SDPA kernels torch.backends.cuda enabled"),
    "step_ms_median": (MS, "the median training step's wall time"),
    "allocator_stats": ("dict of count", "torch.cuda.memory_stats' current values and counters"),
    "nvml_available": (FLAG, "whether NVML read this process's memory"),
    "nvml_reason": (TEXT, "why not, where it did not"),
    "nvml_process_peak_bytes": (B, "the process's device memory at its NVML peak (context included)"),
    "nvml_device_peak_bytes": (B, "the whole device's memory at its NVML peak"),
    "nvml_others_peak_bytes": (B, "other processes' device memory at the peak"),
    "nvml_samples": (COUNT, "NVML readings taken"),
    "nvml_period_ms": (MS, "the NVML sampling period"),
    "nvml_series": ("list", "the NVML readings (time, bytes)"),
    "nvml_15s_sampler": ("dict", "what a 15 s sampler (nvidia-smi style) would have read"),
    "host_max_rss_bytes": (B, "the measuring process's peak resident set (cpu backend)"),
    "allocator_fraction": (RATIO, "torch.cuda.set_per_process_memory_fraction emulating a smaller budget card"),
    "setup_allocated_bytes": (B, "allocated once the model and optimizer are on the device, before the steps"),
    "baseline_allocated_bytes": (B, "allocated before a measured script's first op (not its own)"),
    # files a record names
    "timeline_file": (TEXT, "the record's timeline (timelines/*.json)"),
    "snapshot_file": (TEXT, "its allocator snapshot (recorded or predicted)"),
    # fit (memprof.planning.fit)
    "max_batch_size": (COUNT, "the largest micro-batch that fits"),
    "next_batch_status": (TEXT, "the verdict one batch above (oom, over headroom, ...)"),
    "capped_at_max_batch_size": (FLAG, "the search reached its bound and still fits"),
    "monotone": (FLAG, "whether the probes' peaks grow with the batch"),
    "fit_fixed_bytes": (B, "the linear fit's fixed part"),
    "fit_bytes_per_sample": (B, "the linear fit's bytes per sample"),
    "fit_residual_bytes": (B, "the linear fit's largest residual"),
    "search_budget_bytes": (B, "what the search fitted against (usable memory less the headroom)"),
    "search_headroom_bytes": (B, "the headroom kept free (--headroom)"),
    "search_failure": (TEXT, "the probe that failed, where one did"),
    "probes": ("list", "each probe: batch size, verdict, peaks"),
    # a user's script (memprof.script)
    "script_path": (TEXT, "the script run"),
    "script_args": ("list of text", "its arguments"),
    "script_steps": (COUNT, "optimizer steps it ran"),
    "script_forwards": (COUNT, "forwards of a model on the device it ran, outside a backward (evaluation included)"),
    "script_backwards": (COUNT, "backwards it ran (torch.autograd.backward, outermost)"),
    "incomplete_reason": (TEXT, "why a script's run is no training step's prediction (it trained no step, or "
                                  "put nothing on the device)"),
    "script_steps_limit": (COUNT, "--steps, where given"),
    "script_batch_size": (COUNT, "the leading dimension of the first batch moved to the device"),
    "script_precision": (TEXT, "the precision detected (autocast dtypes, parameter dtypes)"),
    "script_autocast_dtypes": ("list of text", "autocast dtypes seen"),
    "script_parameter_dtypes": ("list of text", "parameter dtypes seen"),
    "script_optimizers": ("list", "optimizer classes and their resolved implementation"),
    "script_optimizer_in_backward": (FLAG, "optimizers stepped from gradient hooks"),
    "script_checkpointing": (FLAG, "activation checkpointing seen"),
    "script_grad_scaler": (FLAG, "a GradScaler seen"),
    "script_cpu_fills_skipped": (COUNT, "CPU random initialisations never run: their tensors went to the device "
                                        "unread (memprof.script.deferred)"),
}


def undeclared(metrics: dict) -> list[str]:
    """The names in a record's metrics that METRICS does not declare, sorted (the script runner's names
    beginning `script_` included)."""
    return sorted(k for k in metrics if k not in METRICS)
