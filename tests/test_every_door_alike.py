"""The same checks at every door: what `memprof run` refuses in one line (exit 2) the script door, the pytest plugin
and the API refuse the same way; each case here broke once because two doors had drifted apart."""

import contextlib
import io
import os

import pytest

import memprof
from memprof.cli import main
from memprof.errors import UsageError

TRAINS = ("import torch\nm = torch.nn.Linear(4, 2).cuda()\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
          "m(torch.randn(3, 4, device='cuda')).sum().backward()\nopt.step()\n")


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _script(tmp_path, body=TRAINS, name="train.py"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")
def test_an_unwritable_out_is_bad_input_for_script_as_for_run(tmp_path):
    script = _script(tmp_path)
    run_code, _, run_err = _cli("run", "--models", "test-vit", "--out", "/proc/memprof-x", "--no-progress")
    code, _, err = _cli("script", "--out", "/proc/memprof-x", script)
    assert run_code == code == 2 and "not writable" in run_err and "not writable" in err and err.count("\n") == 1


def test_script_out_respects_a_folder_another_run_holds(tmp_path):
    from memprof.results import RunDirectory

    out = tmp_path / "out"
    out.mkdir()
    with RunDirectory(str(out)):
        code, _, err = _cli("script", "--out", str(out), _script(tmp_path))
    assert code == 2 and "in use by another memprof run" in err
    code, _, _ = _cli("script", "--out", str(out), _script(tmp_path))  # negative control: released, it writes
    assert code == 0 and (out / "results.jsonl").exists()


def test_freeze_without_a_freeze_embed_optimizer_is_refused_and_never_keyed(tmp_path):
    with pytest.raises(UsageError, match="none of sgd freezes anything"):
        memprof.predict("test-vit", "sgd", freeze="conv1")
    code, _, err = _cli("run", "--models", "test-vit", "--optims", "sgd", "--freeze", "conv1", "--out",
                        str(tmp_path / "r"), "--no-progress")
    assert code == 2 and "--freeze" in err and err.count("\n") == 1
    code, _, _ = _cli("run", "--models", "test-vit", "--optims", "sgd,sgd-fe", "--freeze", "conv1", "--out",
                      str(tmp_path / "r2"), "--no-progress")
    from memprof.results import read_records

    keys = {r["spec"]["optim"]: r["key"] for r in read_records(str(tmp_path / "r2"))}
    assert code == 0 and "freeze-" not in keys["sgd"] and "freeze-conv1" in keys["sgd-fe"]  # only what freezes says


def test_a_memprof_option_after_the_script_gets_the_fix(tmp_path):
    body = "import argparse\nargparse.ArgumentParser().parse_args()\n"
    code, _, err = _cli("script", _script(tmp_path, body), "--budget", "rtx4090")
    assert code == 2 and "--budget is memprof's option: put it before the script" in err
    code, _, err = _cli("script", _script(tmp_path, body), "--epochs", "3")  # negative control: the script's own
    assert code == 2 and "memprof's option" not in err


def test_an_unknown_plugin_backend_is_one_usage_error_before_any_test(pytester):
    pytester.makepyfile("def test_a(cuda_memory):\n    pass\n\ndef test_b(cuda_memory):\n    pass\n")
    result = pytester.runpytest("--memprof-backend", "quantum")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown backend 'quantum'" in result.stderr.str() and "test_a" not in result.stdout.str()


def test_an_unknown_script_backend_gets_close_matches(tmp_path):
    code, _, err = _cli("script", "--backend", "simulat", _script(tmp_path))
    assert code == 2 and "unknown backend 'simulat'" in err and "simulate" in err
