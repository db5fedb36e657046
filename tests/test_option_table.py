"""The option table (memprof.options) behind every front door: for each grid option, `memprof run`, a suite's
[[run]] and memprof.predict accept the same value and plan the same configurations (same keys, same options),
and a bad value gets the same one-line error from all three."""

import pytest

from memprof import cli
from memprof.api import RUN_KEYWORDS, plan_one
from memprof.errors import UsageError
from memprof.options import OPTIONS, SUITE
from memprof.plan import plan_run, plan_suite

BASE = {"models": "test-vit", "optims": "sgd-fe"}
# option -> (value as the command line gives it, as TOML and Python give it, options it needs, a bad value and the
# error it gets). A value is not the default, so a front door that dropped it would plan something else.
EXAMPLES = {
    "grad_ckpt": ("on", True, {}, "maybe", "--grad-ckpt"),
    "state_bits": ("8", 8, {}, "16", "--state-bits"),
    "paged": (None, True, {"state_bits": 8}, None, None),
    "batch_size": ("4", 4, {}, "0", "--batch-size 0"),
    "steps": ("3", 3, {}, "0", "--steps 0"),
    "budget": ("rtx4090", "rtx4090", {}, "rtx-4090", "did you mean rtx4090"),
    "num_classes": ("5", 5, {}, "0", "--num-classes"),
    "pretrained": (None, None, {}, "/nonexistent/weights.pt", "/nonexistent/weights.pt"),
    "freeze": ("conv1", "conv1", {}, None, None),  # a glob that matches nothing is found when the model is built
    "input_shape": (None, None, {}, "3x224", "--input-shape"),
    "backend": ("cpu", "cpu", {}, "simulat", "did you mean simulate"),
    "resident": ("clip", "clip", {"models": "vit-b-16"}, "gpu", "unknown resident 'gpu'"),
    "precision": ("bf16-amp", "bf16-amp", {}, "fp8", "unknown precision 'fp8': did you mean fp32?"),
    "optim_impl": ("fused", "fused", {}, "fast", "unknown optimizer implementation 'fast'"),
    "clear_grads": ("before-backward", "before-backward", {}, "before-forward",
                    "unknown --clear-grads value 'before-forward'"),
    "optim_in_backward": ("on", True, {}, "maybe", "--optim-in-backward"),
    "grad_accum": ("2", 2, {}, "0", "--grad-accum 0: must be at least 1"),
    "train": ("last:1", "last:1", {}, "blocks.9*", "--train 'blocks.9*' matches no module or parameter of test-vit"),
    "peft": ("lora", "lora", {}, "lorax", "unknown --peft method 'lorax': did you mean lora"),
    "lora_rank": ("4", 4, {"peft": "lora"}, "0", "--lora-rank 0: a LoRA rank must be at least 1"),
    "lora_alpha": ("32", 32, {"peft": "lora"}, "0", "--lora-alpha 0: must be at least 1"),
    "lora_dropout": ("0.1", 0.1, {"peft": "lora"}, "1.5", "--lora-dropout 1.5: give a probability"),
    "lora_targets": ("transformer.resblocks.*.mlp.c_fc", "transformer.resblocks.*.mlp.c_fc", {"peft": "lora"},
                     "blocks.*.qkv", "--lora-targets 'blocks.*.qkv' matches no module of test-vit"),
    "objective": ("contrastive", "contrastive", {}, "contrastiv", "unknown objective 'contrastiv': did you mean "
                  "contrastive"),
    "lock_image": (None, True, {"objective": "contrastive"}, None, None),
    "lock_text": (None, True, {"objective": "contrastive"}, None, None),
    "parallel": ("ddp", "ddp", {"world_size": 2}, "dp", "unknown parallelism 'dp': did you mean ddp, fsdp?"),
    "world_size": ("2", 2, {"parallel": "ddp"}, "0", "--world-size 0"),
    "bucket_cap_mb": ("10", 10, {"parallel": "ddp"}, "-1", "--bucket-cap-mb"),
    "grad_as_bucket_view": ("on", "on", {"parallel": "ddp"}, "maybe", "--grad-as-bucket-view"),
    "reshard_after_forward": ("off", "off", {"parallel": "fsdp"}, "maybe", "--reshard-after-forward"),
    "timeout_s": ("100", 100, {}, "-5", "--timeout-s"),
    "snapshot": ("SNAP", "SNAP", {}, None, None),
    "nvml_period_ms": (None, None, {}, "10", "--nvml-period-ms applies to the cuda backend, not simulate"),
}
GRID = [o.name for o in OPTIONS if SUITE in o.commands and o.name not in BASE]


def test_every_grid_option_has_an_example():
    assert sorted(GRID) == sorted(EXAMPLES)
    assert sorted(RUN_KEYWORDS) == sorted(n for n in GRID if n != "backend")  # control: the API takes each
    # (backend is a named parameter of predict and measure)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _toml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value).replace("'", '"')


def _via_cli(tmp_path, options: dict) -> object:
    options = {**BASE, **options}
    argv = ["run", "--out", str(tmp_path / "cli")]
    for name, value in options.items():
        argv += [_flag(name)] if value is True and name in ("paged", "lock_image", "lock_text") else [_flag(name), str(value)]
    return plan_run(cli._run_options(cli.build_parser().parse_args(argv)))


def _via_suite(tmp_path, options: dict) -> object:
    path = tmp_path / "suite.toml"
    path.write_text("[[run]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in {**BASE, "backend": "simulate",
                                                                             **options}.items()))
    return plan_suite(str(path), out=str(tmp_path / "suite"), progress=False)[0]


def _via_api(tmp_path, options: dict) -> object:
    from memprof.backends.registry import BUILTIN, get

    options = {**BASE, **options}
    backend = options.pop("backend", "simulate")
    source = get(backend).source if backend in BUILTIN else "predicted"  # predict() or measure()
    return plan_one(options.pop("models"), options.pop("optims"), backend, source, str(tmp_path / "api"), **options)


def _same(plan) -> tuple:
    """What a plan runs: each configuration (its spec: the record key), its skip reason, the backend, and what
    each record carries beyond its spec."""
    import os

    recorded = [plan.options["timeout_s"], plan.options["nvml_period_ms"],
                plan.options["snapshot"] and os.path.basename(plan.options["snapshot"])]
    return [e.spec for e in plan.entries], [e.skip_reason for e in plan.entries], plan.backend, \
        [None if v is None else float(v) if isinstance(v, (int, float)) else v for v in recorded]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_run_suite_and_predict_plan_the_same(tmp_path, name):
    cli_value, value, needs, _, _ = EXAMPLES[name]
    if value is None:
        pytest.skip(f"{name}: no value that plans on this machine without a file (its bad value is checked)")
    given_cli = {**{k: str(v) for k, v in needs.items()}, name: cli_value if cli_value is not None else value}
    given = {**needs, name: value}
    if name == "snapshot":
        given_cli[name] = given[name] = str(tmp_path / "SNAP")
    planned = [_same(_via_cli(tmp_path, given_cli)), _same(_via_suite(tmp_path, dict(given))),
               _same(_via_api(tmp_path, dict(given)))]
    assert planned[0] == planned[1] == planned[2]
    try:  # negative control: the same without the option
        default = _same(_via_api(tmp_path, dict(needs)))
    except UsageError:  # an option that needs this one (world_size 2 needs parallel)
        default = _same(_via_api(tmp_path, {k: v for k, v in needs.items() if k == "models"}))
    assert planned[0] != default, f"{name}={value!r} plans the same as its default: the check could not fail"


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if EXAMPLES[n][3] is not None))
def test_a_bad_value_gets_the_same_one_line_error_from_every_front_door(tmp_path, name):
    _, _, needs, bad, expect = EXAMPLES[name]
    errors = []
    needs = {"backend": "simulate", **needs}  # the CLI's auto is simulate here; said, so every door plans alike
    for via, given in ((_via_cli, {**{k: str(v) for k, v in needs.items()}, name: bad}),
                       (_via_suite, {**needs, name: _typed(name, bad)}), (_via_api, {**needs, name: _typed(name, bad)})):
        with pytest.raises(UsageError) as exc:
            via(tmp_path, given)
        errors.append(str(exc.value))
    assert all(expect in e and "\n" not in e for e in errors), errors
    assert errors[1].endswith(errors[0]) and errors[2] == errors[0], errors  # the suite adds its file:line


def _typed(name: str, text: str):
    """The bad value as TOML and Python give it: a number where the option is a number."""
    option = next(o for o in OPTIONS if o.name == name)
    if option.toml[0] is int or (int in option.toml and str not in option.toml):
        return int(text) if text.lstrip("-").isdigit() else float(text)
    if float in option.toml and str not in option.toml:
        return float(text)
    return text


# --- every command draws its options from the table ---------------------------------------------------------------

COMMANDS = ("run", "fit", "advise", "accuracy", "script")


def _parser_of(command: str):
    sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_its_table_options_with_the_tables_help(command):
    from memprof.options import options_of

    flags = {opt: action for action in _parser_of(command)._actions for opt in action.option_strings}
    for o in options_of(command):
        action = flags.get(o.option_string)
        assert action is not None, f"{command} lacks {o.option_string}"
        assert action.help == o.help and action.default in (None, False), (command, o.name)
        # the value lands under the row's name, where the command reads it (`--steps` of script: script_steps)
        assert action.dest == (o.flag.get("dest") or o.name), (command, o.option_string, action.dest)
    # negative control: an option of another command is not there
    assert "--headroom" not in flags or command == "fit"


@pytest.mark.parametrize("argv,expect", [
    (["--grad-ckpt", "maybe"], "--grad-ckpt 'maybe': use off, on or off,on"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--clear-grads", "never"], "unknown --clear-grads value 'never'"),
    (["--train", "last:0"], "--train 'last:0': give the number of last blocks that train"),
    (["--peft", "lora", "--lora-rank", "0"], "--lora-rank 0: a LoRA rank must be at least 1"),
    (["--lora-rank", "4"], "--lora-rank applies to --peft lora or dora: add --peft lora"),
])
def test_a_bad_value_reads_the_same_from_run_advise_and_accuracy(tmp_path, capsys, argv, expect):
    errors = []
    for command, extra in (("run", ["--models", "test-vit"]), ("advise", ["--models", "test-vit", "--optims", "sgd"]),
                           ("accuracy", [])):
        code = cli.main([command, *extra, *argv, "--out", str(tmp_path / command)])
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        errors.append(err.strip().removeprefix("memprof: error: "))
    assert all(expect in e for e in errors) and len(set(errors)) == 1, errors


def test_world_size_reads_the_same_from_run_script_and_the_api(tmp_path, capsys):
    from memprof.script import simulated_cuda

    script = tmp_path / "t.py"
    script.write_text("pass\n")
    said = []
    for argv in (["run", "--models", "test-vit", "--parallel", "ddp", "--world-size", "0"],
                 ["script", "--world-size", "0", str(script)]):
        assert cli.main(argv) == 2
        said.append(capsys.readouterr().err.strip())
    with pytest.raises(UsageError) as exc:
        simulated_cuda(world_size=0)
    said.append(f"memprof: error: {exc.value}")
    assert len(set(said)) == 1 and "--world-size 0: use a whole number of at least 1" in said[0], said


def test_grad_accum_reads_the_same_from_run_fit_and_advise(tmp_path, capsys):
    errors = []
    for command, extra in (("run", ["--models", "test-vit"]), ("fit", ["--models", "test-vit"]),
                           ("advise", ["--models", "test-vit", "--optims", "sgd"])):
        assert cli.main([command, *extra, "--grad-accum", "0", "--out", str(tmp_path / command)]) == 2
        errors.append(capsys.readouterr().err.strip())
    assert len(set(errors)) == 1 and "--grad-accum 0: must be at least 1" in errors[0], errors


@pytest.mark.parametrize("command,flag", [("script", "--grad-accum"), ("script", "--train"), ("script", "--peft"),
                                          ("script", "--lora-rank"),
                                          ("accuracy", "--grad-accum")])
def test_an_option_the_table_says_does_not_apply_is_refused_with_why(tmp_path, capsys, command, flag):
    from memprof.options import not_applicable

    script = tmp_path / "t.py"
    script.write_text("pass\n")
    argv = [command, flag, "2" if flag == "--grad-accum" else "head"] + ([str(script)] if command == "script" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    why = not_applicable(command)[flag[2:].replace("-", "_")]
    assert f"{flag} does not apply to {command}: {why}" in err and "\n" not in err, err
    assert "--grad-accum" not in cli.build_parser().format_help()  # hidden, not offered (control: run's help has it)
    assert "--grad-accum" in _parser_of("run").format_help() and "--grad-accum" not in _parser_of(command).format_help()
