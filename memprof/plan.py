"""Validation and run specs in one place: what `memprof run` (and a suite's [[run]]) asks for, checked.

`plan_run(options)` turns options (the CLI's flags, a suite's keys, a Python caller's keywords; see
RUN_OPTIONS for names and defaults) into a RunPlan: the grid of specs, the output directory, the backend
and the notes to print, or a UsageError naming the option and the fix, before anything runs.
`execute(plan)` runs it into the locked output directory and returns every record the directory holds.
The CLI and the suite runner are thin users of these two functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

from memprof.errors import UsageError
from memprof.options import RUN_OPTIONS  # every option of a run, with its default (the table: memprof.options)
from memprof.results import RESULTS_FILE, RunDirectory, read_records
from memprof.vocabulary import FAILED

EXECUTORS = ("local", "ray")
# Named sets of options. paper-2022: the paper grid as its 2022 setup ran it. PyTorch before 2.0 ran the
# optimizers' for-loop implementation on CUDA; 2.0 made foreach the default (pytorch/pytorch PR 92306 and
# PR 95862, "_actually_ default to foreach"; issue 97712 traces the 1.13 -> 2.0 memory rise to it). Whether
# the text tower stayed on the GPU is unknown, so both residents run.
PRESETS = {
    "paper-2022": {"models": "paper", "optims": "paper", "optim_impl": "forloop", "resident": "tower,clip"},
}
# Bounds no run can usefully pass. Steps: the peak is reached by step 2 (step 1 creates the optimizer state,
# step 2 runs with it); later steps repeat it, and 10000 steps of a paper model take hours per configuration.
# Batch: 2**31 - 1, the largest dimension many CUDA kernels index with 32-bit integers; even a 3x8x8 fp32 input
# of that batch is 1.5 TiB, beyond every card (a larger value overflows torch's int64 sizes as it grows).
MAX_STEPS = 10_000
MAX_BATCH_SIZE = 2 ** 31 - 1
MAX_TRAIN_STEPS = 100_000  # accuracy mode: 100 times its recipe's 1000 steps


@contextlib.contextmanager
def option(name: str):
    """Errors raised inside name the option they concern (for a suite file's line)."""
    try:
        yield
    except UsageError as exc:
        if exc.option is None:
            exc.option = name
        raise


def parsed(opts: dict, name: str):
    """Option `name` of `opts` (the table's default where not given), typed by its row's parser (memprof.options);
    a bad value is a UsageError naming the option."""
    from memprof.options import BY_NAME, parse

    with option(name):
        given = opts.get(name)
        return parse(name, BY_NAME[name].default if given is None else given)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_out() -> str:
    return os.path.join("reports", "runs", time.strftime("%Y%m%d-%H%M%S"))


def writable_dir(path: str, name: str = "out", shown: str | None = None, fix: str | None = None) -> str:
    """Create `path` if needed and prove it writable, or a UsageError naming the option (`shown`: as the
    command spells it, e.g. -o; `fix`: what to do instead of choosing another directory)."""
    if not path or not path.strip():
        raise UsageError(f"{flag(name)} is empty: give a directory, e.g. {flag(name)} reports/runs/mine", option=name)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".memprof-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{shown or flag(name)} {path} is not writable ({exc.strerror}): "
                         f"{fix or 'choose a directory you can write'}", option=name) from None
    return path


def finite(value: float | None, name: str, positive: bool = False, allow_zero: bool = False) -> None:
    """Reject nan and inf (and values <= 0 or < 0 as asked) for a numeric option."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag(name)} {value}: give a finite number", option=name)
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag(name)} {value:g}: give a positive number" + (" (or 0)" if allow_zero else ""),
                         option=name)


def resolve_backend(requested: str) -> tuple[str, str]:
    """The backend's name (auto: cuda where a GPU is present, else simulate) and the line that announces it
    (memprof.backends.registry)."""
    from memprof.backends.registry import resolve

    with option("backend"):
        backend, announce = resolve(requested)
    return backend.name, announce


def resolve_budget(budget: str | None, backend: str, notes: list) -> str:
    """The budget a run is for: the backend's default when none is given, else a card or size it accepts."""
    from memprof.backends.registry import get
    from memprof.budget import parse_budget

    chosen = get(backend)
    if budget is None:
        return chosen.default_budget
    if budget != "device":
        parse_budget(budget)
    chosen.check({"budget": budget}, notes)
    return budget


BACKEND_OPTIONS = ("snapshot", "nvml_period_ms")  # options only some backends take (Backend.takes)


def check_backend_options(opts: dict, backend: str) -> None:
    """An option the backend does not take is bad input, naming the backends that take it."""
    from memprof.backends.registry import get, names

    chosen = get(backend)
    for name in BACKEND_OPTIONS:
        if opts.get(name) is not None and name not in chosen.takes:
            takers = [n for n in names() if name in get(n).takes]
            raise UsageError(f"{flag(name)} applies to the {' and '.join(takers)} backend"
                             f"{'s' if len(takers) > 1 else ''}, not {backend}: drop {flag(name)}", option=name)


def unique(values: list, name: str, notes: list) -> list:
    """Each value once, in order; a repeated value is said once, in one line."""
    seen = list(dict.fromkeys(values))
    if len(seen) < len(values):
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        notes.append(f"memprof: note: {flag(name)} repeats {', '.join(map(str, twice))}: each runs once")
    return seen


def check_pretrained(models, pretrained: str, num_classes: int) -> None:
    """Fail fast, before the grid, when the weights are missing or do not fit a model."""
    import torch

    from memprof.models import build_model, check_pretrained as check, read_pretrained

    for info in models:
        state = read_pretrained(info, pretrained)
        with torch.device("meta"):  # shapes only; constructors keep their host values (timm's drop-path rates)
            check(build_model(info, num_classes), state, pretrained)


@dataclass
class RunPlan:
    """A validated run: what to run (grid entries), where, on which backend, and how."""

    entries: list
    out_dir: str
    backend: str
    announce: str
    options: dict
    notes: list = field(default_factory=list)
    task: str = "run"  # or "fit": each entry is a batch-size search (memprof.planning.fit)

    @property
    def worker_options(self) -> dict:
        from memprof.backends.registry import get

        backend = get(self.backend).worker_options(self.options)
        if self.task == "fit":
            from memprof.planning.fit import DEFAULT_MAX_BATCH_SIZE

            return {"max_batch_size": self.options["max_batch_size"] or DEFAULT_MAX_BATCH_SIZE,
                    "probe_options": backend, "timeout_s": self.options["timeout_s"],
                    "headroom": self.options["headroom"]}
        return backend


def run_options(preset: str | None = None, **given) -> dict:
    """RUN_OPTIONS with a preset's values, then `given` (what the user chose; None: not given), applied; an
    unknown name is a UsageError listing the known ones."""
    unknown = sorted(set(given) - set(RUN_OPTIONS))
    if unknown:
        raise UsageError(f"unknown option '{unknown[0]}' (known: {', '.join(RUN_OPTIONS)})", option=unknown[0])
    if preset is not None and preset not in PRESETS:
        from memprof.errors import unknown_name

        err = unknown_name("preset", preset, PRESETS, "memprof run --help")
        err.option = "preset"
        raise err
    return {**RUN_OPTIONS, **PRESETS.get(preset, {}), **{k: v for k, v in given.items() if v is not None}}


def plan_suite(path: str, **command) -> list[RunPlan]:
    """Every [[run]] of a suite file as a validated plan, each with the `memprof suite` command's options
    (out, resume, executor, ...); an error names the file and the line of the key it concerns."""
    from memprof.suite import load_suite

    plans = []
    for run in load_suite(path):
        try:
            plans.append(plan_run(run_options(**run.options, **command)))
        except UsageError as exc:
            raise UsageError(f"{path}:{run.line_of(exc.option)}: {exc}") from None
    return plans


def plan_fit(opts: dict, batch_size: str | None = None) -> RunPlan:
    """A validated `memprof fit`: the grid of a run without batch sizes (the search finds them); a
    `batch_size` given is bad input."""
    if batch_size is not None:
        raise UsageError(f"fit searches the batch size: drop --batch-size {batch_size} (bound the search with "
                         f"--max-batch-size)", option="batch_size")
    if opts["max_batch_size"] is not None and opts["max_batch_size"] < 1:
        raise UsageError(f"--max-batch-size {opts['max_batch_size']}: use at least 1", option="max_batch_size")
    if opts["max_batch_size"] is not None and opts["max_batch_size"] > MAX_BATCH_SIZE:
        raise UsageError(f"--max-batch-size {opts['max_batch_size']}: at most {MAX_BATCH_SIZE} (2**31 - 1, the "
                         f"largest a CUDA kernel indexes)", option="max_batch_size")
    from memprof.backends.registry import get

    if opts["backend"] != "auto":
        refusal = get(opts["backend"]).fit_refusal
        if refusal:
            raise UsageError(refusal, option="backend")
    plan = plan_run({**opts, "batch_size": "1"}, task="fit")
    if opts["headroom"] is not None:
        from memprof.budget import parse_budget, parse_headroom

        budget = plan.entries[0].spec.budget if plan.entries else "device"
        with option("headroom"):  # the device's own size is known only when it runs: the form is checked here
            parse_headroom(opts["headroom"], 1 << 62 if budget == "device" else parse_budget(budget).usable_bytes)
    return plan


@dataclass
class AdvisePlan:
    run: RunPlan  # every candidate's spec, once
    candidates: list
    not_modelled: list
    not_applicable: list


def plan_advise(opts: dict) -> AdvisePlan:
    """A validated `memprof advise`: one configuration, and every change of it (memprof.planning.advise) to predict."""
    from memprof.planning.advise import candidates
    from memprof.spec import GridEntry

    for name in ("models", "optims", "batch_size", "grad_ckpt", "state_bits", "precision", "optim_impl",
                 "optim_in_backward", "clear_grads", "grad_accum"):
        value = str(opts[name])
        if "," in value or value in ("paper", "all"):
            raise UsageError(f"advise starts from one configuration: give one value to {flag(name)} (got '{value}')",
                             option=name)
    plan = plan_run(opts)
    base = plan.entries[0]
    if base.skip_reason:
        raise UsageError(f"this configuration cannot run: {base.skip_reason}")
    cands, not_modelled, not_applicable = candidates(base.spec)
    # the configurations that share no forward (optimizer-in-backward traces its whole step) go first, so the
    # quick ones that reuse a worker's forward fill the end and both workers finish together
    specs = sorted(dict.fromkeys(c.spec for c in cands), key=lambda spec: not spec.optim_in_backward)
    plan.entries = [GridEntry(spec) for spec in specs]
    if any(e.spec.state_bits == 8 for e in plan.entries):
        from memprof.optims import require_bitsandbytes

        require_bitsandbytes(load=False)
    return AdvisePlan(plan, cands, not_modelled, not_applicable)


def parallel_axes(opts: dict, state_bits: list, backend: str) -> list[dict]:
    """--parallel, --world-size, --bucket-cap-mb, --grad-as-bucket-view, --reshard-after-forward, validated:
    the RunSpec fields of each parallelism asked for (expand_grid's `parallel`)."""
    from memprof.options import parse
    from memprof.spec import MAX_WORLD_SIZE

    kinds, world = parsed(opts, "parallel"), parsed(opts, "world_size")
    if world > MAX_WORLD_SIZE:
        raise UsageError(f"--world-size {world}: at most {MAX_WORLD_SIZE} (rank 0's shards are a few elements past "
                         f"that)", option="world_size")
    if world > 1 and kinds == ["none"]:
        raise UsageError(f"--world-size {world} needs a parallelism: add --parallel ddp or fsdp (or ddp,fsdp)",
                         option="world_size")
    if kinds != ["none"]:
        from memprof.backends.registry import get

        get(backend).check({"parallel": ",".join(kinds), "world_size": world}, [])
    if kinds == ["fsdp"] and list(state_bits) == [8]:
        raise UsageError("--parallel fsdp with --state-bits 8: bitsandbytes' 8-bit optimizers cannot step FSDP's "
                         "sharded (DTensor) parameters; use --state-bits 32", option="state_bits")
    cap = opts.get("bucket_cap_mb")
    if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap < float("inf")):
        shown = f"{cap:g}" if isinstance(cap, (int, float)) and not isinstance(cap, bool) else repr(cap)
        raise UsageError(f"--bucket-cap-mb {shown}: give a positive number of MiB (DDP's default: 25)",
                         option="bucket_cap_mb")
    for name, kind in (("bucket_cap_mb", "ddp"), ("grad_as_bucket_view", "ddp"), ("reshard_after_forward", "fsdp")):
        if opts.get(name) is not None and kind not in kinds:
            raise UsageError(f"{flag(name)} applies to --parallel {kind}: add --parallel {kind} (with --world-size N), "
                             f"or drop {flag(name)}", option=name)
    views = parse("grad_as_bucket_view", opts.get("grad_as_bucket_view")) or [False]
    reshard = parse("reshard_after_forward", opts.get("reshard_after_forward")) or [True]
    out: list[dict] = []
    for kind in kinds:
        if kind == "none":
            out.append({})
        elif kind == "ddp":
            out += [{"parallel": "ddp", "world_size": world, "bucket_cap_mb": cap, "grad_as_bucket_view": v}
                    for v in views]
        else:
            out += [{"parallel": "fsdp", "world_size": world, "reshard_after_forward": r} for r in reshard]
    return out


def plan_run(opts: dict, task: str = "run") -> RunPlan:
    """Validate every option of a run (UsageError, naming the option, on bad input) before anything runs."""
    from memprof.backends.registry import get as get_backend
    from memprof.models import parse_models, takes_input_shape
    from memprof.optims import parse_optims
    from memprof.spec import MIN_STEPS, expand_grid

    notes: list[str] = []
    backend, announce = resolve_backend(opts["backend"])
    with option("models"):
        models = parse_models(opts["models"], False, freeze=opts["freeze"], input_shape=opts["input_shape"])
        for info in models:
            get_backend(backend).check_model(info.name)
    towers = [m.name for m in models if not takes_input_shape(m)]
    if opts["input_shape"] is not None and towers:
        notes.append(f"memprof: note: --input-shape applies to timm:/torchvision:/py: models; open_clip towers "
                     f"({', '.join(towers)}) keep the image size of their config")
    with option("optims"):
        optims = parse_optims(opts["optims"])
    if opts["freeze"] and not any(o.freeze_embed for o in optims):
        raise UsageError(f"--freeze {opts['freeze']} names what a freeze-embed optimizer freezes, and none of "
                         f"{', '.join(o.name for o in optims)} freezes anything: add one (e.g. --optims sgd-fe), or "
                         f"drop --freeze", option="freeze")
    grad_ckpt = parsed(opts, "grad_ckpt")
    state_bits = unique(parsed(opts, "state_bits"), "state_bits", notes)
    batch_sizes = unique(parsed(opts, "batch_size"), "batch_size", notes)
    if max(batch_sizes) > MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size {max(batch_sizes)}: at most {MAX_BATCH_SIZE} (2**31 - 1, the largest a CUDA "
                         f"kernel indexes; no card holds a batch near it)", option="batch_size")
    training = training_axes(opts)
    check_train(models, training["train"], opts["num_classes"])
    check_peft(models, training, opts["num_classes"])
    from memprof import contrastive

    training.update(contrastive.plan(opts, models))  # --objective, --lock-image, --lock-text
    if not isinstance(opts["steps"], int) or isinstance(opts["steps"], bool):
        raise UsageError(f"--steps {opts['steps']!r}: give a whole number, e.g. --steps 2", option="steps")
    if opts["steps"] > MAX_STEPS:
        raise UsageError(f"--steps {opts['steps']}: at most {MAX_STEPS} (the peak is reached by step {MIN_STEPS}; "
                         f"later steps repeat it)", option="steps")
    if opts["steps"] < MIN_STEPS:
        raise UsageError(f"--steps {opts['steps']}: use at least {MIN_STEPS}, so the measured step runs with "
                         f"optimizer state present", option="steps")
    if opts["jobs"] is not None and opts["jobs"] < 1:
        raise UsageError(f"--jobs {opts['jobs']}: use at least 1", option="jobs")
    finite(opts["timeout_s"], "timeout_s", positive=True)
    finite(opts["nvml_period_ms"], "nvml_period_ms", positive=True, allow_zero=True)
    if opts["num_classes"] < 2:
        raise UsageError(f"--num-classes {opts['num_classes']}: use at least 2", option="num_classes")
    if opts["paged"] and 8 not in state_bits:
        raise UsageError("--paged applies to 8-bit states: add --state-bits 8 (or 32,8)", option="paged")
    resume = opts["resume"] or opts["retry_failed"]
    if resume and not opts["out"]:
        raise UsageError(f"{'--retry-failed' if opts['retry_failed'] else '--resume'} needs --out DIR: the run "
                         f"directory whose results.jsonl to continue", option="out")
    if opts["budget"] not in (None, "device"):
        from memprof.budget import parse_budget

        with option("budget"):
            parse_budget(opts["budget"])
    check_backend_options(opts, backend)
    if opts["snapshot"] is not None:
        writable_dir(opts["snapshot"], "snapshot")
    executor = opts.get("executor", "local")
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor}: use local or ray", option="executor")
    if executor == "ray":
        from memprof.executors.ray_executor import check_address

        check_address(opts.get("ray_address"))
    elif opts.get("ray_address"):
        raise UsageError("--ray-address applies to --executor ray: add --executor ray, or drop --ray-address",
                         option="ray_address")
    out_dir = writable_dir(opts["out"] if opts["out"] is not None else default_out())
    if opts["pretrained"]:
        with option("pretrained"):
            check_pretrained(models, opts["pretrained"], opts["num_classes"])
    with option("budget"):
        budget = resolve_budget(opts["budget"], backend, notes)

    with option("parallel"):
        parallel = parallel_axes(opts, state_bits, backend)
    residents = parsed(opts, "resident")
    if "clip" in residents:
        from memprof.models import text_config

        with option("resident"):
            for info in models:
                text_config(info)
    entries = [e for resident in residents for e in expand_grid(
        models, optims, grad_ckpt, state_bits, batch_sizes, paged=opts["paged"], steps=opts["steps"], budget=budget,
        num_classes=opts["num_classes"], pretrained=opts["pretrained"], resident=resident, freeze=opts["freeze"],
        input_shape=opts["input_shape"], parallel=parallel, **training)]
    if any(e.spec.state_bits == 8 and not e.skip_reason for e in entries):
        from memprof.optims import require_bitsandbytes

        with option("state_bits"):
            require_bitsandbytes(load=False)
    entries = _remaining(entries, out_dir, backend, resume, opts["retry_failed"], notes, task)
    return RunPlan(entries, out_dir, backend, announce, opts, notes, task)


def check_train(models, train: str, num_classes: int = 10) -> None:
    """--train against each model, built on the meta device (shapes only): a head or blocks the model cannot say
    where they are, or a glob that matches nothing, is a UsageError naming --train."""
    if train == "all":
        return
    import torch

    from memprof.models import build_model, trained_parameters

    with option("train"):
        for info in models:
            with torch.device("meta"):
                trained_parameters(build_model(info, num_classes), info, train)


def training_axes(opts: dict) -> dict:
    """--precision, --optim-impl, --optim-in-backward, --clear-grads, --grad-accum and --train, validated: the
    expand_grid keywords."""
    clear, precisions, impls, in_backward = (parsed(opts, n) for n in ("clear_grads", "precision", "optim_impl",
                                                                        "optim_in_backward"))
    accums, train = parsed(opts, "grad_accum"), parsed(opts, "train")
    if in_backward == [True] and max(accums) > 1:
        raise UsageError(f"--grad-accum {max(accums)} with --optim-in-backward on: optimizer-in-backward steps each "
                         "parameter inside backward, so no gradient is left to accumulate; use --optim-in-backward "
                         "off, or --grad-accum 1", option="grad_accum")
    if in_backward == [True] and precisions == ["fp16-amp"]:
        raise UsageError("--optim-in-backward on cannot honour --precision fp16-amp: GradScaler must see every gradient "
                         "(to skip the whole step on inf/nan) before any parameter is updated; use bf16-amp, or "
                         "--optim-in-backward off", option="optim_in_backward")
    if in_backward == [True] and "after-step" not in clear:
        raise UsageError("--clear-grads before-backward with --optim-in-backward on: optimizer-in-backward frees each "
                         "gradient inside backward, so there is none to keep", option="clear_grads")
    pefts = parsed(opts, "peft")
    lora = {n: parsed(opts, n) for n in LORA_OPTIONS if opts.get(n) is not None}
    if pefts == ["off"] and lora:
        name = next(iter(lora))
        raise UsageError(f"{flag(name)} applies to --peft lora or dora: add --peft lora (or off,lora), or drop "
                         f"{flag(name)}", option=name)
    if pefts != ["off"] and train != "all":
        raise UsageError(f"--train {train} with --peft {','.join(pefts)}: peft freezes every base weight and trains "
                         f"the adapters and the head, so there is nothing left for --train to choose; use --train all "
                         f"(or --peft off)", option="train")
    if pefts != ["off"]:
        from memprof.adapters import require_peft

        with option("peft"):
            require_peft(next(p for p in pefts if p != "off"))
    return {"precisions": precisions, "optim_impls": impls, "in_backward": in_backward, "clear_grads": clear,
            "grad_accums": unique(accums, "grad_accum", []), "train": train, "pefts": pefts, "lora": lora}


LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def check_peft(models, training: dict, num_classes: int = 10) -> None:
    """--peft's adapters injected into each model built on the meta device (shapes only): a target that matches no
    module, or one peft cannot adapt, is a UsageError naming --lora-targets."""
    methods = [p for p in training["pefts"] if p != "off"]
    if not methods:
        return
    import torch

    from memprof.adapters import apply_peft
    from memprof.models import build_model
    from memprof.spec import RunSpec

    with option("lora_targets"):
        for info in models:
            for method in methods:
                with torch.device("meta"):
                    apply_peft(build_model(info, num_classes), info,
                               RunSpec(info.name, "adamw", peft=method, **training["lora"]))


def _remaining(entries, out_dir: str, backend: str, resume: bool, retry_failed: bool, notes: list,
               task: str = "run") -> list:
    """The entries still to run in out_dir: all of them for a new directory; with --resume those without a
    record (and, with --retry-failed, those whose record is an error or a crash). Reusing a directory
    that holds results without --resume is refused: two runs would silently merge."""
    from memprof.records import record_key

    path = os.path.join(out_dir, RESULTS_FILE)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return entries
    records = read_records(path)
    if not resume:
        raise UsageError(f"--out {out_dir} already holds results of a run ({len(records)} configurations): add "
                         f"--resume to continue it, or choose a new --out", option="out")
    done = {r["key"] for r in records if not (retry_failed and r["status"] in FAILED)}
    todo = [e for e in entries if record_key(e.spec, backend, task) not in done]
    failed = sum(1 for r in records if r["status"] in FAILED)
    notes.append(f"memprof: resuming: {len(entries) - len(todo)} configurations already in {path}, {len(todo)} to run"
                 + (f" ({failed} failed earlier: --retry-failed reruns them)" if failed and not retry_failed else ""))
    return todo


def execute(plan: RunPlan, lock: bool = True) -> list[dict]:
    """Run a plan in its output directory (locked for the run unless the caller holds the lock); each record
    is appended to results.jsonl as it finishes. Returns every record the directory holds afterwards (this
    run's and any resumed ones)."""
    from memprof.executors.runner import default_jobs, run_grid

    with RunDirectory(plan.out_dir) if lock else contextlib.nullcontext():
        run_grid(plan.entries, plan.out_dir, plan.backend, progress=plan.options["progress"],
                 jobs=plan.options["jobs"] or default_jobs(), options=plan.worker_options,
                 timeout_s=plan.options["timeout_s"], task=plan.task, executor=plan.options.get("executor", "local"),
                 ray_address=plan.options.get("ray_address"))
    return read_records(plan.out_dir)


# --- accuracy mode --------------------------------------------------------------------------------------

def accuracy_options(**given) -> dict:
    """Accuracy mode's options: the table's (memprof.options, its defaults for `accuracy`), `given` applied, the
    recipe's where none was given (memprof.recipe); an unknown name is a UsageError listing the known ones."""
    from memprof.options import ACCURACY, defaults_of
    from memprof.recipe import DEFAULT_LR_ADAPTIVE, DEFAULT_LR_SGD, DEFAULT_STEPS

    known = {**defaults_of(ACCURACY), "num_classes": 10, "progress": True}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UsageError(f"unknown option '{unknown[0]}' (known: {', '.join(known)})")
    opts = {**known, **{k: v for k, v in given.items() if v is not None}}
    for name, default in (("train_steps", DEFAULT_STEPS), ("lr_sgd", DEFAULT_LR_SGD),
                          ("lr_adaptive", DEFAULT_LR_ADAPTIVE), ("seed", 0), ("accuracy_backend", "auto")):
        if opts[name] is None:
            opts[name] = default
    return opts


@dataclass
class AccuracyPlan:
    entries: list
    device: str
    options: dict


def _accuracy_device(choice: str, models) -> str:
    """The torch device accuracy mode trains on for --accuracy-backend (auto: the GPU where one is present)."""
    import torch

    from memprof.recipe import CPU_PARAM_LIMIT

    from memprof.backends.nvml import gpu_present

    has_gpu = gpu_present()
    device = {"auto": "cuda" if has_gpu else "cpu"}.get(choice, choice)
    if device == "cuda" and not has_gpu:
        raise UsageError("--accuracy-backend cuda needs a CUDA GPU and none is visible: use --accuracy-backend cpu "
                         "(or auto)", option="accuracy_backend")
    if device == "cpu":
        from memprof.models import build_model

        for info in models:
            with torch.device("meta"):
                n = sum(p.numel() for p in build_model(info, 2).parameters())
            if n > CPU_PARAM_LIMIT:
                raise UsageError(f"accuracy mode trains for real: {info.name} ({n / 1e6:.0f}M parameters) would take "
                                 f"hours on the CPU; use --models test-vit here, or a GPU", option="models")
    return device


def plan_accuracy(opts: dict) -> AccuracyPlan:
    """Validated accuracy grid (the same axes as a run) and the device it trains on."""
    from memprof.models import parse_models
    from memprof.optims import parse_optims, require_bitsandbytes
    from memprof.recipe import DEFAULT_STEPS
    from memprof.spec import expand_grid

    notes: list[str] = []
    with option("models"):
        models = parse_models(opts["models"], simulated=False)  # trains for real: every name runs
    with option("optims"):
        optims = parse_optims(opts["optims"])
    training = training_axes(opts)
    check_train(models, training["train"], opts["num_classes"])
    check_peft(models, training, opts["num_classes"])
    entries = expand_grid(models, optims, parsed(opts, "grad_ckpt"),
                          unique(parsed(opts, "state_bits"), "state_bits", notes),
                          unique(parsed(opts, "batch_size"), "batch_size", notes),
                          pretrained=opts["pretrained"], budget="device", **training)
    for name in ("lr_sgd", "lr_adaptive"):
        value = opts[name]
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{flag(name)} {value}: a learning rate must be a finite number, zero or positive",
                             option=name)
    if opts["train_steps"] > MAX_TRAIN_STEPS:
        raise UsageError(f"--train-steps {opts['train_steps']}: at most {MAX_TRAIN_STEPS} (100 times the recipe's "
                         f"{DEFAULT_STEPS})", option="train_steps")
    if max(e.spec.batch_size for e in entries) > MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size {max(e.spec.batch_size for e in entries)}: at most {MAX_BATCH_SIZE}",
                         option="batch_size")
    if opts["train_steps"] < 60:
        raise UsageError(f"--train-steps {opts['train_steps']}: use at least 60 (the 8-bit check compares step 50)",
                         option="train_steps")
    if any(e.spec.state_bits == 8 and not e.skip_reason for e in entries):
        require_bitsandbytes()
    if opts["data"]:
        from memprof.accuracy import load_data

        load_data((32, 32), opts["data"])  # the folder's errors, before anything trains
    if opts["pretrained"]:
        check_pretrained(models, opts["pretrained"], opts["num_classes"])
    return AccuracyPlan(entries, _accuracy_device(opts["accuracy_backend"], models), opts)


def execute_accuracy(plan: AccuracyPlan, out_dir: str) -> list[dict]:
    from memprof.accuracy import run_accuracy

    o = plan.options
    return run_accuracy(plan.entries, out_dir, plan.device, o["train_steps"], o["lr_sgd"], o["lr_adaptive"],
                        o["data"], o["seed"], progress=o["progress"])
