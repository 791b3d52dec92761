"""BlockMeanAdagrad's small CPU root runs numpy's and scipy's BLAS on one thread (OpenBLAS's own threads, beside
other work, made a step at 100-128 blocks 2-40x slower than at 129, where torch computes the root)."""

import pytest
import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from bma_gp.optim import BlockMeanAdagrad
from bma_gp.optim import functional as F


def _blas_threads() -> list[int]:
    return [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers]


@pytest.mark.skipif(not _blas_threads(), reason="no BLAS library that threadpoolctl controls is loaded")
def test_the_numpy_root_runs_blas_on_one_thread_and_gives_the_count_back(monkeypatch):
    lapack = F._lapack()
    seen = []

    class Recording:
        def dsyevd(self, *args, **kwargs):
            seen.append(_blas_threads())
            return lapack.dsyevd(*args, **kwargs)

    monkeypatch.setattr(F, "_lapack", lambda: Recording())
    params = [torch.randn(2, requires_grad=True) for _ in range(100)]  # 100 blocks: the numpy root
    opt = BlockMeanAdagrad(params, lr=0.01)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        for _ in range(2):
            opt.zero_grad()
            sum((p**2).sum() for p in params).backward()
            opt.step()
        after = _blas_threads()
    assert seen and all(count == 1 for counts in seen for count in counts)
    assert after == before  # the caller's setting is given back
