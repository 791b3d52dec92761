"""numba's thread pool and torch's thread count: starting numba's pool (under its OpenMP layer) set the OpenMP
runtime's thread count, which torch shares, so a user's ``torch.set_num_threads(1)`` became every core after the
first ``kernel_block_mean`` or fused optimizer step (15 times slower beside another busy process). Each case runs in a
fresh interpreter, where the pool has not started yet."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: a thread count of 1 is the default")

CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    import numba
    from bma_gp import Partition, kernel_block_mean
    from bma_gp.optim import BlockMeanAdagrad
    import gpytorch
    if sys.argv[1] == "kernel":
        x = torch.randn(20000, 3)  # large enough for the numba tile reduction
        p = Partition.from_labels(torch.randint(0, 10, (20000,)))
        with torch.no_grad():
            kernel_block_mean(gpytorch.kernels.RBFKernel(), x, p, fused=True)
    else:
        model = torch.nn.Linear(2000, 2000)  # past the size where fused=True takes the numba kernels
        opt = BlockMeanAdagrad(model.parameters(), lr=0.1, fused=True)
        model(torch.randn(8, 2000)).sum().backward()
        opt.step()
    print(torch.get_num_threads(), numba.get_num_threads())
    """
)


@pytest.mark.parametrize("case", ["kernel", "optimizer"])
def test_numba_keeps_torchs_thread_count(case):
    env = dict(os.environ)
    env.pop("NUMBA_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, case], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    torch_threads, numba_threads = (int(v) for v in done.stdout.split()[-2:])
    assert torch_threads == 1
    assert numba_threads == 1
