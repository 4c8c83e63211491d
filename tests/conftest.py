import pytest
import torch


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "cuda" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from a clean dynamo state: a graph captured as a recompile of code an earlier test
    compiled can differ (specialization carried over), and snapshots must not depend on test order."""
    torch._dynamo.reset()
    yield
