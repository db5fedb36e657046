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
def _fresh_forward_traces():
    """Each test predicts from scratch: no forward trace or attention recording carried over from another test's
    predictions."""
    from memprof.simulation.memo import MEMO

    MEMO.clear()
    yield
