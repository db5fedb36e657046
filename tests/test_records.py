"""Records: the one reader (validated, errors name file and line), the one writer (torn lines repaired,
write failures as one line), the run directory (lock, reuse, resume, retry) and exit status.

Runs use test-vit in this process (`cli.main`, one job) where they can: a run costs a second, a subprocess
five more.
"""

import errno
import json
import os
import subprocess
import sys

import pytest

from memprof import cli
from memprof.errors import UsageError
from memprof.results import RunDirectory, append, read_records

RUN = ["run", "--models", "test-vit", "--optims", "sgd,sgd-fe", "--jobs", "1", "--no-progress", "--backend", "simulate"]


def main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, alone: bool = True) -> str:
    """The one `memprof: error:` line (`alone`: and nothing else, as for input rejected before any work)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("memprof: error:")]
    assert len(errors) == 1 and (len(lines) == 1 or not alone), err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def good_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    assert cli.main(RUN + ["--out", str(out)]) == 0
    return json.loads((out / "results.jsonl").read_text().splitlines()[0])


# --- the reader -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expect", [
    ("42", "results.jsonl:2: a int, not a record"),
    ('"hello"', "results.jsonl:2: a str, not a record"),
    ("[1, 2]", "results.jsonl:2: a list, not a record"),
    ('{"key": "x"}', "results.jsonl:2: the record has no 'spec'"),
    ('{"key": "x", "spec": {}, "status": "fine", "source": "predicted", "metrics": {}, "environment": {}}',
     "results.jsonl:2: unknown status 'fine'"),
    ('{"key": "x", "spec": [], "status": "ok", "source": "predicted", "metrics": {}, "environment": {}}',
     "results.jsonl:2: 'spec' is a list, expected a dict"),
    ('{"key": "x", "spec": {', "results.jsonl:2: not JSON"),
])
def test_a_bad_line_is_named_with_file_and_line(tmp_path, capsys, good_record, line, expect):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good_record) + "\n" + line + "\n" + json.dumps(good_record) + "\n")
    for command in (["table", str(path), "--out", str(tmp_path)], ["baseline", "save", str(path), "-o",
                                                                     str(tmp_path / "b.json")],
                    ["compare", str(path), str(path)]):
        code, _, err = main(capsys, *command)
        assert code == 2 and expect in one_error_line(err)


def test_a_good_file_reads(tmp_path, good_record):
    """Negative control of the validation: the same lines without the bad one are accepted."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good_record) + "\n")
    assert read_records(str(path)) == [good_record]


def test_a_torn_last_line_says_how_to_recover(tmp_path, good_record):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good_record) + "\n" + json.dumps(good_record)[:40])
    with pytest.raises(UsageError, match=r"results.jsonl:2: not JSON .*incomplete .*delete that line, then --resume"):
        read_records(str(path))


@pytest.mark.parametrize("make, expect", [
    (lambda p: p.mkdir(), "has no results.jsonl"),
    (lambda p: (p.mkdir(), (p / "results.jsonl").mkdir()), "is a directory, not a results file"),
    (lambda p: (p.mkdir(), (p / "results.jsonl").write_text("")), "holds no records"),
    (lambda p: (p.mkdir(), (p / "results.jsonl").write_bytes(b"\xff\xfe\x00")), "not UTF-8"),
])
def test_run_directories_that_hold_no_results(tmp_path, capsys, make, expect):
    make(tmp_path / "d")
    code, _, err = main(capsys, "table", str(tmp_path / "d"))
    assert code == 2 and expect in one_error_line(err)


# --- the writer -------------------------------------------------------------------------------------------

def test_append_after_a_line_without_newline_starts_a_new_line(tmp_path, good_record):
    """The file's last record lacks its newline (a run killed mid-write, an editor): the next record must not
    join it. Negative control: writing as plain `open(path, 'a')` would have joined them."""
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good_record))
    joined = tmp_path / "joined.jsonl"
    joined.write_text(json.dumps(good_record))
    with open(joined, "a") as fh:
        fh.write(json.dumps({**good_record, "key": "other"}) + "\n")
    with pytest.raises(UsageError):
        read_records(str(joined))
    append(str(path), {**good_record, "key": "other"})
    assert [r["key"] for r in read_records(str(path))] == [good_record["key"], "other"]


def test_resume_after_a_missing_trailing_newline(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(capsys, *RUN[:4], "sgd", *RUN[5:], "--out", str(out))[0] == 0
    path = out / "results.jsonl"
    path.write_text(path.read_text().rstrip("\n"))
    code, _, err = main(capsys, *RUN, "--out", str(out), "--resume")
    assert code == 0, err
    assert len(read_records(str(path))) == 2 and len(path.read_text().splitlines()) == 2


def test_a_failing_write_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    """Disk full on the second record: exit 1 (a failure of the run, not bad input), the path and the OS error
    in one line, the first record kept."""
    from memprof import results

    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    out = tmp_path / "run"
    code, _, err = main(capsys, *RUN, "--out", str(out))
    line = one_error_line(err, alone=False)
    assert code == 1 and f"cannot write {out}/results.jsonl: No space left on device" in line
    assert len(read_records(str(out))) >= 1


def test_results_path_that_is_a_directory(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "results.jsonl").mkdir(parents=True)
    code, _, err = main(capsys, *RUN, "--out", str(out))
    assert code == 2 and "results.jsonl" in one_error_line(err)


# --- the run directory ------------------------------------------------------------------------------------

def test_reusing_out_without_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(capsys, *RUN, "--out", str(out))[0] == 0
    before = (out / "results.jsonl").read_text()
    code, _, err = main(capsys, *RUN, "--out", str(out))
    assert code == 2 and "already holds results of a run (2 configurations): add --resume" in one_error_line(err)
    assert (out / "results.jsonl").read_text() == before
    code, _, err = main(capsys, *RUN, "--out", str(out), "--resume")
    assert code == 0 and "resuming: 2 configurations already in" in err and ", 0 to run" in err


def test_a_locked_run_directory_is_refused_and_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from memprof.results import RunDirectory\n"
        f"with RunDirectory({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = main(capsys, *RUN, "--out", str(out))
        assert code == 2 and f"is in use by another memprof run (pid {holder.pid}" in one_error_line(err)
    finally:
        holder.kill()
        holder.wait()
    code, _, err = main(capsys, *RUN, "--out", str(out))  # negative control: free again, it runs
    assert code == 0, err


def test_the_lock_excludes_a_second_holder_in_this_process(tmp_path):
    with RunDirectory(str(tmp_path)):
        with pytest.raises(UsageError, match="in use by another memprof run"):
            RunDirectory(str(tmp_path)).__enter__()
    with RunDirectory(str(tmp_path)):
        pass


def _edit_records(path, edit):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        edit(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_resume_keeps_failures_and_retry_failed_reruns_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(capsys, *RUN, "--out", str(out))[0] == 0
    path = out / "results.jsonl"

    def fail_sgd(r):
        if "/sgd/" in r["key"]:
            r.update(status="error", error="RuntimeError: injected", metrics={})

    _edit_records(path, fail_sgd)
    code, _, err = main(capsys, *RUN, "--out", str(out), "--resume")
    assert code == 1 and "1 failed earlier: --retry-failed reruns them" in err
    assert "2 configurations: 1 ok, 0 oom, 0 skipped, 1 error, 0 crashed" in err
    code, _, err = main(capsys, *RUN, "--out", str(out), "--resume", "--retry-failed")
    assert code == 0, err
    assert {r["status"] for r in read_records(str(out))} == {"ok"}


def test_one_configuration_predicted_and_measured_keeps_both(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('[[run]]\nbackend = "simulate"\nmodels = "test-vit"\noptims = "sgd"\n\n'
                     '[[run]]\nbackend = "cpu"\nmodels = "test-vit"\noptims = "sgd"\nbudget = "titan-x"\n')
    code, _, err = main(capsys, "suite", str(suite), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0, err
    keys = sorted(r["key"] for r in read_records(str(tmp_path / "o")))
    assert keys == ["test-vit/sgd/ckpt-off/32bit/bs1/fp32/steps2/titan-x@cpu",
                    "test-vit/sgd/ckpt-off/32bit/bs1/fp32/steps2/titan-x@simulate"]


# --- exit status ------------------------------------------------------------------------------------------

def test_a_crashed_configuration_exits_1_after_writing_everything(tmp_path):
    env = {**os.environ, "MEMPROF_TEST_CRASH": "/sgd-fe/"}
    r = subprocess.run([sys.executable, "-m", "memprof", *RUN, "--backend", "cpu", "--budget", "device",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "2 configurations: 1 ok, 0 oom, 0 skipped, 0 error, 1 crashed" in r.stderr
    assert sorted(x["status"] for x in read_records(str(tmp_path / "o"))) == ["crashed", "ok"]
    assert (tmp_path / "o" / "table4.md").exists()


@pytest.mark.bitsandbytes
def test_oom_and_skipped_are_results_exit_0(tmp_path, capsys):
    code, _, err = main(capsys, "run", "--models", "test-vit", "--optims", "adamw,sgd-fe-nomom", "--state-bits", "8",
                        "--budget", "410MiB", "--jobs", "1", "--no-progress", "--backend", "simulate",
                        "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "2 configurations: 0 ok, 1 oom, 1 skipped, 0 error, 0 crashed" in err
