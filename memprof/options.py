"""Every option of every command, once: its name, its default (and where a command's differs), what a suite file may
give for it, the flag's help, which commands take it, and how a given value becomes the typed one (`parse`). The
command line (memprof.cli, memprof.script.cli), the run defaults (memprof.plan.RUN_OPTIONS), a suite's keys
(memprof.suite.KEYS), accuracy mode's and advise's options, the pytest plugin's backend and the Python API's keywords
(memprof.api) are made from this table, as pytest-benchmark declares its options once for its plugin and its command
line. A value is parsed by its own row (`parse(name, value)`: the command line's text, a suite's TOML value and the
API's Python value alike, one error message for all); what depends on several options is checked in memprof.plan.

A flag's argparse default is None ("not given"), so a preset's values and then the table's defaults apply
(memprof.plan.run_options); a switch flag (`--paged`, `--resume`) is given or not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

RUN, FIT, SUITE = "run", "fit", "suite"  # the commands an option belongs to (SUITE: a [[run]] key)
ADVISE, ACCURACY, SCRIPT, PLUGIN = "advise", "accuracy", "script", "plugin"
SWITCH = (str, bool)  # an on/off option: "on", "off", "off,on", or in a suite true/false
GRID = frozenset({RUN, FIT, SUITE})  # what a grid is made of: every front door takes it
COMMAND = frozenset({RUN, FIT})  # how a command runs (one output directory, one executor): not per [[run]]
TRAINING = GRID | {ADVISE, ACCURACY}  # how a configuration trains: advise and accuracy mode take it too


@dataclass(frozen=True)
class Option:
    name: str
    default: object
    help: str
    toml: tuple = (str,)  # the TOML value types a suite may give
    commands: frozenset = GRID
    flag: dict = field(default_factory=dict)  # argparse keywords beyond the help (type, action, choices, metavar)
    cli_name: str | None = None  # the flag when it is not --<name> (e.g. --no-progress for progress)
    parse: str | None = None  # "module:function" (value, flag) -> typed value, imported when used; None: as given
    defaults: tuple = ()  # ((command, default), ...) where a command's default differs
    not_for: tuple = ()  # ((command, why), ...): commands the option cannot apply to, and why (said if given there)

    @property
    def option_string(self) -> str:
        return self.cli_name or "--" + self.name.replace("_", "-")

    def default_for(self, command: str):
        return dict(self.defaults).get(command, self.default)


def _o(name, default, help, toml=(str,), commands=GRID, cli_name=None, parse=None, defaults=(), not_for=(),
       **flag) -> Option:
    return Option(name, default, help, toml, frozenset(commands), flag, cli_name, parse, tuple(defaults),
                  tuple(not_for))


_BUDGET_HELP = ("card or size whose memory decides OOM: titan-x (12 GiB, the paper's card size; the simulation's "
                "default), a card `memprof list budgets` names, a size such as 11GiB, or device (the whole GPU; the "
                "measuring backends' default). On a bigger GPU the cuda backend emulates the budget by capping the "
                "allocator")
_SPEC = "memprof.spec:"
_SCRIPT_PEFT = ("a script's own code decides whether peft wraps its model: memprof script runs it as written (and "
                "labels the adapters it finds)")

OPTIONS: tuple[Option, ...] = (
    # the grid
    _o("models", "paper", "comma list of models, or `paper` (default: paper; advise: one model)", commands=TRAINING,
       defaults=((ACCURACY, "test-vit"), (ADVISE, None))),
    _o("optims", "paper", "comma list of optimizers, `paper` or `all` (default: paper; advise: one optimizer)",
       commands=TRAINING, defaults=((ADVISE, None),)),
    _o("grad_ckpt", "off", "off, on or off,on (default: off; accuracy: off,on)", toml=SWITCH, commands=TRAINING,
       parse=_SPEC + "switches", defaults=((ACCURACY, "off,on"),)),
    _o("state_bits", "32", "optimizer state bits: 32, 8 or 32,8 (8: bitsandbytes block-wise 8-bit states; accuracy's "
       "default: 32,8)", toml=(str, int), commands=TRAINING, parse=_SPEC + "positive_ints", defaults=((ACCURACY, "32,8"),)),
    _o("paged", False, "8-bit states in bitsandbytes' paged optimizers (CUDA managed memory, outside torch's "
       "allocator)", toml=(bool,), action="store_true"),
    _o("batch_size", "1", "micro-batch sizes, comma list (default: 1)", toml=(str, int),
       commands={RUN, SUITE, ADVISE, ACCURACY}, parse=_SPEC + "positive_ints"),
    _o("steps", 2, "training steps per config (default: 2, the minimum)", toml=(int,), type=int),
    _o("budget", None, _BUDGET_HELP, commands=GRID | {ADVISE, SCRIPT}),
    _o("num_classes", 10, "classes of the new linear head (default: 10)", toml=(int,), type=int),
    _o("pretrained", None, "weights: a local file, or an open_clip tag found in the local cache",
       commands=GRID | {ACCURACY}),
    _o("freeze", None, "the embedding layer freeze-embed optimizers freeze: module-name globs of the network, "
       "overriding the model's declared one (e.g. 'patch_embed,norm_pre')", metavar="GLOB[,GLOB]",
       commands=GRID | {ADVISE}),
    _o("input_shape", None, "input image shape of timm:/torchvision:/py: models (required where the model cannot "
       "say, e.g. a py: factory), e.g. 3x224x224; open_clip towers keep their own", metavar="CxHxW",
       commands=GRID | {ADVISE}),
    _o("backend", "auto", "auto (default: cuda where a GPU is present, else simulate), cuda (measure with torch.cuda "
       "and NVML), simulate (predict), cpu (measure live tensor bytes on the CPU), or a backend another package "
       "registers (entry-point group memprof.backends); advise and a script: simulate unless given",
       commands=GRID | {ADVISE, SCRIPT, PLUGIN}, defaults=((ADVISE, "simulate"), (SCRIPT, "simulate"))),
    _o("resident", "tower", "what is on the device: tower (the image tower and head, default), clip (also CLIP's "
       "text tower and logit scale, frozen and unused), or tower,clip", commands=TRAINING, parse=_SPEC + "residents"),
    _o("precision", "fp32", "fp32, bf16-amp, fp16-amp, bf16 (model in bfloat16), comma list or all (default: fp32)",
       commands=TRAINING, parse=_SPEC + "precisions"),
    _o("optim_impl", "foreach", "optimizer implementation: foreach, fused, forloop, comma list or all (default: "
       "foreach)", commands=TRAINING, parse=_SPEC + "optim_impls"),
    _o("optim_in_backward", "off", "step each parameter from its post-accumulate-grad hook: off, on or off,on "
       "(default: off)", toml=SWITCH, commands=TRAINING, parse=_SPEC + "switches"),
    _o("clear_grads", "after-step", "when each step clears its gradients (zero_grad(set_to_none=True)): after-step "
       "(after the optimizer step, default) or before-backward (after the forward, as torchvision's reference script "
       "and Lightning do: the previous step's gradients live through the forward), or after-step,before-backward",
       commands=TRAINING, parse=_SPEC + "clear_grads"),
    _o("grad_accum", "1", "gradient accumulation: micro-steps (forward + backward of --batch-size) per optimizer "
       "step, the gradients alive and summed between them; the effective batch is batch x N; with --parallel ddp the "
       "first N-1 run under no_sync() (default: 1; a comma list: 1,4)", toml=(str, int),
       commands={RUN, FIT, SUITE, ADVISE}, parse=_SPEC + "grad_accums", metavar="N",
       not_for=((SCRIPT, "a script's own loop decides how it accumulates: memprof script runs it as written"),
                (ACCURACY, "accumulation sums the same gradients over micro-batches: what a configuration learns "
                 "is the larger batch's, which --batch-size already checks"))),
    _o("train", "all", "what trains (partial fine-tuning): all (default), head (a linear probe: only the "
       "classification head), last:N (the last N residual blocks, the final norm and the head) or module-name "
       "globs of the network (e.g. 'head,blocks.11.*'); the rest gets no gradient and no optimizer state",
       metavar="WHAT", commands=TRAINING | {ADVISE}, parse=_SPEC + "train",
       not_for=((SCRIPT, "a script's own code decides which parameters train (requires_grad): memprof script runs "
                 "it as written"),)),
    _o("peft", "off", "parameter-efficient fine-tuning through the peft library: off (default), lora (LoRA adapters "
       "on the frozen base weights; the head trains whole), dora (LoRA with a learned magnitude, "
       "LoraConfig(use_dora=True)), or a comma list: off,lora (pip install peft)", commands=TRAINING,
       parse=_SPEC + "pefts", not_for=((SCRIPT, _SCRIPT_PEFT),)),
    _o("lora_rank", None, "--peft: the adapters' rank r (default: 8)", toml=(int,), commands=TRAINING, metavar="R",
       parse=_SPEC + "lora_rank", not_for=((SCRIPT, _SCRIPT_PEFT),)),
    _o("lora_alpha", None, "--peft: lora_alpha, the adapters' output scaled by alpha/r (default: 16)", toml=(int,),
       commands=TRAINING, parse=_SPEC + "lora_alpha", not_for=((SCRIPT, _SCRIPT_PEFT),)),
    _o("lora_dropout", None, "--peft: dropout on the adapters' input (default: 0.0, peft's; 0.1 as Hugging Face's "
       "image-classification LoRA guide keeps a dropped copy of each adapted layer's input)", toml=(float, int),
       commands=TRAINING, parse=_SPEC + "lora_dropout", not_for=((SCRIPT, _SCRIPT_PEFT),)),
    _o("lora_targets", None, "--peft: the modules adapted, module-name globs of the network (default: each "
       "family's attention and MLP layers: open_clip/torchvision 'transformer.resblocks.*.attn' (peft's "
       "nn.MultiheadAttention layer) and the MLP linears, timm 'blocks.*.attn.qkv,blocks.*.attn.proj,"
       "blocks.*.mlp.fc1,blocks.*.mlp.fc2'; other models: every linear but the head)", metavar="GLOB[,GLOB]",
       commands=TRAINING, parse=_SPEC + "lora_targets", not_for=((SCRIPT, _SCRIPT_PEFT),)),
    _o("objective", "classify", "what trains: classify (the image tower with a linear head, default) or "
       "contrastive (both towers of an open_clip CLIP/SigLIP model on image-text pairs with open_clip's ClipLoss / "
       "SigLipLoss, as open_clip_train trains them)", parse="memprof.contrastive:objective",
       not_for=((SCRIPT, "a script's own loop decides what trains and on which loss: memprof script runs it as "
                 "written"),)),
    _o("lock_image", False, "contrastive: lock the image tower (open_clip's lock_image_tower, as open_clip_train's "
       "--lock-image): no gradient, no optimizer state", toml=(bool,), action="store_true"),
    _o("lock_text", False, "contrastive: lock the text tower (open_clip's lock_text_tower, as open_clip_train's "
       "--lock-text)", toml=(bool,), action="store_true"),
    _o("parallel", "none", "none, ddp, fsdp or a comma list: predict rank 0 of --world-size ranks (fake process "
       "group; simulate backend) (default: none)", parse=_SPEC + "parallelisms"),
    _o("world_size", 1, "ranks of --parallel (1..1024; default: 1); a script: a torchrun-style script "
       "(init_process_group, DistributedDataParallel or fully_shard) runs as rank 0 of N on a fake process group",
       toml=(int,), type=int, commands=GRID | {SCRIPT}, defaults=((SCRIPT, None),), metavar="N",
       parse=_SPEC + "world_size"),
    _o("bucket_cap_mb", None, "DDP bucket_cap_mb (default: DDP's 25, with a 1 MiB first bucket)", toml=(int, float),
       type=float),
    _o("grad_as_bucket_view", None, "DDP gradient_as_bucket_view: off, on or off,on (default: off)", toml=SWITCH,
       parse=_SPEC + "switches"),
    _o("reshard_after_forward", None, "FSDP reshard_after_forward: on, off or off,on (default: on)", toml=SWITCH,
       parse=_SPEC + "switches"),
    # what each configuration records
    _o("timeout_s", None, "cpu/cuda: a worker running longer is crashed", toml=(int, float), type=float),
    _o("snapshot", None, "write an allocator snapshot per config for https://pytorch.org/memory_viz: recorded "
       "(cuda) or predicted (simulate)", commands={RUN, SUITE}, metavar="DIR"),
    _o("nvml_period_ms", None, "cuda: NVML sampling period (default: 5; 0 = off)", toml=(int, float),
       commands={RUN, SUITE}, type=float),
    # how the command runs
    _o("out", None, "output directory (default: reports/runs/<timestamp>); one that holds results needs --resume; a "
       "script: append the record to DIR/results.jsonl, with its timeline, predicted snapshot and report.html",
       commands=COMMAND | {ADVISE, ACCURACY, SCRIPT}, metavar="DIR"),
    _o("resume", False, "continue the run in --out: skip configurations already in its results.jsonl",
       commands=COMMAND, action="store_true"),
    _o("retry_failed", False, "with --resume: also rerun configurations that errored or crashed", commands=COMMAND,
       action="store_true"),
    _o("jobs", None, "worker processes (default: up to 2, one per core)", commands=COMMAND | {ADVISE}, type=int),
    _o("progress", True, "no progress bar", commands=COMMAND | {ADVISE, ACCURACY}, cli_name="--no-progress",
       action="store_true", dest="no_progress"),  # the flag says the opposite: memprof.cli passes progress=not ...
    _o("executor", "local", "local (default: worker processes here) or ray (one Ray task per configuration; pip "
       "install -e '.[ray]')", commands=COMMAND, choices=["local", "ray"]),
    _o("ray_address", None, "with --executor ray: auto, or ray://host:10001 (default: start Ray on this machine)",
       commands=COMMAND),
    # fit's search
    _o("max_batch_size", None, "upper bound of the search (default: 4096); reaching it is said", commands={FIT},
       type=int),
    _o("headroom", None, "keep this much of the card's usable memory free: a share (5%%) or a size (1GiB); the "
       "answer is then the largest batch whose peak reserved leaves it (default: none)", commands={FIT}),
    # advise
    _o("accuracy_from", None, "a run directory with accuracy.jsonl (`memprof accuracy`): its verdicts are shown per "
       "setting", commands={ADVISE}, metavar="DIR"),
    # accuracy mode (`memprof accuracy`, and `memprof run --accuracy`)
    _o("train_steps", None, "accuracy: training steps per configuration (default: the recipe's)",
       commands={ACCURACY}, type=int),
    _o("lr_sgd", None, "accuracy: peak learning rate of SGD and LARS, cosine to 0 (default: the recipe's; the paper "
       "sweeps 3e-5..1e-2 for pretrained weights)", commands={ACCURACY}, type=float),
    _o("lr_adaptive", None, "accuracy: peak learning rate of AdamW and LAMB, cosine to 0 (default: the recipe's; the "
       "paper sweeps 3e-7..1e-4 for pretrained weights; random init needs more)", commands={ACCURACY}, type=float),
    _o("data", None, "accuracy: an ImageFolder (default: scikit-learn's digits, shipped with it)",
       commands={ACCURACY}),
    _o("seed", None, "accuracy: seed of init and batch order (default: 0)", commands={ACCURACY}, type=int),
    _o("accuracy_backend", None, "accuracy: where to train: auto, cpu or cuda (default: cuda where present, else cpu)",
       commands={ACCURACY}, choices=["auto", "cpu", "cuda"]),
    # a script (`memprof script`)
    _o("script_steps", None, "stop the script after N optimizer steps (default: let it end)", commands={SCRIPT},
       cli_name="--steps", type=int, metavar="N"),
    _o("fit_batch_arg", None, "search the script's own batch flag (e.g. --fit-batch-arg=--batch-size) for the "
       "largest batch whose prediction fits the card: doubling, then bisection, each probe a full run of the script "
       "(--steps defaults to 2 there)", commands={SCRIPT}, metavar="FLAG"),
)
BY_NAME = {o.name: o for o in OPTIONS}
RUN_OPTIONS = {o.name: o.default for o in OPTIONS if o.commands & (GRID | COMMAND)}  # a run's options (memprof.plan)
SUITE_KEYS = {o.name: (o.toml[0] if len(o.toml) == 1 else o.toml) for o in OPTIONS if SUITE in o.commands}


def options_of(command: str) -> list[Option]:
    return [o for o in OPTIONS if command in o.commands]


def defaults_of(command: str) -> dict:
    """Every option `command` takes, with its default for that command."""
    return {o.name: o.default_for(command) for o in options_of(command)}


def parse(name: str, value):
    """Option `name`'s value as given (text, a TOML value or a Python value), typed by its row's parser; a bad value is
    a UsageError naming the flag (the same words from every door)."""
    option = BY_NAME[name]
    if option.parse is None or value is None:
        return value
    module, _, function = option.parse.partition(":")
    return getattr(importlib.import_module(module), function)(value, option.option_string)


def not_applicable(command: str) -> dict:
    """Options `command` cannot take, with why: {option: why} (the table's `not_for`)."""
    return {o.name: why for o in OPTIONS for c, why in o.not_for if c == command}


def add_options(parser, command: str, names=None) -> None:
    """The flags of `command` (or of the given `names`) on an argparse parser, from the table: default None
    (not given), so presets and the table's defaults apply in memprof.plan.run_options. An option the table says
    does not apply to `command` is a hidden flag whose use is a one-line error saying why."""
    import argparse

    for o in OPTIONS:
        if (names is None and command in o.commands) or (names is not None and o.name in names):
            kwargs = {"default": False if o.name == "progress" else None, "dest": o.name, **o.flag}
            parser.add_argument(o.option_string, help=o.help, **kwargs)
        elif names is None and command in dict(o.not_for):
            why = dict(o.not_for)[command]

            class Refused(argparse.Action):
                def __call__(self, parser, namespace, values, option_string=None, why=why):
                    parser.error(f"{option_string} does not apply to {command}: {why}")

            parser.add_argument(o.option_string, help=argparse.SUPPRESS, action=Refused, default=None,
                                dest=f"_refused_{o.name}")


def given_options(args) -> dict:
    """What the user gave on the command line for the table's options (None where not given); progress from
    --no-progress."""
    given = {o.name: getattr(args, o.name) for o in OPTIONS if o.name != "progress" and hasattr(args, o.name)}
    if hasattr(args, "no_progress"):
        given["progress"] = not args.no_progress
    return given
