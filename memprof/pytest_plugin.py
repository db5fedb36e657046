"""pytest plugin: guard the CUDA memory of a training step in a test suite (entry point `pytest11`).

    @pytest.mark.limit_cuda_memory("6 GiB", budget="rtx4090")
    def test_step_fits(cuda_memory):
        cuda_memory.step(build, step, batch)

    @pytest.mark.limit_cuda_memory("6 GiB", budget="rtx4090", metric="reserved")  # what the card runs out of

`cuda_memory.step(build, step, batch)` runs a user's step (memprof.api): predicted without a GPU (the
simulation: allocated bytes torch.cuda would report on the budget card), measured with one (torch.cuda's
max_memory_allocated), or live tensor bytes on the CPU; `--memprof-backend` chooses (auto: cuda where a
GPU is present, else simulate). The limit is checked against allocated bytes by default, or with
`metric="reserved"` against reserved bytes (torch.cuda.max_memory_reserved: the allocator's cache included,
which is what a card runs out of; the cpu backend has none). A peak over the limit fails the test with the
breakdown at the peak and the op where it happened. `--memprof` prints one line per step after the run (peak, predicted or
measured, budget); `--memprof-json PATH` writes the results records `memprof compare` reads. A bad limit,
an unknown budget, a marker on a test without the fixture, or a limited test that never runs a step is a
usage error or a failure, never a silent pass.
"""

from __future__ import annotations

import json
import sys

import pytest

from memprof.budget import format_size

METRICS = {"allocated": "peak_allocated_bytes", "reserved": "peak_reserved_bytes"}  # marker metric= -> field
_RECORDS = pytest.StashKey[list]()
DEFAULT_BUDGET = "titan-x"


def parse_limit(text) -> int:
    """'6 GiB', '512MiB', '8 GB' (or a whole number of bytes) -> bytes (memprof.budget.parse_size, the
    package's one size syntax); ValueError names the fix."""
    from memprof.budget import parse_size
    from memprof.errors import UsageError

    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    try:
        return parse_size(text, "limit_cuda_memory")
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _marker_args(marker) -> tuple[int, str, str]:
    """(limit bytes, budget, metric) of a limit_cuda_memory marker; ValueError on a bad limit, budget or metric."""
    import difflib

    from memprof.budget import parse_budget
    from memprof.errors import UsageError

    if len(marker.args) != 1 or set(marker.kwargs) - {"budget", "metric"}:
        raise ValueError("limit_cuda_memory takes one limit and an optional budget= and metric=, e.g. "
                         "@pytest.mark.limit_cuda_memory(\"6 GiB\", budget=\"rtx4090\", metric=\"reserved\")")
    limit = parse_limit(marker.args[0])
    budget = marker.kwargs.get("budget", DEFAULT_BUDGET)
    try:
        parse_budget(str(budget))
    except UsageError as exc:
        raise ValueError(f"limit_cuda_memory budget={budget!r}: {exc}") from None
    metric = marker.kwargs.get("metric", "allocated")
    if metric not in METRICS:
        close = difflib.get_close_matches(str(metric), list(METRICS), n=1, cutoff=0.5)
        raise ValueError(f"limit_cuda_memory metric={metric!r}: use {' or '.join(map(repr, METRICS))}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return limit, budget, metric


def pytest_addoption(parser):
    group = parser.getgroup("memprof", "CUDA memory of training steps (memprof)")
    group.addoption("--memprof", action="store_true", help="print each cuda_memory step's peak after the run")
    group.addoption("--memprof-json", metavar="PATH", default=None,
                    help="write each step's results record (JSON lines) to PATH; `memprof compare` reads it")
    from memprof.options import BY_NAME, PLUGIN

    backend = BY_NAME["backend"]  # the table's option (memprof.options), as every other door takes it
    group.addoption("--memprof-backend", default=backend.default_for(PLUGIN), help=backend.help)


def pytest_configure(config):
    config.addinivalue_line("markers", "limit_cuda_memory(limit, budget='titan-x', metric='allocated'): fail when "
                                       "the peak (allocated, or reserved) of the steps the test runs through the "
                                       "cuda_memory fixture exceeds limit")
    config.stash[_RECORDS] = []
    if config.getoption("memprof_backend", None) is not None:
        _backend(config)  # a bad --memprof-backend is one usage error before any test, not one per test
    path = config.getoption("memprof_json", None)
    if path:
        _check_writable(path)


def _check_writable(path: str) -> None:
    """--memprof-json PATH, proved writable before any test runs (its folder made if missing), or a usage error."""
    import os
    from pathlib import Path

    if os.path.isdir(path):
        raise pytest.UsageError(f"--memprof-json {path} is a directory: give a file path, e.g. {path}/memprof.jsonl")
    folder = os.path.dirname(os.path.abspath(path))
    above = next(p for p in [folder, *Path(folder).parents] if os.path.exists(p))
    if not os.path.isdir(above):
        raise pytest.UsageError(f"--memprof-json {path} is not writable: {above} is a file, not a folder; choose "
                                f"another path")
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed:
            os.remove(path)
    except OSError as exc:
        raise pytest.UsageError(f"--memprof-json {path} is not writable ({exc.strerror or exc}): choose a path you "
                                f"can write") from None


def pytest_collection_modifyitems(config, items):
    """Usage errors before anything runs: a bad limit or budget, or a limit on a test without the fixture."""
    for item in items:
        marker = item.get_closest_marker("limit_cuda_memory")
        if marker is None:
            continue
        try:
            _marker_args(marker)
        except ValueError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
        if "cuda_memory" not in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid}: limit_cuda_memory needs the cuda_memory fixture: add it to the "
                                    f"test's arguments and run the step with cuda_memory.step(build, step, batch)")


def _backend(config):
    """The backend `--memprof-backend` names (auto: cuda where a GPU is present, else simulate), from the
    registry (memprof.backends.registry); an unknown or unusable one is a usage error."""
    from memprof.backends.registry import resolve
    from memprof.errors import UsageError

    try:
        return resolve(config.getoption("memprof_backend"))[0]
    except UsageError as exc:
        raise pytest.UsageError(f"--memprof-backend: {exc}") from None


class CudaMemory:
    """The `cuda_memory` fixture: runs a training step and checks its peak against the test's limit."""

    def __init__(self, node, config):
        self.node, self.config = node, config
        marker = node.get_closest_marker("limit_cuda_memory")
        self.limit_bytes, self.budget, self.metric = _marker_args(marker) if marker else (None, DEFAULT_BUDGET,
                                                                                           "allocated")
        self.backend = _backend(config)
        self.results: list = []
        self.called = False

    def step(self, build, step, batch, steps: int = 2):
        """Run `steps` steps of step(model, optimizer, batch()) on the model and optimizer build() returns;
        returns the memprof.results.Result. Fails the test when the peak exceeds the limit."""
        from memprof import api

        self.called = True
        label = f"pytest:{self.node.nodeid}" + (f"#{len(self.results)}" if self.results else "")
        result = api.run_step(build, step, batch, backend=self.backend.name, budget=self.budget, steps=steps,
                              label=label)
        self.results.append(result)
        self.config.stash[_RECORDS].append((self.node.nodeid, self.limit_bytes, result))
        if result.record["status"] == "error":
            pytest.fail(f"cuda_memory: the step failed: {result.record['error']}", pytrace=False)
        peak = result.peak_bytes if self.metric == "allocated" else result.record["metrics"].get(METRICS[self.metric])
        if peak is None and self.limit_bytes is not None:
            pytest.fail(f"cuda_memory: the {self.backend.name} backend reports no {self.metric} peak (it has no "
                        f"caching allocator): use metric=\"allocated\" or another --memprof-backend", pytrace=False)
        if self.limit_bytes is not None and (result.record["status"] == "oom" or peak > self.limit_bytes):
            from memprof.reports.terminal import WIDTH, wrapped

            pytest.fail(wrapped(f"cuda_memory: {result.record['source']} peak {self.metric} {format_size(peak)} "
                                f"exceeds the limit {format_size(self.limit_bytes)} (budget {self.budget})", width=WIDTH)
                        + f"\n{result}", pytrace=False)
        return result


@pytest.fixture
def cuda_memory(request):
    """Run a training step under memprof: `cuda_memory.step(build, step, batch)`."""
    fixture = CudaMemory(request.node, request.config)
    yield fixture
    if fixture.limit_bytes is not None and not fixture.called:
        pytest.fail("limit_cuda_memory: the test never ran cuda_memory.step(build, step, batch), so the limit "
                    "checked nothing", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(_RECORDS, [])
    if not config.getoption("memprof") or not records:
        return
    terminalreporter.section("memprof report")
    for nodeid, limit, result in records:
        r = result.record
        limit_text = f", limit {format_size(limit)}" if limit is not None else ""
        terminalreporter.write_line(f"{nodeid}: peak {format_size(result.peak_bytes)} ({r['source']}, "
                                    f"{r['environment']['backend']}), budget {r['spec']['budget']}{limit_text}"
                                    + ("" if r["status"] == "ok" else f" [{r['status']}]"))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("memprof_json")
    if not path:
        return
    records = session.config.stash.get(_RECORDS, [])
    try:
        with open(path, "w", encoding="utf-8") as fh:
            for _, _, result in records:
                fh.write(json.dumps(result.record, sort_keys=True) + "\n")
    except OSError as exc:  # the tests ran: say what was not saved, and fail the session, without a traceback
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = (f"memprof: error: cannot write --memprof-json {path} ({exc.strerror or exc}): the {len(records)} "
                f"records were not saved")
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line, file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = 1
