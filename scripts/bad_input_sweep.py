"""Feed memprof a large set of bad inputs and faults, in one process, and count what a user would see go
wrong: tracebacks (an exception escaping `cli.main`), exit codes other than 2 for bad input, corrupted
results files, messages that mislead, lock files left behind. Usage: python scripts/bad_input_sweep.py [--verbose]

Each case runs `memprof.cli.main(argv)` (or, for the pytest plugin and the Python API, a callable) with
stdout/stderr captured, in a scratch directory, some under a fault (a full disk, SIGTERM, Ctrl-C, a read-only
directory). A case passes when main returns 2 (bad input) with exactly one `memprof: error:` line, or the
expected code for the fault cases, its output says what it must (`want`) and not what it must not
(`forbid`), and every results.jsonl left behind still reads, with no `.memprof.lock` left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback

GOOD = ('{"key": "k@simulate", "spec": {"model": "test-vit", "optim": "sgd", "grad_ckpt": false, "state_bits": 32, '
        '"batch_size": 1, "budget": "titan-x", "precision": "fp32"}, "status": "ok", "source": "predicted", '
        '"metrics": {"peak_allocated_bytes": 1, "peak_reserved_bytes": 2}, "environment": {"backend": "simulate"}}')
RUN = ["run", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--jobs", "1", "--no-progress"]


def cases(tmp: str) -> list[tuple[str, list[str], int]]:
    def f(name: str, text: str | bytes) -> str:
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
        return path

    os.makedirs(os.path.join(tmp, "empty"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "dir-as-results", "results.jsonl"), exist_ok=True)
    out = []
    for flag, values in {
        "--models": ["", ",", "vit-b-61", "paper,nope", "ViT-B-32x"],
        "--optims": ["", "adamww", "all,nope", "sgd-fe-nomon"],
        "--grad-ckpt": ["maybe", "", "on,yes"],
        "--state-bits": ["4", "x", "", "32,16", "-8"],
        "--batch-size": ["0", "-1", "two", "", "1.5", "1,,0"],
        "--steps": ["1", "0", "x"],
        "--budget": ["12 gigs", "titanx", "-1GiB", "0GiB", "12GiB@99.9", "12GiB@8.10", "1MiB", "nan", "device"],
        "--timeout-s": ["nan", "inf", "-1", "0", "x"],
        "--jobs": ["0", "-2", "x"],
        "--num-classes": ["1", "0", "x"],
        "--precision": ["fp16", "fp64", "", "bf16-amp,nope"],
        "--optim-impl": ["fusedd", ""],
        "--optim-in-backward": ["maybe"],
        "--resident": ["text", "clip"],
        "--out": ["", "/proc/memprof-x", os.path.join(tmp, "dir-as-results")],
        "--pretrained": ["/nonexistent.pt", f("junk.pt", b"junk")],
        "--snapshot": ["/proc/memprof-snap"],  # unwritable (simulate writes predicted snapshots)
        "--nvml-period-ms": ["5", "nan"],
        "--backend": ["quantum"],
        "--metric": ["bytes"],
        "--preset": ["paper-2021"],
    }.items():
        for v in values:
            out.append((f"run {flag} {v!r}", RUN + [f"{flag}={v}"], 2))
    out += [("run --retry-failed without --out", RUN + ["--retry-failed"], 2),
            ("run --resume without --out", RUN + ["--resume"], 2),
            ("fit --batch-size", ["fit", "--models", "test-vit", "--batch-size", "4"], 2),
            ("fit --max-batch-size 0", ["fit", "--models", "test-vit", "--max-batch-size", "0"], 2),
            ("advise two optims", ["advise", "--models", "test-vit", "--optims", "sgd,adamw"], 2),
            ("accuracy --lr-sgd nan", ["accuracy", "--lr-sgd", "nan", "--state-bits", "32"], 2),
            ("accuracy --train-steps 5", ["accuracy", "--train-steps", "5", "--state-bits", "32"], 2),
            ("accuracy --data missing", ["accuracy", "--data", "/nonexistent", "--state-bits", "32"], 2),
            ("unknown command", ["frobnicate"], 2), ("no command", [], 2)]
    bad_lines = ["42", '"hello"', '{"key": "x"}', "[1, 2]", '{"key": ', "\x00\x01", GOOD[:50]]
    for i, line in enumerate(bad_lines):
        path = f(f"bad{i}.jsonl", GOOD + "\n" + line + "\n")
        for cmd in (["table", path, "--out", tmp], ["compare", path, path],
                    ["baseline", "save", path, "-o", os.path.join(tmp, "b.json")], ["fidelity", path, path]):
            out.append((f"{cmd[0]} with line {line!r}", cmd, 2))
    for name, text in {"list.json": "[1]", "nobench.json": '{"kind": "memprof-baseline"}',
                       "nostats.json": '{"kind": "memprof-baseline", "benchmarks": [{"name": "x"}]}',
                       "garbage.json": "{", "pb.json": '{"benchmarks": 3, "machine_info": {}}'}.items():
        out.append((f"compare baseline {name}", ["compare", f(name, text), f("good.jsonl", GOOD + "\n")], 2))
    for target in (os.path.join(tmp, "empty"), os.path.join(tmp, "dir-as-results"), "/nonexistent"):
        out += [(f"table {target}", ["table", target], 2), (f"compare {target}", ["compare", target, target], 2)]
    out.append(("baseline save -o DIR", ["baseline", "save", f("good2.jsonl", GOOD + "\n"), "-o", tmp], 2))
    out.append(("compare nothing in common", ["compare", f("a.jsonl", GOOD + "\n"),
                                              f("b.jsonl", GOOD.replace("k@simulate", "j@simulate") + "\n")], 2))
    bad_suites = {"s1.toml": "[[run]]\noptimz = 'sgd'\n", "s2.toml": "[[run]]\nbudget = 'huge'\n",
                  "s3.toml": "not toml [", "s4.toml": "", "s5.toml": "[[run]]\nbatch_size = '0'\n",
                  "s6.toml": "[[run]]\nmodels = 3\n"}
    for name, text in bad_suites.items():
        out.append((f"suite {name}", ["suite", f(name, text), "--out", os.path.join(tmp, "suite-out")], 2))
    for cmd in (["--help"], ["run", "--help"], ["compare", "--help"], ["fit", "--help"], ["advise", "--help"]):
        out.append((" ".join(cmd), cmd, 0))
    return out + round3_cases(tmp, f) + round4_cases(tmp, f)


USER_MODULE = """\
import os
import sys
import torch


def good():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


def raises():
    raise ValueError("boom")


def needs_arg(width):
    return torch.nn.Linear(width, 2)


def exits():
    sys.exit(3)


def second_call_fails():
    if os.path.exists(os.environ["SWEEP_MARK"]):
        raise RuntimeError("not twice")
    open(os.environ["SWEEP_MARK"], "w").close()
    return good()
"""
PLUGIN_TEST = """\
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


def test_remove():
    folder = os.environ.get("SWEEP_REMOVE")
    if folder:
        shutil.rmtree(folder)
"""


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is None:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def full_disk():
    from memprof import results

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return patched(results.os, "fsync", fsync)


def read_only(prefix: str):
    from memprof import plan

    def fake_open(path, *args, **kwargs):
        if str(path).startswith(prefix) and args and "w" in args[0]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    return patched(plan, "open", fake_open)


def ctrl_c_in_execute():
    from memprof import plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    return patched(plan, "execute", interrupted)


def sigterm_after_first_record():
    """SIGTERM sent by the runner itself right after its first record is written: mid-run every time."""
    from memprof.executors import runner

    real_append = runner.append

    def append_then_terminate(path, record):
        real_append(path, record)
        os.kill(os.getpid(), signal.SIGTERM)

    return patched(runner, "append", append_then_terminate)


@contextlib.contextmanager
def env(name: str, value: str):
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def pytest_plugin(tmp: str, json_path: str, remove: str | None = None):
    """A callable running pytest (in this process) on a test of the cuda_memory fixture with --memprof-json."""
    def run() -> tuple[int, str]:
        import pytest
        from importlib.metadata import entry_points

        test = os.path.join(tmp, "plugin_case", "test_plugin_case.py")
        os.makedirs(os.path.dirname(test), exist_ok=True)
        with open(test, "w") as fh:
            fh.write("import os\n" + PLUGIN_TEST)
        installed = any(ep.value == "memprof.pytest_plugin" for ep in entry_points(group="pytest11"))
        with env("SWEEP_REMOVE", remove or ""):
            code = pytest.main([test, "-q", "-p", "no:cacheprovider", "--rootdir", os.path.dirname(test),
                                *(() if installed else ("-p", "memprof.pytest_plugin")), "--memprof-backend",
                                "simulate", "--memprof-json", json_path])
        return int(code), sys.stdout.getvalue() + sys.stderr.getvalue()

    return run


def api_case(check):
    """A callable for a Python API check: exit 0 when `check()` holds, 1 (a wrong code) when it does not."""
    def run() -> tuple[int, str]:
        return (0, "") if check() else (1, f"{check.__doc__}: does not hold")

    return run


def _grad_ckpt_off_is_off() -> bool:
    """memprof.predict(grad_ckpt="off") runs without checkpointing"""
    import memprof

    return memprof.predict("test-vit", "sgd", grad_ckpt="off").spec["grad_ckpt"] is False


def _fits_is_a_bool() -> bool:
    """Result.fits is a bool, False on an OOM, with may_not_fit its own field"""
    from memprof.api import Result

    oom = Result({"status": "oom", "metrics": {"fits": "no"}})
    near = Result({"status": "ok", "metrics": {"fits": "may not fit"}})
    return oom.fits is False and near.fits is True and near.may_not_fit is True


def _small_sizes_are_not_zero() -> bool:
    """a size under 0.05 MiB prints in KiB or B, not 0.0 MiB"""
    from memprof.budget import format_size

    return format_size(4096) == "4.0 KiB" and format_size(100) == "100 B"


def round3_cases(tmp: str, f) -> list[tuple]:
    """Issue 24's classes: a user's failing factory, damaged run files, bounds, faults (full disk, SIGTERM,
    Ctrl-C in advise, the lock file), options accepted silently, messages that misled, the pytest plugin."""
    from memprof import cli

    sys.path.insert(0, tmp)
    f("sweep_user.py", USER_MODULE)
    f("sweep_badimport.py", "import nonexistent_pkg_xyz\n")
    f("sweep_exit_on_import.py", "import sys\nsys.exit(4)\n")
    f("sweep_syntax.py", "def f(:\n")
    user = ["run", "--optims", "sgd", "--backend", "simulate", "--jobs", "1", "--no-progress", "--input-shape", "3x8x8"]
    out: list[tuple] = []
    for model, want in (("raises", "sweep_user.py:11"), ("needs_arg", "sweep_user.py:14"),
                        ("exits", "sweep_user.py:19"), ("nothere", "has no nothere")):
        out.append((f"py: factory {model}", user + ["--models", f"py:sweep_user:{model}", "--out",
                                                   os.path.join(tmp, f"user-{model}")], 2, {"want": want}))
    for module, want in (("sweep_badimport", "sweep_badimport.py:1"),
                         ("sweep_exit_on_import", "sweep_exit_on_import.py:2"), ("sweep_syntax", "sweep_syntax.py:1")):
        out.append((f"py: module {module}", user + ["--models", f"py:{module}:f", "--out",
                                                   os.path.join(tmp, f"user-{module}")], 2, {"want": want}))
    out.append(("py: factory raising, from a suite", ["suite", f("user.toml", '[[run]]\nbackend = "simulate"\n'
                                                                 'models = "py:sweep_user:raises"\n'),
                                                       "--out", os.path.join(tmp, "user-suite")], 2,
                {"want": "user.toml:3: model 'py:sweep_user:raises'"}))
    out.append(("py: factory failing inside a configuration", user + ["--models", "py:sweep_user:second_call_fails",
                                                                      "--out", os.path.join(tmp, "user-later")], 1,
                {"setup": lambda: env("SWEEP_MARK", os.path.join(tmp, "mark"))}))

    run_dir = os.path.join(tmp, "good-run")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(RUN + ["--optims", "sgd,adamw", "--out", run_dir]) == 0
    timeline = os.path.join(run_dir, "timelines", sorted(x for x in os.listdir(os.path.join(run_dir, "timelines"))
                                                          if x.endswith(".json"))[0])
    torn_dir = os.path.join(tmp, "torn-timeline")
    shutil.copytree(run_dir, torn_dir)
    with open(os.path.join(torn_dir, "timelines", os.path.basename(timeline)), "r+") as fh:
        fh.truncate(200)
    out.append(("report with a truncated timeline", ["report", torn_dir], 0))
    torn_accuracy = os.path.join(tmp, "torn-accuracy")
    shutil.copytree(run_dir, torn_accuracy)
    f(os.path.join(torn_accuracy, "accuracy.jsonl"), '{"key": "x", "verdict"')
    out.append(("report with a torn accuracy.jsonl", ["report", torn_accuracy], 2, {"want": "accuracy.jsonl:1:"}))
    with open(os.path.join(run_dir, "results.jsonl")) as fh:
        lines = fh.read().splitlines()
    for name, edit in (("peak_allocated_bytes", ("metrics", "big")), ("breakdown_at_peak_bytes", ("metrics", "x")),
                       ("model", ("spec", 3)), ("batch_size", ("spec", "one")), ("backend", ("environment", 7))):
        rec = json.loads(lines[0])
        rec[edit[0]][name] = edit[1]
        edited = os.path.join(tmp, f"edited-{name}")
        os.makedirs(edited)
        with open(os.path.join(edited, "results.jsonl"), "w") as fh:
            fh.write(json.dumps(rec) + "\n" + "\n".join(lines[1:]) + "\n")
        for cmd in (RUN + ["--optims", "sgd,adamw,sgd-fe", "--out", edited, "--resume"], ["table", edited],
                    ["report", edited], ["compare", edited, edited]):
            out.append((f"{cmd[0]} on a record whose {name} has the wrong type", cmd, 2, {"want": f"'{name}' is"}))

    for argv, want in ((RUN + ["--steps", "100000000"], "at most 10000"),
                       (RUN + ["--batch-size", "9223372036854775808"], "at most 2147483647"),
                       (["fit", "--models", "test-vit", "--backend", "simulate", "--max-batch-size", "99999999999"],
                        "at most 2147483647"),
                       (["accuracy", "--train-steps", "100000000", "--state-bits", "32"], "at most 100000"),
                       (["suite", f("steps.toml", '[[run]]\nbackend = "simulate"\nmodels = "test-vit"\n'
                                                  'steps = 99999999999999999999\n')], "steps.toml:4:"),
                       (["suite", f("stepsbool.toml", '[[run]]\nbackend = "simulate"\nsteps = true\n')],
                        "wrong type (bool)")):
        out.append((f"bound: {argv[0]}, {want}", argv + ["--out", os.path.join(tmp, "bounds")], 2, {"want": want}))

    out.append(("full disk while writing results", RUN + ["--out", os.path.join(tmp, "full")], 1,
                {"setup": full_disk, "want": "No space left on device"}))
    out.append(("SIGTERM during a run", RUN + ["--optims", "sgd,adamw,sgd-fe,sgd-fe-nomom", "--out",
                                               os.path.join(tmp, "term")], 143,
                {"setup": sigterm_after_first_record,
                 "want": "terminated (SIGTERM); finished configurations are in"}))
    out.append(("Ctrl-C in advise", ["advise", "--models", "test-vit", "--optims", "sgd", "--no-progress", "--out",
                                     os.path.join(tmp, "adv-int")], 130,
                {"setup": ctrl_c_in_execute, "want": "interrupted; finished configurations", "forbid": "--resume"}))
    out.append(("advise into a directory with results", ["advise", "--models", "test-vit", "--optims", "sgd",
                                                         "--out", run_dir], 2, {"want": "it has no --resume"}))

    for extra, want in ((["--bucket-cap-mb", "10"], "applies to --parallel ddp"),
                        (["--grad-as-bucket-view", "on"], "applies to --parallel ddp"),
                        (["--reshard-after-forward", "off"], "applies to --parallel fsdp"),
                        (["--lr-sgd=-1"], "applies to accuracy mode"), (["--seed", "1"], "applies to accuracy mode")):
        out.append((f"run {' '.join(extra)} where it changes nothing", RUN + extra + ["--out", os.path.join(tmp, "x")],
                    2, {"want": want}))
    out.append(("run --input-shape on an open_clip tower", RUN + ["--input-shape", "3x64x64", "--out",
                                                                  os.path.join(tmp, "shape")], 0,
                {"want": "note: --input-shape applies to"}))
    out += [("predict grad_ckpt='off'", api_case(_grad_ckpt_off_is_off), 0),
            ("Result.fits is a bool", api_case(_fits_is_a_bool), 0),
            ("small sizes", api_case(_small_sizes_are_not_zero), 0)]

    out.append(("report on a read-only run directory", ["report", run_dir], 2,
                {"setup": lambda: read_only(run_dir), "want": "give -o FILE", "forbid": "--out"}))
    out.append(("--budget 1TiB", RUN + ["--budget", "1TiB", "--out", os.path.join(tmp, "x")], 2,
                {"want": "larger than any card", "forbid": "malformed"}))
    for name, start in (("bom.toml", b"\xef\xbb\xbf"), ("utf16.toml", b"\xff\xfe")):
        out.append((f"suite {name}", ["suite", f(name, start + b'[[run]]\nmodels = "test-vit"\n'), "--out",
                                      os.path.join(tmp, "x")], 2, {"want": "byte-order mark"}))
    for name, content in (("binary.jsonl", b"\x00\x01\x02\x03"), ("text.jsonl", b"hello world"),
                          ("image.jsonl", b"GIF89a\x01\x00")):
        for cmd in (["table", f(name, content), "--out", tmp], ["fidelity", os.path.join(tmp, name),
                                                                 os.path.join(tmp, name)]):
            out.append((f"{cmd[0]} on garbage {name}", cmd, 2, {"forbid": "incomplete"}))
    out.append(("baseline save -o onto a results file", ["baseline", "save", run_dir, "-o",
                                                         os.path.join(run_dir, "results.jsonl")], 2,
                {"want": "is not a memprof baseline"}))
    damaged = os.path.join(tmp, "damaged-baseline.json")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["baseline", "save", run_dir, "-o", damaged]) == 0
    with open(damaged) as fh:
        data = json.load(fh)
    data["benchmarks"][0]["stats"]["peak_allocated_bytes"] = "x"
    f("damaged-baseline.json", json.dumps(data))
    out.append(("compare against a baseline stat of the wrong type", ["compare", damaged, run_dir], 2,
                {"want": "not a number"}))
    out.append(("baseline save -o onto another JSON", ["baseline", "save", run_dir, "-o", f("mine.json", '{"a": 1}')],
                2, {"want": "is not a memprof baseline"}))

    out.append(("pytest --memprof-json to an unwritable path",
                pytest_plugin(tmp, os.path.join(f("a-file", ""), "m.jsonl")), 4, {"want": "is not writable"}))
    gone = os.path.join(tmp, "plugin-out")
    os.makedirs(gone)
    out.append(("pytest --memprof-json whose folder goes away", pytest_plugin(tmp, os.path.join(gone, "m.jsonl"), gone),
                1, {"want": "memprof: error: cannot write --memprof-json", "forbid": "INTERNALERROR"}))
    return out


def _unknown_keyword_is_named() -> bool:
    """memprof.predict with a misspelled keyword names the close match, as `memprof run` does for a flag"""
    import memprof
    from memprof.errors import UsageError

    try:
        memprof.predict("test-vit", optim_implementation="fused")
    except UsageError as exc:
        return "did you mean optim_impl" in str(exc)
    return False


def _switches_read_alike() -> bool:
    """a switch given to memprof.predict as 'maybe' gets memprof run's message"""
    import memprof
    from memprof.errors import UsageError

    try:
        memprof.predict("test-vit", grad_ckpt="maybe")
    except UsageError as exc:
        return str(exc) == "--grad-ckpt 'maybe': use off, on or off,on"
    return False


def round4_cases(tmp: str, f) -> list[tuple]:
    """This round's classes: fit's --headroom, the plugin marker's metric, the API's keywords, a suite's switches."""
    out = []
    fit = ["fit", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--no-progress", "--out",
           os.path.join(tmp, "fit4")]
    for value, want in (("5x", "give a share of the card's usable memory (5%) or a size (1GiB)"),
                        ("60%", "at most half the card's usable memory"), ("=-1GiB", "give a share"),
                        ("100TiB", "at most half")):
        given = ["--headroom" + value] if value.startswith("=") else ["--headroom", value]
        out.append((f"fit --headroom {value}", fit + given, 2, {"want": want}))
    out.append(("run --headroom (a fit option)", RUN + ["--headroom", "5%", "--out", os.path.join(tmp, "x")], 2,
                {"want": "unrecognized arguments: --headroom"}))
    out.append(("suite headroom (a fit option)", ["suite", f("headroom.toml", '[[run]]\nmodels = "test-vit"\n'
                                                                             'headroom = "5%"\n')], 2,
                {"want": "headroom.toml:3: unknown key 'headroom'"}))
    out.append(("suite switch as a number", ["suite", f("switch.toml", '[[run]]\nmodels = "test-vit"\ngrad_ckpt = 1\n')],
                2, {"want": "switch.toml:3: 'grad_ckpt' has the wrong type (int)"}))
    out.append(("suite switch as 'maybe'", ["suite", f("maybe.toml", '[[run]]\nmodels = "test-vit"\n'
                                                                       'grad_ckpt = "maybe"\n'), "--out",
                                            os.path.join(tmp, "x")], 2,
                {"want": "maybe.toml:3: --grad-ckpt 'maybe': use off, on or off,on"}))
    out += [("predict with a misspelled keyword", api_case(_unknown_keyword_is_named), 0),
            ("predict's switch message is run's", api_case(_switches_read_alike), 0)]
    return out


def run_case(argv, setup=None) -> tuple[int | None, str, str | None]:
    """(exit code, stderr, traceback or None) of cli.main(argv), or of argv() for a callable case (which
    returns its code and output), under `setup()` (a fault) when given."""
    from memprof import cli

    err, outbuf = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
            with setup() if setup else contextlib.nullcontext():
                if callable(argv):
                    code, said = argv()
                    print(said, file=sys.stderr)
                else:
                    code = cli.main(argv)
    except SystemExit as exc:  # argparse's --help exits 0 by itself
        code = exc.code
    except BaseException:  # noqa: BLE001 — exactly what the sweep counts
        return None, err.getvalue(), traceback.format_exc()
    return code, err.getvalue(), None


def check(argv, expect: int, extra: dict | None = None) -> tuple[str | None, str, str]:
    """Run one case: (what went wrong: traceback, wrong code, not one line, wrong message, or None; the
    problem's text; stderr)."""
    extra = extra or {}
    code, err, tb = run_case(argv, extra.get("setup"))
    if tb:
        return "traceback", "traceback: " + tb.strip().splitlines()[-1], err
    if code != expect:
        return "wrong code", f"exit {code}, expected {expect}: {err.strip()[-300:]}", err
    if expect == 2 and len([x for x in err.splitlines() if x.startswith("memprof: error:")]) != 1:
        return "not one line", f"not one error line: {err.strip()[:200]}", err
    if extra.get("want") and extra["want"] not in err or extra.get("forbid") and extra["forbid"] in err:
        return "wrong message", (f"says {err.strip()[-300:]!r}: wants {extra.get('want')!r}, never "
                                 f"{extra.get('forbid')!r}"), err
    return None, "", err


def main() -> int:
    verbose = "--verbose" in sys.argv
    counts = dict.fromkeys(("traceback", "wrong code", "not one line", "wrong message"), 0)
    corrupted = locks = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        all_cases = cases(tmp)
        for name, argv, expect, *rest in all_cases:
            kind, problem, err = check(argv, expect, rest[0] if rest else None)
            if kind:
                counts[kind] += 1
            if problem or verbose:
                print(f"{'FAIL' if problem else 'ok  '} {name}: {problem or err.strip()[:160]}")
        for root, _, files in os.walk(tmp):
            for name in files:
                if name == ".memprof.lock":
                    locks += 1
                    print(f"FAIL lock file left: {os.path.join(root, name)}")
                if name == "results.jsonl":
                    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as fh:
                        for line in fh:
                            try:
                                json.loads(line)
                            except ValueError:
                                if "bad" not in root:
                                    corrupted += 1
    print(f"{len(all_cases)} cases: {counts['traceback']} tracebacks, {counts['wrong code']} wrong exit codes, "
          f"{counts['not one line']} without exactly one error line, {corrupted} corrupted results files, "
          f"{counts['wrong message']} wrong messages, {locks} lock files left")
    return 1 if any(counts.values()) or corrupted or locks else 0


if __name__ == "__main__":
    sys.exit(main())
