"""Shared test configuration: deterministic random numbers and the CUDA marker."""

import pytest
import torch


def _function_modes() -> list:
    """torch's active torch-function modes (``torch.set_default_device`` pushes one), or [] where torch's private
    accessor is missing."""
    try:
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:  # pragma: no cover - another torch
        return []
    return list(_get_current_function_mode_stack())


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so tolerances are checked on fixed data, and ends with torch's
    thread count as it found it: an example script's ``main`` sets it (``paper_cnn --threads``, default 1), and the
    tests after it ran on one thread, an order-dependent difference in reductions.

    A test that leaves a torch-function mode active fails here (and the mode is removed): ``set_default_device`` back
    to ``torch.get_default_device()`` (``cpu``) leaves a ``DeviceContext`` mode that every later torch call in the
    worker went through, which doubled a test's count of patched ``Tensor`` method calls depending on which tests
    ran before it."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    modes = len(_function_modes())
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    left = _function_modes()[modes:]
    if left:
        torch.set_default_device(None)  # pops a DeviceContext
        for _ in range(len(_function_modes()) - modes):
            torch._C._pop_torch_function_stack()
        pytest.fail(
            f"the test left torch-function modes active: {left}. Restore the default device with "
            "torch.set_default_device(None), not with the device torch.get_default_device() returned.",
            pytrace=False,
        )


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
