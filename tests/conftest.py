"""Shared test configuration: deterministic random numbers and the CUDA marker."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so tolerances are checked on fixed data, and ends with torch's
    thread count as it found it: an example script's ``main`` sets it (``paper_cnn --threads``, default 1), and the
    tests after it ran on one thread, an order-dependent difference in reductions."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems (``pytestmark = pytest.mark.usefixtures("one_thread")``): one intra-op thread is
    many times faster than several on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def pytest_configure(config):
    # The suite builds more BlockMeanAdagrad(fused=True) structures (numbers of tensors, ranks,
    # dtypes) than TorchDynamo's default of 8 compiled variants per function; past that limit the
    # later tests would run the passes eagerly and no longer test the compiled code.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
