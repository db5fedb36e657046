import signal

import pytest
import torch

# A shell's background job (`pytest ... &` in a script) starts with SIGINT ignored, and every process it spawns
# inherits that: the tests that press Ctrl-C on a memprof run would see it ignored. As a terminal's foreground
# job, SIGINT raises KeyboardInterrupt here and is at its default in the runs the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    skips = {"gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
             "bitsandbytes": None if importlib.util.find_spec("bitsandbytes") else "needs bitsandbytes (optional)"}
    for item in items:
        for marker, reason in skips.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _a_100_column_terminal(monkeypatch):
    """What the tests read is wrapped for a 100-column terminal, whatever COLUMNS the shell that runs them has (the
    processes they start inherit it); a test of another width sets its own."""
    monkeypatch.setenv("COLUMNS", "100")


@pytest.fixture(autouse=True)
def _fresh_forward_traces():
    """Each test predicts from scratch: no forward trace or attention recording carried over from another test's
    predictions."""
    from memprof.simulation.memo import MEMO

    MEMO.clear()
    yield


@pytest.fixture
def digits():
    """Accuracy mode's default data set (scikit-learn's digits, 32x32)."""
    from memprof import accuracy

    return accuracy.load_data((32, 32))


@pytest.fixture(scope="session")
def torch_imported_once():
    """pytester (in-process) forgets the modules an inner run imports, and torch registers its operator libraries
    once per process: a step is predicted here first, so everything a step needs is imported before the inner runs."""
    from memprof.api import predict_step

    def build():
        model = torch.nn.Linear(8, 2)
        return model, torch.optim.AdamW(model.parameters())

    def step(model, optimizer, inputs):
        x, y = inputs
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    predict_step(build, step, lambda: (torch.randn(4, 8), torch.randint(0, 2, (4,))))
