"""Every option of a run, once: its name, default, what a suite file may give for it, the flag's help and
which commands take it. The command line (memprof.cli), the run defaults (memprof.plan.RUN_OPTIONS), a
suite's keys (memprof.suite.KEYS) and the Python API's keywords (memprof.api) are made from this table, as
pytest-benchmark declares its options once for its plugin and its command line; the values are checked in one
place, memprof.plan.plan_run.

A flag's argparse default is None ("not given"), so a preset's values and then the table's defaults apply
(memprof.plan.run_options); a switch flag (`--paged`, `--resume`) is given or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUN, FIT, SUITE = "run", "fit", "suite"  # the commands an option belongs to (SUITE: a [[run]] key)
SWITCH = (str, bool)  # an on/off option: "on", "off", "off,on", or in a suite true/false
GRID = frozenset({RUN, FIT, SUITE})  # what a grid is made of: every front door takes it
COMMAND = frozenset({RUN, FIT})  # how a command runs (one output directory, one executor): not per [[run]]


@dataclass(frozen=True)
class Option:
    name: str
    default: object
    help: str
    toml: tuple = (str,)  # the TOML value types a suite may give
    commands: frozenset = GRID
    flag: dict = field(default_factory=dict)  # argparse keywords beyond the help (type, action, choices, metavar)
    cli_name: str | None = None  # the flag when it is not --<name> (e.g. --no-progress for progress)

    @property
    def option_string(self) -> str:
        return self.cli_name or "--" + self.name.replace("_", "-")


def _o(name, default, help, toml=(str,), commands=GRID, cli_name=None, **flag) -> Option:
    return Option(name, default, help, toml, frozenset(commands), flag, cli_name)


_BUDGET_HELP = ("card or size whose memory decides OOM: titan-x (12 GiB, the paper's card size; the simulation's "
                "default), a card `memprof list budgets` names, a size such as 11GiB, or device (the whole GPU; the "
                "measuring backends' default). On a bigger GPU the cuda backend emulates the budget by capping the "
                "allocator")

OPTIONS: tuple[Option, ...] = (
    # the grid
    _o("models", "paper", "comma list of models, or `paper` (default: paper)"),
    _o("optims", "paper", "comma list of optimizers, `paper` or `all` (default: paper)"),
    _o("grad_ckpt", "off", "off, on or off,on (default: off)", toml=SWITCH),
    _o("state_bits", "32", "optimizer state bits: 32, 8 or 32,8 (8: bitsandbytes block-wise 8-bit states)",
       toml=(str, int)),
    _o("paged", False, "8-bit states in bitsandbytes' paged optimizers (CUDA managed memory, outside torch's "
       "allocator)", toml=(bool,), action="store_true"),
    _o("batch_size", "1", "micro-batch sizes, comma list (default: 1)", toml=(str, int), commands={RUN, SUITE}),
    _o("steps", 2, "training steps per config (default: 2, the minimum)", toml=(int,), type=int),
    _o("budget", None, _BUDGET_HELP),
    _o("num_classes", 10, "classes of the new linear head (default: 10)", toml=(int,), type=int),
    _o("pretrained", None, "weights: a local file, or an open_clip tag found in the local cache"),
    _o("freeze", None, "the embedding layer freeze-embed optimizers freeze: module-name globs of the network, "
       "overriding the model's declared one (e.g. 'patch_embed,norm_pre')", metavar="GLOB[,GLOB]"),
    _o("input_shape", None, "input image shape of timm:/torchvision:/py: models (required where the model cannot "
       "say, e.g. a py: factory), e.g. 3x224x224; open_clip towers keep their own", metavar="CxHxW"),
    _o("backend", "auto", "auto (default: cuda where a GPU is present, else simulate), cuda (measure with torch.cuda "
       "and NVML), simulate (predict), cpu (measure live tensor bytes on the CPU), or a backend another package "
       "registers (entry-point group memprof.backends)"),
    _o("resident", "tower", "what is on the device: tower (the image tower and head, default), clip (also CLIP's "
       "text tower and logit scale, frozen and unused), or tower,clip"),
    _o("precision", "fp32", "fp32, bf16-amp, fp16-amp, bf16 (model in bfloat16), comma list or all (default: fp32)"),
    _o("optim_impl", "foreach", "optimizer implementation: foreach, fused, forloop, comma list or all (default: "
       "foreach)"),
    _o("optim_in_backward", "off", "step each parameter from its post-accumulate-grad hook: off, on or off,on "
       "(default: off)", toml=SWITCH),
    _o("clear_grads", "after-step", "when each step clears its gradients (zero_grad(set_to_none=True)): after-step "
       "(after the optimizer step, default) or before-backward (after the forward, as torchvision's reference script "
       "and Lightning do: the previous step's gradients live through the forward), or after-step,before-backward"),
    _o("parallel", "none", "none, ddp, fsdp or a comma list: predict rank 0 of --world-size ranks (fake process "
       "group; simulate backend) (default: none)"),
    _o("world_size", 1, "ranks of --parallel (1..1024; default: 1)", toml=(int,), type=int),
    _o("bucket_cap_mb", None, "DDP bucket_cap_mb (default: DDP's 25, with a 1 MiB first bucket)", toml=(int, float),
       type=float),
    _o("grad_as_bucket_view", None, "DDP gradient_as_bucket_view: off, on or off,on (default: off)", toml=SWITCH),
    _o("reshard_after_forward", None, "FSDP reshard_after_forward: on, off or off,on (default: on)", toml=SWITCH),
    # what each configuration records
    _o("timeout_s", None, "cpu/cuda: a worker running longer is crashed", toml=(int, float), type=float),
    _o("snapshot", None, "write an allocator snapshot per config for https://pytorch.org/memory_viz: recorded "
       "(cuda) or predicted (simulate)", commands={RUN, SUITE}, metavar="DIR"),
    _o("nvml_period_ms", None, "cuda: NVML sampling period (default: 5; 0 = off)", toml=(int, float),
       commands={RUN, SUITE}, type=float),
    # how the command runs
    _o("out", None, "output directory (default: reports/runs/<timestamp>); one that holds results needs --resume",
       commands=COMMAND),
    _o("resume", False, "continue the run in --out: skip configurations already in its results.jsonl",
       commands=COMMAND, action="store_true"),
    _o("retry_failed", False, "with --resume: also rerun configurations that errored or crashed", commands=COMMAND,
       action="store_true"),
    _o("jobs", None, "worker processes (default: up to 2, one per core)", commands=COMMAND, type=int),
    _o("progress", True, "no progress bar", commands=COMMAND, cli_name="--no-progress", action="store_true",
       dest="no_progress"),  # the flag says the opposite: memprof.cli passes progress=not args.no_progress
    _o("executor", "local", "local (default: worker processes here) or ray (one Ray task per configuration; pip "
       "install -e '.[ray]')", commands=COMMAND, choices=["local", "ray"]),
    _o("ray_address", None, "with --executor ray: auto, or ray://host:10001 (default: start Ray on this machine)",
       commands=COMMAND),
    # fit's search
    _o("max_batch_size", None, "upper bound of the search (default: 4096); reaching it is said", commands={FIT},
       type=int),
    _o("headroom", None, "keep this much of the card's usable memory free: a share (5%%) or a size (1GiB); the "
       "answer is then the largest batch whose peak reserved leaves it (default: none)", commands={FIT}),
)
BY_NAME = {o.name: o for o in OPTIONS}
RUN_OPTIONS = {o.name: o.default for o in OPTIONS}  # every option with its default (memprof.plan)
SUITE_KEYS = {o.name: (o.toml[0] if len(o.toml) == 1 else o.toml) for o in OPTIONS if SUITE in o.commands}


def add_options(parser, command: str, names=None) -> None:
    """The flags of `command` (or of the given `names`) on an argparse parser, from the table: default None
    (not given), so presets and the table's defaults apply in memprof.plan.run_options."""
    for o in OPTIONS:
        if (names is None and command in o.commands) or (names is not None and o.name in names):
            kwargs = {"default": False if o.name == "progress" else None, **o.flag}
            parser.add_argument(o.option_string, help=o.help, **kwargs)


def given_options(args) -> dict:
    """What the user gave on the command line for the table's options (None where not given); progress from
    --no-progress."""
    given = {o.name: getattr(args, o.name) for o in OPTIONS if o.name != "progress" and hasattr(args, o.name)}
    if hasattr(args, "no_progress"):
        given["progress"] = not args.no_progress
    return given
