import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_forward_traces():
    """Each test predicts from scratch: no forward trace carried over from another test's predictions."""
    from memprof.simulation import shared

    shared.clear()
    yield
