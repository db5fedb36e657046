"""Worker processes: none outlives its parent (kill -9, Ctrl-C), and a worker's error arrives as text with
its original type, whatever the exception holds.

Process trees are read from /proc (Linux); a process counts as alive unless it is gone, a zombie, or a
new process that reused its PID (start time differs). What this proves: after the parent is killed,
every process it had started is dead within DEADLINE_S. What it does not prove: anything about systems
without /proc (the tests skip there), nor which of the two mechanisms (PR_SET_PDEATHSIG or the stdin
pipe) ended a worker; the stdin pipe alone is tested separately.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 5.0
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process trees from /proc")


# --- process trees from /proc -----------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid` now: {pid: start time}."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[1], []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (st := _stat(child)) is not None:
                found[child] = st[2]
                todo.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == start


def survivors(procs: dict[int, int], within_s: float = DEADLINE_S) -> list[str]:
    """The processes of `procs` still alive after `within_s` seconds, named by their command line."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(p, s) for p, s in procs.items()):
        time.sleep(0.1)
    left = []
    for pid, start in procs.items():
        if alive(pid, start):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                cmd = "?"
            left.append(f"{pid}: {cmd}")
    return left


def wait_for_workers(proc: subprocess.Popen, count: int, timeout_s: float = 180) -> dict[int, int]:
    """The descendants of `proc` once at least `count` memprof workers run among them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read() if proc.stderr else ''}"
        procs = descendants(proc.pid)
        workers = [p for p in procs if b"memprof.executors.worker" in _cmdline(p)]
        if len(workers) >= count:
            return procs
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} workers started in {timeout_s} s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def memprof_run(out: Path, *args, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memprof", "run", "--models", "test-vit", "--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=_env(), **popen)


def _kill9_then_survivors(proc: subprocess.Popen, procs: dict[int, int]) -> list[str]:
    proc.kill()
    proc.wait()
    return survivors(procs)


# --- the check itself, and its negative control -----------------------------------------------------------

@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_the_check_sees_a_child_that_outlives_its_parent():
    """Negative control: a child started without any mechanism survives a kill -9 of its parent."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                               "subprocess.Popen(['sleep', '60']); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        procs = descendants(parent.pid)
        assert len(procs) == 1
        left = _kill9_then_survivors(parent, procs)
        assert len(left) == 1 and "sleep 60" in left[0]
    finally:
        for pid, start in descendants(parent.pid).items() | procs.items():
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)


# --- kill -9 and Ctrl-C of a real run -----------------------------------------------------------------------

def test_kill9_of_a_parallel_run_leaves_no_worker(tmp_path):
    proc = memprof_run(tmp_path, "--optims", "all", "--grad-ckpt", "off,on", "--batch-size", "1,2", "--jobs", "2")
    procs = wait_for_workers(proc, 2)
    assert proc.poll() is None  # mid-run
    assert _kill9_then_survivors(proc, procs) == []


def test_kill9_of_a_measuring_run_leaves_no_worker(tmp_path):
    proc = memprof_run(tmp_path, "--optims", "adamw,sgd", "--backend", "cpu")
    procs = wait_for_workers(proc, 1)
    assert _kill9_then_survivors(proc, procs) == []


def test_ctrl_c_of_a_parallel_run_stops_every_worker(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: exit 130, no worker left."""
    proc = memprof_run(tmp_path, "--optims", "all", "--grad-ckpt", "off,on", "--jobs", "2", start_new_session=True)
    procs = wait_for_workers(proc, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err.decode() and "Traceback" not in err.decode()
    assert survivors(procs) == []


def test_a_worker_exits_when_its_stdin_closes_even_while_busy():
    """The portable mechanism alone: no parent dies here (so no PR_SET_PDEATHSIG), the pipe just closes
    while the worker is inside a configuration that would never return."""
    worker = subprocess.Popen([sys.executable, "-m", "memprof.executors.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT,
                              env=_env(MEMPROF_TEST_WORKER_HOOK="tests.test_processes:_hook_predict_blocks"))
    try:
        from memprof.spec import RunSpec

        worker.stdin.write(json.dumps({"spec": RunSpec("test-vit", "sgd").to_dict(), "backend": "simulate"}).encode()
                           + b"\n")
        worker.stdin.flush()
        lines = iter(worker.stderr.readline, b"")
        assert any(line.strip() == b"blocking" for line in lines), "the worker never reached the configuration"
        worker.stdin.close()
        assert worker.wait(timeout=DEADLINE_S) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


# --- errors and crashes cross the process boundary as text ----------------------------------------------------

class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock (and a lambda)."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()
        self.callback = lambda: None


def _hook_raise_unpicklable_on_sgd():
    """MEMPROF_TEST_WORKER_HOOK: inside the worker, predict raises LockedError for plain SGD."""
    from memprof.simulation import simulate

    original = simulate.prediction

    def prediction(spec, **kwargs):
        if spec.optim == "sgd":
            raise LockedError("injected: the real error, not a pickling one")
        return original(spec, **kwargs)

    simulate.prediction = prediction


def _hook_predict_blocks():
    from memprof.simulation import simulate

    def prediction(spec, **kwargs):
        print("blocking", file=sys.stderr, flush=True)
        threading.Event().wait()

    simulate.prediction = prediction


def test_the_injected_exception_is_not_picklable():
    """Control for the next test: the exception it injects would break a pickling transport."""
    import pickle

    with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
        pickle.dumps(LockedError("x"))


def _grid(*optims):
    from memprof.model_sources.open_clip import REGISTRY as MODELS
    from memprof.optims import REGISTRY as OPTIMS
    from memprof.spec import expand_grid

    return expand_grid([MODELS["test-vit"]], [OPTIMS[o] for o in optims], [False], [32], [1])


def test_unpicklable_worker_error_arrives_as_its_type_and_message(tmp_path, monkeypatch):
    from memprof.executors.runner import run_grid

    monkeypatch.setenv("MEMPROF_TEST_WORKER_HOOK", "tests.test_processes:_hook_raise_unpicklable_on_sgd")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    records = run_grid(_grid("adamw", "sgd", "sgd-fe"), str(tmp_path), progress=False, jobs=2)
    assert [r["status"] for r in records] == ["ok", "error", "ok"], [r["error"] for r in records]
    error = records[1]["error"]
    assert error.startswith("LockedError: injected: the real error, not a pickling one (at test_processes:")
    assert error.endswith("in prediction)") and "cannot pickle" not in error


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_a_dying_pool_worker_is_crashed_and_the_grid_goes_on(tmp_path, monkeypatch):
    from memprof.executors.runner import run_grid

    monkeypatch.setenv("MEMPROF_TEST_CRASH", "/sgd/")
    records = run_grid(_grid("adamw", "sgd", "sgd-fe"), str(tmp_path), progress=False, jobs=2)
    assert [r["status"] for r in records] == ["ok", "crashed", "ok"]
    assert records[1]["metrics"]["exit_code"] == -9 and "killed by SIGKILL" in records[1]["error"]
    assert records[1]["source"] == "predicted"


@pytest.mark.slow
def test_a_worker_past_its_time_is_crashed(monkeypatch):
    from memprof.executors.runner import run_isolated
    from memprof.spec import RunSpec

    monkeypatch.setenv("MEMPROF_TEST_WORKER_HOOK", "tests.test_processes:_hook_predict_blocks")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    start = time.monotonic()
    out = run_isolated(RunSpec("test-vit", "sgd"), "simulate", timeout_s=8)
    assert out["status"] == "crashed" and out["error"].startswith("worker timed out after 8 s")
    assert time.monotonic() - start < 8 + DEADLINE_S


def test_workers_share_the_cores_out(monkeypatch):
    """Two workers on two cores get one torch thread each; one worker gets both; a user's setting stands."""
    from memprof.executors import runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    assert runner.worker_env(2)["OMP_NUM_THREADS"] == "1" and runner.worker_env(1)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert runner.worker_env(2)["OMP_NUM_THREADS"] == "7"
