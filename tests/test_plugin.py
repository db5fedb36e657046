"""The pytest plugin (memprof.pytest_plugin), exercised by pytest's own pytester: a passing limit, a failing
limit (the negative control), the session report, the JSON output, and the usage errors."""

import json
import tomllib
from pathlib import Path

import pytest

from memprof.baseline import load_any
from memprof.pytest_plugin import parse_limit


def _installed() -> bool:
    """Whether the package's pytest11 entry point is installed (then pytest loads the plugin itself, and
    naming it again with -p would register it twice); an editable install made before the entry point
    existed lacks it."""
    from importlib.metadata import entry_points

    return any(ep.value == "memprof.pytest_plugin" for ep in entry_points(group="pytest11"))


LOAD_PLUGIN = () if _installed() else ("-p", "memprof.pytest_plugin")

STEP = '''
import pytest
import torch


def build():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    return model, torch.optim.AdamW(model.parameters())


def batch():
    return torch.randn(32, 64), torch.randint(0, 8, (32,))


def step(model, optimizer, inputs):
    x, y = inputs
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
'''


pytestmark = pytest.mark.usefixtures("torch_imported_once")


def run(pytester, body, *args):
    pytester.makepyfile(test_user=STEP + body)
    return pytester.runpytest(*LOAD_PLUGIN, "--memprof-backend", "simulate", *args)


def test_a_step_under_its_limit_passes_and_the_report_lists_it(pytester):
    result = run(pytester, '''
@pytest.mark.limit_cuda_memory("6 GiB", budget="rtx4090")
def test_fits(cuda_memory):
    r = cuda_memory.step(build, step, batch)
    assert r.source == "predicted" and r.peak_allocated_bytes > 0
''', "--memprof")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*memprof report*",
                                 "test_user.py::test_fits: peak * (predicted, simulate), budget rtx4090, limit 6.00 GiB"])


def test_a_step_over_its_limit_fails_with_the_breakdown_and_op(pytester):
    """Negative control: the same step under a limit smaller than its predicted peak fails."""
    result = run(pytester, '''
@pytest.mark.limit_cuda_memory("1 MiB")
def test_too_big(cuda_memory):
    cuda_memory.step(build, step, batch)
''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*cuda_memory: predicted peak * exceeds the limit 1.0 MiB (budget titan-x)*",
                                 "*at the peak: * op aten.*", "*breakdown: *parameters*"])


def test_the_json_output_is_read_by_memprof_compare(pytester, tmp_path):
    out = tmp_path / "memprof.jsonl"
    result = run(pytester, '''
def test_a(cuda_memory):
    cuda_memory.step(build, step, batch)


def test_b(cuda_memory):
    cuda_memory.step(build, step, batch)
''', "--memprof-json", str(out))
    result.assert_outcomes(passed=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["spec"]["model"] for r in records] == ["pytest:test_user.py::test_a", "pytest:test_user.py::test_b"]
    assert all(r["source"] == "predicted" and r["metrics"]["peak_allocated_bytes"] > 0 for r in records)
    baseline = load_any(str(out))
    assert len(baseline["benchmarks"]) == 2 and baseline["benchmarks"][0]["stats"]["peak_allocated_bytes"] > 0


@pytest.mark.parametrize("marker, message", [
    ('limit_cuda_memory("six gigs")', "*give a size such as*"),
    ('limit_cuda_memory("6 GiB", budget="gtx-9000")', "*budget='gtx-9000'*"),
])
def test_a_bad_limit_or_budget_is_a_usage_error(pytester, marker, message):
    result = run(pytester, f'''
@pytest.mark.{marker}
def test_x(cuda_memory):
    cuda_memory.step(build, step, batch)
''')
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: test_user.py::test_x: {message}"])


def test_a_marker_without_the_fixture_is_a_usage_error(pytester):
    result = run(pytester, '''
@pytest.mark.limit_cuda_memory("6 GiB")
def test_x():
    pass
''')
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*limit_cuda_memory needs the cuda_memory fixture*"])


def test_a_limited_test_that_runs_no_step_fails(pytester):
    result = run(pytester, '''
@pytest.mark.limit_cuda_memory("6 GiB")
def test_x(cuda_memory):
    pass
''')
    result.assert_outcomes(passed=1, errors=1)  # the teardown error fails the session
    result.stdout.fnmatch_lines(["*never ran cuda_memory.step*"])


def test_parse_limit():
    assert parse_limit("6 GiB") == 6 << 30 and parse_limit("512MiB") == 512 << 20 and parse_limit("8 GB") == 8 * 10 ** 9
    for bad in ("6", "-1 GiB", "0 GiB", "six GiB"):
        with pytest.raises(ValueError):
            parse_limit(bad)


def test_the_plugin_is_a_pytest11_entry_point():
    """Installed with the package: pip registers the entry point from pyproject.toml."""
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"memprof": "memprof.pytest_plugin"}


def test_the_limit_checks_reserved_when_the_marker_says_so(pytester):
    """A limit between the step's allocated and reserved peaks passes on allocated (the default) and fails on
    reserved; the allocated run is the negative control."""
    from memprof import api

    exec(STEP, namespace := {})
    probe = api.predict_step(namespace["build"], namespace["step"], namespace["batch"], budget="titan-x")
    allocated, reserved = probe.peak_allocated_bytes, probe.peak_reserved_bytes
    assert allocated < reserved
    limit = (allocated + reserved) // 2
    result = run(pytester, f'''
@pytest.mark.limit_cuda_memory({limit})
def test_allocated(cuda_memory):
    cuda_memory.step(build, step, batch)


@pytest.mark.limit_cuda_memory({limit}, metric="reserved")
def test_reserved(cuda_memory):
    cuda_memory.step(build, step, batch)
''')
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_reserved*", "*peak reserved * exceeds the limit*"])


def test_an_unknown_metric_is_a_usage_error_with_the_close_match(pytester):
    result = run(pytester, '''
@pytest.mark.limit_cuda_memory("6 GiB", metric="reserve")
def test_x(cuda_memory):
    cuda_memory.step(build, step, batch)
''')
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*metric='reserve': use 'allocated' or 'reserved' (did you mean 'reserved'?)*"])
