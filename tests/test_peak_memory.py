"""The memory probe sees tensor memory (which tracemalloc cannot) and not what setup allocated."""

import pytest

from peak_memory import peak_memory_increase

MB = 2**20


@pytest.mark.slow
def test_probe_counts_work_and_not_setup():
    setup = "import torch\nkept = torch.ones(50 * 2**20 // 8, dtype=torch.float64)"
    nothing = peak_memory_increase(setup, "kept.add_(1)")
    a_temporary = peak_memory_increase(setup, "t = torch.ones(80 * 2**20 // 8, dtype=torch.float64)\ndel t")
    assert nothing < 10 * MB
    assert 75 * MB < a_temporary < 100 * MB


def test_failure_in_measured_code_raises():
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        peak_memory_increase("", "1 / 0")
