"""When something goes wrong: a user's failing factory named by file:line, damaged records and files, full disks,
signals, the exit codes of faults, bounds, options that were silently accepted, and messages that misled. Each check has a negative control showing it catches the
broken case."""

import contextlib
import io
import itertools
import json
import textwrap
import traceback

import pytest

from memprof import cli

RUN = ["run", "--models", "test-vit", "--optims", "sgd", "--jobs", "1", "--no-progress", "--backend", "simulate"]


def run_cli(*argv):
    """(exit code, stderr, traceback or None) of cli.main, as the bad-input sweep sees it: any exception that
    escapes (SystemExit included) is a traceback."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(list(argv))
    except BaseException:  # noqa: BLE001 - exactly what is counted
        return None, err.getvalue(), traceback.format_exc()
    return code, err.getvalue(), None


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("memprof: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --- a user's factory -------------------------------------------------------------------------------------

FACTORIES = textwrap.dedent("""\
    import os
    import sys
    import torch


    def good():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


    def raises():
        raise ValueError("boom from the user")


    def needs_arg(width):
        return torch.nn.Linear(width, 2)


    def exits():
        sys.exit(3)


    def second_call_fails():
        if os.path.exists(os.environ["MEMPROF_TEST_MARK"]):
            raise RuntimeError("not on the second call")
        open(os.environ["MEMPROF_TEST_MARK"], "w").close()
        return good()
    """)


_MODULES = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of factories on sys.path, under a name unique to the test (nothing cached between tests)."""
    name = f"memprof_user_{next(_MODULES)}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MEMPROF_TEST_MARK", str(tmp_path / "mark"))
    return name, tmp_path / f"{name}.py"


def _user_run(tmp_path, model):
    return run_cli("run", "--models", model, "--optims", "sgd", "--backend", "simulate", "--jobs", "1",
                   "--no-progress", "--input-shape", "3x8x8", "--out", str(tmp_path / "out"))


@pytest.mark.parametrize("factory, line, said", [("raises", 11, "raised ValueError: boom from the user"),
                                                  ("needs_arg", 14, "zero-argument factory"),
                                                  ("exits", 19, "called sys.exit(3)")])
def test_a_failing_factory_is_one_line_naming_its_file_and_line(tmp_path, user_module, factory, line, said):
    name, path = user_module
    code, err, tb = _user_run(tmp_path, f"py:{name}:{factory}")
    assert tb is None and code == 2, (tb, err)
    message = error_line(err)
    assert f"{path}:{line}" in message and said in message, message


@pytest.mark.parametrize("source, line, said", [("import nonexistent_pkg_xyz\n", 1, "No module named"),
                                                ("x = 1\nraise SystemExit(5)\n", 2, "sys.exit(5)"),
                                                ("def f(:\n", 1, "syntax error")])
def test_a_module_that_fails_to_import_is_named_with_its_line(tmp_path, monkeypatch, source, line, said):
    name = f"memprof_badimport_{next(_MODULES)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err, tb = _user_run(tmp_path, f"py:{name}:f")
    assert tb is None and code == 2, (tb, err)
    message = error_line(err)
    assert f"{tmp_path / name}.py:{line}" in message and said in message, message


def test_a_failing_factory_in_a_suite_names_the_suite_line_and_its_own(tmp_path, user_module):
    name, path = user_module
    suite = tmp_path / "s.toml"
    suite.write_text(f'[[run]]\nbackend = "simulate"\nmodels = "py:{name}:raises"\noptims = "sgd"\n')
    code, err, tb = run_cli("suite", str(suite), "--out", str(tmp_path / "out"), "--no-progress")
    assert tb is None and code == 2, (tb, err)
    message = error_line(err)
    assert f"{suite}:3:" in message and f"{path}:11" in message, message


def test_a_factory_failing_inside_a_configuration_is_an_error_record_with_its_line(tmp_path, user_module):
    name, path = user_module
    code, err, tb = _user_run(tmp_path, f"py:{name}:second_call_fails")
    assert tb is None and code == 1, (tb, err)
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "error" and f"{path}:24" in record["error"], record["error"]


def test_a_factory_failing_while_weights_are_checked_is_one_line(tmp_path, user_module):
    """Planning builds the model a second time to check --pretrained: a failure there is bad input (exit 2)."""
    import torch

    name, path = user_module
    torch.save({}, tmp_path / "w.pt")
    code, err, tb = run_cli("run", "--models", f"py:{name}:second_call_fails", "--optims", "sgd", "--backend",
                            "simulate", "--input-shape", "3x8x8", "--pretrained", str(tmp_path / "w.pt"), "--out",
                            str(tmp_path / "out"))
    assert tb is None and code == 2 and f"{path}:24" in error_line(err), (tb, err)


def test_negative_control_an_unguarded_factory_escapes(tmp_path, user_module, monkeypatch):
    """Without the guard the factory's sys.exit leaves cli.main (the harness counts it), and a good factory
    in the same module runs: the error is the factory's, not the module's."""
    from memprof.model_sources import py

    name, _ = user_module
    assert _user_run(tmp_path / "a", f"py:{name}:good")[0] == 0
    monkeypatch.setattr(py, "call_factory", lambda model, factory, error=None: factory())
    code, _, tb = _user_run(tmp_path / "b", f"py:{name}:exits")
    assert code is None and "SystemExit" in tb


# --- files a run left, damaged ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code, err, tb = run_cli(*RUN, "--optims", "sgd,adamw", "--out", str(out))
    assert code == 0, (err, tb)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _edit_first_record(run_dir, section, name, value):
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    (rec[section] if section else rec)[name] = value
    (run_dir / "results.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")


@pytest.mark.parametrize("section, name, value", [("metrics", "peak_allocated_bytes", "big"),
                                                  ("metrics", "breakdown_at_peak_bytes", {"activations": "x"}),
                                                  ("metrics", "top_blocks_at_peak", "x"),
                                                  ("spec", "model", 3), ("spec", "batch_size", True),
                                                  ("environment", "backend", 5)])
def test_resume_into_a_record_edited_to_the_wrong_type_names_line_and_field(run_copy, section, name, value):
    _edit_first_record(run_copy, section, name, value)
    for argv in ([*RUN, "--optims", "sgd,adamw,sgd-fe", "--out", str(run_copy), "--resume"], ["table", str(run_copy)],
                 ["report", str(run_copy)], ["compare", str(run_copy), str(run_copy)]):
        code, err, tb = run_cli(*argv)
        assert tb is None and code == 2, (argv, tb, err)
        message = error_line(err)
        assert "results.jsonl:1: " in message and f"'{name}' is" in message, message


def test_negative_control_the_right_type_resumes(run_copy):
    """The same edit with a value of the right type is accepted: the check is on types, not on values."""
    _edit_first_record(run_copy, "metrics", "peak_allocated_bytes", 12345)
    code, err, tb = run_cli(*RUN, "--optims", "sgd,adamw,sgd-fe", "--out", str(run_copy), "--resume")
    assert tb is None and code == 0, (tb, err)


def test_report_on_a_truncated_timeline_draws_the_rest_and_says_so(run_copy):
    from memprof.reports.timeline import load_timeline

    timeline = sorted((run_copy / "timelines").glob("*.json"))[0]
    timeline.write_text(timeline.read_text()[:300])
    with pytest.raises(ValueError):  # negative control: the file really is unreadable
        load_timeline(str(timeline))
    code, err, tb = run_cli("report", str(run_copy))
    assert tb is None and code == 0, (tb, err)
    assert "is unreadable" in (run_copy / "report.html").read_text()


# --- the pytest plugin's --memprof-json -------------------------------------------------------------------

PLUGIN_TEST = '''
import shutil

import torch


def build():
    model = torch.nn.Linear(8, 2)
    return model, torch.optim.SGD(model.parameters())


def batch():
    return torch.randn(4, 8), torch.randint(0, 2, (4,))


def step(model, optimizer, inputs):
    x, y = inputs
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_a(cuda_memory):
    cuda_memory.step(build, step, batch)
'''


def _pytest(pytester, body, *args):
    from tests.test_plugin import LOAD_PLUGIN

    pytester.makepyfile(test_user=PLUGIN_TEST + body)
    return pytester.runpytest(*LOAD_PLUGIN, "--memprof-backend", "simulate", *args)


def test_memprof_json_to_an_unwritable_path_is_refused_before_the_tests(pytester, tmp_path, torch_imported_once):
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "out.jsonl"
    result = _pytest(pytester, "", "--memprof-json", str(target))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--memprof-json {target} is not writable" in result.stderr.str(), result.stderr.str()


def test_memprof_json_that_fails_after_the_tests_is_an_error_line_not_a_crash(pytester, tmp_path, torch_imported_once):
    """The folder goes away while the tests run: the session fails with one line naming the path."""
    folder = tmp_path / "out"
    body = f"\n\ndef test_remove_the_folder():\n    shutil.rmtree({str(folder)!r})\n"
    result = _pytest(pytester, body, "--memprof-json", str(folder / "m.jsonl"))
    result.assert_outcomes(passed=2)
    assert result.ret == 1 and "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([f"*memprof: error: cannot write --memprof-json {folder / 'm.jsonl'}*"])


def test_negative_control_memprof_json_kept_writable_passes(pytester, tmp_path, torch_imported_once):
    kept = _pytest(pytester, "", "--memprof-json", str(tmp_path / "m.jsonl"))
    assert kept.ret == 0 and (tmp_path / "m.jsonl").read_text().count("\n") == 1


# --- bounds -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, said", [
    ([*RUN, "--steps", "100000000"], "--steps 100000000: at most 10000"),
    ([*RUN, "--batch-size", "9223372036854775808"], "at most 2147483647"),
    ([*RUN, "--batch-size", "1,2147483648"], "--batch-size 2147483648: at most 2147483647"),
    (["fit", "--models", "test-vit", "--backend", "simulate", "--max-batch-size", "4294967296"], "at most 2147483647"),
    (["accuracy", "--train-steps", "100000000", "--state-bits", "32"], "at most 100000"),
])
def test_values_no_run_can_use_are_refused_saying_the_limit(tmp_path, argv, said):
    code, err, tb = run_cli(*argv, "--out", str(tmp_path / "out"))
    assert tb is None and code == 2, (tb, err)
    assert said in error_line(err)


@pytest.mark.parametrize("value, said", [("99999999999999999999", ":4: --steps 99999999999999999999: at most 10000"),
                                         ("true", ":4: 'steps' has the wrong type (bool)")])
def test_a_suite_steps_out_of_bounds_names_its_line(tmp_path, value, said):
    suite = tmp_path / "s.toml"
    suite.write_text(f'[[run]]\nbackend = "simulate"\nmodels = "test-vit"\nsteps = {value}\n')
    code, err, tb = run_cli("suite", str(suite), "--out", str(tmp_path / "out"))
    assert tb is None and code == 2, (tb, err)
    assert f"{suite}{said}" in error_line(err)


def test_negative_control_the_limits_themselves_are_accepted(tmp_path):
    from memprof.plan import MAX_BATCH_SIZE, MAX_STEPS, plan_run, run_options

    plan = plan_run(run_options(models="test-vit", optims="sgd", backend="simulate", steps=MAX_STEPS,
                                batch_size=f"1,{MAX_BATCH_SIZE}", out=str(tmp_path / "out")))
    assert [e.spec.batch_size for e in plan.entries] == [1, MAX_BATCH_SIZE] and plan.entries[0].spec.steps == MAX_STEPS


# --- faults: a full disk, SIGTERM, Ctrl-C in advise, the lock file ----------------------------------------

def test_a_full_disk_while_writing_results_is_a_failure_of_the_run(tmp_path, monkeypatch):
    import errno

    from memprof import results

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full)
    code, err, tb = run_cli(*RUN, "--out", str(tmp_path / "out"))
    assert tb is None and code == 1, (tb, err)
    assert "No space left on device" in error_line(err)


def test_negative_control_an_unwritable_out_is_still_bad_input(tmp_path):
    (tmp_path / "a-file").write_text("")
    code, err, tb = run_cli(*RUN, "--out", str(tmp_path / "a-file" / "out"))
    assert tb is None and code == 2 and "is not writable" in error_line(err)


def test_sigterm_ends_as_ctrl_c_does_saying_what_was_kept(tmp_path, monkeypatch):
    """SIGTERM arrives right after the first record is written (sent from the runner's own append, so it lands
    mid-run every time); the run ends with Ctrl-C's line, exit 143, and --resume continues it."""
    import os
    import signal

    from memprof.executors import runner

    real_append = runner.append

    def append_then_terminate(path, record):
        real_append(path, record)
        os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    monkeypatch.setattr(runner, "append", append_then_terminate)
    code, err, tb = run_cli(*RUN, "--optims", "sgd,adamw,sgd-fe", "--out", str(out))
    assert tb is None and code == 143, (tb, err)
    assert f"terminated (SIGTERM); finished configurations are in {out}/results.jsonl (1 kept; continue with " \
           f"--resume)" in err, err
    assert not (out / ".memprof.lock").exists()
    monkeypatch.setattr(runner, "append", real_append)
    code, err, _ = run_cli(*RUN, "--optims", "sgd,adamw,sgd-fe", "--out", str(out), "--resume")
    assert code == 0 and "1 configurations already in" in err, err


def test_ctrl_c_in_advise_does_not_suggest_a_resume_it_lacks(tmp_path, monkeypatch):
    from memprof import plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "execute", interrupted)
    code, err, _ = run_cli("advise", "--models", "test-vit", "--optims", "sgd", "--no-progress", "--out",
                           str(tmp_path / "adv"))
    assert code == 130 and "interrupted; finished configurations are in" in err and "--resume" not in err, err
    code, err, _ = run_cli(*RUN, "--out", str(tmp_path / "run"))  # negative control: run has --resume, and says so
    assert code == 130 and "continue with --resume" in err, err


def test_advise_into_a_directory_with_results_does_not_ask_for_resume(finished_run):
    code, err, tb = run_cli("advise", "--models", "test-vit", "--optims", "sgd", "--out", str(finished_run))
    assert tb is None and code == 2
    assert "advise starts afresh (it has no --resume)" in error_line(err)


def test_a_run_leaves_no_lock_file_behind_but_holds_one_while_it_runs(tmp_path):
    from memprof.errors import UsageError
    from memprof.results import LOCK_FILE, RunDirectory

    code, _, _ = run_cli(*RUN, "--out", str(tmp_path / "out"))
    assert code == 0 and not (tmp_path / "out" / LOCK_FILE).exists()
    with RunDirectory(str(tmp_path)):  # negative control: while held, the file is there and a second run refused
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(UsageError, match="in use by another memprof run"):
            RunDirectory(str(tmp_path)).__enter__()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunDirectory(str(tmp_path)):  # and the next run takes it again
        pass


# --- silently accepted ------------------------------------------------------------------------------------

def test_result_fits_is_a_bool_with_may_not_fit_its_own_field():
    from memprof.api import Result

    def result(status, fits):
        return Result({"status": status, "metrics": {"fits": fits}})

    assert [(r.fits, r.may_not_fit) for r in (result("ok", "yes"), result("ok", "may not fit"),
                                               result("oom", "no"), result("error", None))] == [
        (True, False), (True, True), (False, False), (False, False)]
    no = result("oom", "no")
    assert no.record["metrics"]["fits"] == "no"  # the record keeps the string its readers (advise) read
    assert bool("no") is True  # negative control: the string that `if r.fits:` used to test is always true


def test_predict_with_grad_ckpt_off_runs_without_checkpointing():
    import memprof

    off, on = memprof.predict("test-vit", "sgd", grad_ckpt="off"), memprof.predict("test-vit", "sgd", grad_ckpt="on")
    assert (off.spec["grad_ckpt"], on.spec["grad_ckpt"]) == (False, True)  # "on" is the negative control
    assert memprof.predict("test-vit", "sgd", grad_ckpt=False).spec["grad_ckpt"] is False


@pytest.mark.parametrize("value, said", [("maybe", "use off, on or off,on"), ("off,on", "give one value"),
                                         (1, "give True/False")])
def test_predict_refuses_a_grad_ckpt_the_cli_would_refuse(value, said):
    import memprof
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match=said):
        memprof.predict("test-vit", "sgd", grad_ckpt=value)


@pytest.mark.parametrize("extra, said", [
    (["--bucket-cap-mb", "10"], "--bucket-cap-mb applies to --parallel ddp"),
    (["--grad-as-bucket-view", "on"], "--grad-as-bucket-view applies to --parallel ddp"),
    (["--reshard-after-forward", "off"], "--reshard-after-forward applies to --parallel fsdp"),
    (["--parallel", "fsdp", "--world-size", "2", "--bucket-cap-mb", "5"], "--bucket-cap-mb applies to --parallel ddp"),
    (["--lr-sgd=-1"], "--lr-sgd applies to accuracy mode: add --accuracy"),
    (["--train-steps", "100"], "--train-steps applies to accuracy mode"),
])
def test_options_that_would_change_nothing_are_refused(tmp_path, extra, said):
    code, err, tb = run_cli(*RUN, *extra, "--out", str(tmp_path / "out"))
    assert tb is None and code == 2, (tb, err)
    assert said in error_line(err)


def test_negative_control_the_same_options_where_they_apply_are_accepted(tmp_path):
    from memprof.plan import plan_run, run_options

    plan = plan_run(run_options(models="test-vit", optims="sgd", backend="simulate", parallel="ddp,fsdp", world_size=2,
                                bucket_cap_mb=10, grad_as_bucket_view="on", reshard_after_forward="off",
                                out=str(tmp_path / "out")))
    specs = [e.spec for e in plan.entries]
    assert [(s.parallel, s.bucket_cap_mb, s.grad_as_bucket_view, s.reshard_after_forward) for s in specs] == [
        ("ddp", 10, True, True), ("fsdp", None, False, False)]


def test_input_shape_on_an_open_clip_tower_is_noted(tmp_path):
    code, err, _ = run_cli(*RUN, "--input-shape", "3x64x64", "--out", str(tmp_path / "a"))
    assert code == 0 and "note: --input-shape applies to timm:/torchvision:/py: models; open_clip towers " \
                         "(test-vit) keep the image size of their config" in err
    code, err, _ = run_cli(*RUN, "--out", str(tmp_path / "b"))  # negative control: no flag, no note
    assert code == 0 and "--input-shape" not in err


# --- messages that misled ---------------------------------------------------------------------------------

def test_report_on_a_read_only_run_directory_names_its_o_flag(run_copy, monkeypatch):
    import errno

    from memprof import plan

    real_open = open

    def read_only(path, *args, **kwargs):  # as root, chmod cannot make a directory read-only
        if str(path).startswith(str(run_copy)) and args and "w" in args[0]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(plan, "open", read_only, raising=False)
    code, err, tb = run_cli("report", str(run_copy))
    assert tb is None and code == 2, (tb, err)
    message = error_line(err)
    assert "give -o FILE" in message and "--out" not in message and "--output" not in message, message
    code, err, _ = run_cli("report", str(run_copy), "-o", str(run_copy.parent / "elsewhere.html"))
    assert code == 0, err  # negative control: -o elsewhere writes it


def test_a_budget_past_every_card_says_so_and_tib_is_a_unit():
    from memprof.budget import GiB, parse_budget
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match=r"1TiB \(1,024 GiB\) is larger than any card") as exc:
        parse_budget("1TiB")
    assert "malformed" not in str(exc.value)
    assert parse_budget("0.25TiB").total_bytes == 256 * GiB  # negative control: a TiB size a card has is taken
    with pytest.raises(UsageError, match="malformed.*a size in GiB, MiB or TiB"):
        parse_budget("12GB")


@pytest.mark.parametrize("nbytes, shown", [(0, "0 B"), (512, "512 B"), (4096, "4.0 KiB"), (52428, "51.2 KiB"),
                                           (52429, "0.1 MiB"), (3 << 20, "3.0 MiB"), (2 << 30, "2.00 GiB")])
def test_small_sizes_never_print_as_zero_mib(nbytes, shown):
    from memprof.budget import format_size

    assert format_size(nbytes) == shown


def test_negative_control_the_old_formatter_printed_zero_mib():
    assert f"{4096 / (1 << 20):.1f} MiB" == "0.0 MiB"


@pytest.mark.parametrize("start, said", [(b"\xef\xbb\xbf", "starts with a UTF-8 byte-order mark: save it without"),
                                         (b"\xff\xfe", "is UTF-16 text")])
def test_a_byte_order_mark_in_a_suite_is_named(tmp_path, start, said):
    suite = tmp_path / "s.toml"
    suite.write_bytes(start + b'[[run]]\nbackend = "simulate"\nmodels = "test-vit"\n')
    code, err, tb = run_cli("suite", str(suite), "--out", str(tmp_path / "out"))
    assert tb is None and code == 2 and said in error_line(err)
    suite.write_bytes(b'[[run]]\nbackend = "simulate"\nmodels = "test-vit"\noptims = "sgd"\n')
    assert run_cli("suite", str(suite), "--out", str(tmp_path / "ok"), "--no-progress")[0] == 0  # negative control


@pytest.mark.parametrize("content", [b"\x00\x01\x02garbage", b"not json at all\n", b"GIF89a\x01\x00"])
def test_a_garbage_file_is_not_called_a_torn_run(tmp_path, content):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(content)
    for argv in (["table", str(path), "--out", str(tmp_path)], ["fidelity", str(path), str(path)]):
        code, err, tb = run_cli(*argv)
        message = error_line(err)
        assert tb is None and code == 2 and "incomplete" not in message, message
        assert "this is not a memprof results file" in message, message


def test_negative_control_a_torn_last_line_after_records_is_still_called_torn(run_copy):
    results = run_copy / "results.jsonl"
    results.write_text(results.read_text() + '{"key": "half a reco')
    code, err, _ = run_cli("table", str(run_copy))
    assert code == 2 and "the last line is incomplete (a run stopped while writing it)" in error_line(err)


def test_baseline_save_onto_a_file_that_is_not_a_baseline_says_so(finished_run, tmp_path):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    for target, why in ((other, "a JSON dict without kind 'memprof-baseline'"),
                        (finished_run / "results.jsonl", "not a JSON document")):
        before = target.read_text()
        code, err, tb = run_cli("baseline", "save", str(finished_run), "-o", str(target))
        assert tb is None and code == 2
        message = error_line(err)
        assert f"-o {target} exists and is not a memprof baseline ({why}" in message, message
        assert target.read_text() == before
    good = tmp_path / "b.json"  # negative control: a baseline is rewritten, saying what changed
    assert run_cli("baseline", "save", str(finished_run), "-o", str(good))[0] == 0
    code, err, _ = run_cli("baseline", "save", str(finished_run), "-o", str(good))
    assert code == 0 and f"wrote baseline {good}" in err


def test_baseline_save_without_o_writes_beside_the_results_not_the_committed_baseline(run_copy):
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "reports" / "baselines" / "ci.json"
    before = committed.read_bytes()
    code, err, _ = run_cli("baseline", "save", str(run_copy))
    assert code == 0 and f"wrote baseline {run_copy / 'baseline.json'}" in err
    assert committed.read_bytes() == before


def test_readme_baseline_save_example_stays_under_reports_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    saves = [line.split("#")[0].split() for line in readme.splitlines()
             if line.strip().startswith("memprof baseline save")]
    assert saves and all(s[s.index("-o") + 1].startswith("reports/runs/") for s in saves), saves


@pytest.mark.parametrize("content, said", [('{"key": "x", "verdict"', "accuracy.jsonl:1: not JSON"),
                                           ("[1]\n", "accuracy.jsonl:1: not an accuracy record")])
def test_a_damaged_accuracy_file_names_its_line(run_copy, content, said):
    (run_copy / "accuracy.jsonl").write_text(content)
    for argv in (["report", str(run_copy)], ["advise", "--models", "test-vit", "--optims", "sgd", "--accuracy-from",
                                             str(run_copy), "--out", str(run_copy.parent / "adv")]):
        code, err, tb = run_cli(*argv)
        assert tb is None and code == 2 and said in error_line(err), (tb, err)


def test_negative_control_the_committed_accuracy_records_read():
    from pathlib import Path

    from memprof.results import load_verdicts

    assert len(load_verdicts(str(Path(__file__).resolve().parents[1] / "reports" / "accuracy-test-vit"))) > 0


def test_a_baseline_stat_edited_to_the_wrong_type_is_named_and_can_be_saved_over(finished_run, tmp_path):
    baseline = tmp_path / "b.json"
    assert run_cli("baseline", "save", str(finished_run), "-o", str(baseline))[0] == 0
    code, err, _ = run_cli("compare", str(baseline), str(finished_run))
    assert code == 0, err  # negative control: the saved baseline compares clean
    data = json.loads(baseline.read_text())
    data["benchmarks"][0]["stats"]["peak_allocated_bytes"] = "x"
    baseline.write_text(json.dumps(data))
    code, err, tb = run_cli("compare", str(baseline), str(finished_run))
    assert tb is None and code == 2 and "stats 'peak_allocated_bytes' is \"x\", not a number" in error_line(err)
    code, err, _ = run_cli("baseline", "save", str(finished_run), "-o", str(baseline))
    assert code == 0 and "no diff against the damaged baseline" in err
