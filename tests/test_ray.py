"""The Ray executor on a real local Ray instance (2 CPUs): the same records as the local executor, and a
lost Ray worker or a dead memprof worker is a crashed record while the rest of the grid finishes."""

import json
import os
import re
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from memprof.executors.runner import run_grid  # noqa: E402
from memprof.spec import GridEntry, RunSpec  # noqa: E402

VOLATILE_ENV = ("node", "node_id", "gpu_ids", "executor")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; the test hooks are set before it starts (tasks inherit them)."""
    from memprof.executors.ray_executor import connect

    os.environ["MEMPROF_TEST_KILL_RAY_WORKER"] = "/steps3/"
    os.environ["MEMPROF_TEST_CRASH"] = "/steps4/"
    try:
        connect(None, num_cpus=2)
        yield ray
    finally:
        ray.shutdown()
        del os.environ["MEMPROF_TEST_KILL_RAY_WORKER"], os.environ["MEMPROF_TEST_CRASH"]


def comparable(record: dict) -> dict:
    """A record without what may differ between executors: timings and where it ran."""
    env = {k: v for k, v in record["environment"].items() if k not in VOLATILE_ENV}
    # Ray gives a one-CPU task one thread (OMP_NUM_THREADS=1): the cpu device names its threads
    env["device"] = re.sub(r", \d+ threads", "", env["device"])
    metrics = {k: v for k, v in record["metrics"].items() if not (k.endswith(("_ms", "_ms_median")) or
                                                                   k.startswith("host_"))}
    return {**record, "elapsed_s": None, "environment": env, "metrics": metrics}


def out(path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def entries(steps: int = 2) -> list:
    return [GridEntry(RunSpec(model="test-vit", optim=o, steps=steps)) for o in ("adamw", "sgd")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_a_ray_run_gives_the_local_records(local_ray, tmp_path, backend):
    grid = entries() + [GridEntry(RunSpec(model="test-vit", optim="sgd", state_bits=8), "a skip, kept")]
    local = run_grid(grid, out(tmp_path / "local"), backend, progress=False, jobs=2)
    remote = run_grid(grid, out(tmp_path / "ray"), backend, progress=False, executor="ray")
    assert [r["status"] for r in remote] == ["ok", "ok", "skipped"]
    assert [comparable(r) for r in remote] == [comparable(r) for r in local]
    assert all(r["environment"]["executor"] == "ray" and r["environment"]["node"] for r in remote)
    assert all("node_id" in r["environment"] and r["environment"]["gpu_ids"] == [] for r in remote[:2])
    on_disk = [json.loads(line) for line in open(tmp_path / "ray" / "results.jsonl")]
    assert sorted(r["key"] for r in on_disk) == sorted(r["key"] for r in remote)


def test_the_comparison_ignores_timings_and_nodes_but_sees_a_changed_figure():
    """Negative control of the equality above: a different peak is seen; a different node or time is not."""
    from memprof.results import environment, make_record

    spec = RunSpec(model="test-vit", optim="adamw")
    env = {**environment("simulate", "cpu-simulated"), "node": "a", "executor": "local"}
    one = make_record(spec, "ok", "predicted", env, {"peak_allocated_bytes": 1000}, elapsed_s=1.0)
    moved = make_record(spec, "ok", "predicted", {**env, "node": "b", "executor": "ray", "gpu_ids": ["0"]},
                        {"peak_allocated_bytes": 1000}, elapsed_s=9.0)
    changed = make_record(spec, "ok", "predicted", env, {"peak_allocated_bytes": 1001}, elapsed_s=1.0)
    assert comparable(one) == comparable(moved)
    assert comparable(one) != comparable(changed)


@pytest.mark.slow  # the local executor's crash handling is in the quick set (tests/test_processes.py)
def test_a_killed_ray_worker_and_a_dead_worker_are_crashed_and_the_rest_finishes(local_ray, tmp_path):
    grid = [GridEntry(RunSpec(model="test-vit", optim="adamw", steps=3)),  # its Ray worker is SIGKILLed
            GridEntry(RunSpec(model="test-vit", optim="adamw", steps=4)),  # its memprof worker is SIGKILLed
            GridEntry(RunSpec(model="test-vit", optim="sgd"))]
    records = run_grid(grid, out(tmp_path), "simulate", progress=False, executor="ray")
    assert [r["status"] for r in records] == ["crashed", "crashed", "ok"]
    assert "on node" in records[0]["error"] and "Worker" in records[0]["error"]
    assert "killed by SIGKILL on node" in records[1]["error"]
    assert len(open(tmp_path / "results.jsonl").readlines()) == 3


def run_cli(*args, env=None, tmp_out=None):
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, env=env)


def test_an_unreachable_address_is_one_line_and_starts_nothing(tmp_path):
    never = tmp_path / "never"
    proc = run_cli("run", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--executor", "ray",
                   "--ray-address", "ray://127.0.0.1:1", "--out", str(never))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray://127.0.0.1:1" in lines[0] and "Traceback" not in proc.stderr
    assert not never.exists()


def test_executor_ray_without_ray_says_how_to_install(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "ray.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("run", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--executor", "ray",
                   "--out", out(tmp_path / "o"), env=env)
    assert proc.returncode == 2
    assert "pip install -e '.[ray]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
