"""linear_operator's wrappers (BlockDiag, BlockInterleaved, BatchRepeat) take the roots of the operator they wrap
through its private hooks: those must be the closed forms, never Lanczos; and the public roots check ``method``."""

import gpytorch
import linear_operator.utils.lanczos as lanczos
import pytest
import torch
from linear_operator.operators import BatchRepeatLinearOperator, BlockDiagLinearOperator, DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, Partition


@pytest.fixture
def no_lanczos(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Lanczos ran")

    monkeypatch.setattr(lanczos, "lanczos_tridiag", refuse)


def _tasks(dtype=torch.float64, t=2, n=37, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[:k] = torch.arange(k)  # every block present; labels in random order, one block may be a singleton
    labels[-1] = k  # a singleton block
    p = Partition.from_labels(labels)
    lam = (torch.rand(t, k + 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    W = torch.randn(t, k + 1, k + 1, generator=g, dtype=torch.float64)
    return BlockMeanLinearOperator(lam, (W @ W.mT / k).to(dtype), p)


def _sum(dtype=torch.float64):
    M = _tasks(dtype)
    d = torch.rand(M.shape[:-1], dtype=dtype, generator=torch.Generator().manual_seed(1)) + 0.1
    return M + DiagLinearOperator(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [_tasks, _sum], ids=["operator", "sum"])
def test_from_batch_mvn_roots_are_closed_form(make, dtype, no_lanczos):
    M = make(dtype)
    t, n = M.shape[0], M.shape[-1]
    mvn = gpytorch.distributions.MultivariateNormal(torch.zeros(t, n, dtype=dtype), M)
    cov = gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn).lazy_covariance_matrix
    dense = cov.to_dense().double()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    with gpytorch.settings.max_cholesky_size(0):  # above it: linear_operator would take Lanczos for a plain operator
        R = cov.root_decomposition().root.to_dense().double()
        Ri = cov.root_inv_decomposition().root.to_dense().double()
    assert R.shape == dense.shape
    torch.testing.assert_close(R @ R.mT, dense, rtol=tol, atol=tol)
    torch.testing.assert_close(Ri @ Ri.mT, torch.linalg.inv(dense), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("make", [_tasks, _sum], ids=["operator", "sum"])
def test_private_hooks_of_wrappers(make, no_lanczos):
    M = make()
    dense = M.to_dense()
    for wrapped, reference in (
        (BlockDiagLinearOperator(M), torch.block_diag(*dense)),
        (BatchRepeatLinearOperator(M[0], torch.Size([3])), dense[0].expand(3, -1, -1)),
    ):
        with gpytorch.settings.max_cholesky_size(0):
            R = wrapped.root_decomposition().root.to_dense()
            Ri = wrapped.root_inv_decomposition().root.to_dense()
        torch.testing.assert_close(R @ R.mT, reference)
        torch.testing.assert_close(Ri @ Ri.mT, torch.linalg.inv(reference))
    R = M._root_decomposition()
    torch.testing.assert_close((R @ R.mT).to_dense() if hasattr(R, "to_dense") else R @ R.mT, dense)


def test_product_private_hooks_refuse():
    M, N = _tasks(seed=0), _tasks(seed=1)  # two partitions: a BlockMeanProductLinearOperator
    P = M @ N
    assert type(P).__name__ == "BlockMeanProductLinearOperator"
    for hook in (P._root_decomposition, P._root_inv_decomposition):
        with pytest.raises(ValueError, match="no root"):
            hook()


@pytest.mark.parametrize("make", [_tasks, _sum], ids=["operator", "sum"])
def test_root_method_checked(make):
    M = make()[0]
    for method in ("lanczos", "cholesky", "symeig", None):  # names linear_operator knows: accepted, closed form
        R = M.root_decomposition(method=method).root.to_dense()
        torch.testing.assert_close(R @ R.mT, M.to_dense())
    M.root_inv_decomposition(method="pinverse")
    with pytest.raises(ValueError, match="root_decomposition\\(method='bogus'\\).*lanczos"):
        M.root_decomposition(method="bogus")
    with pytest.raises(ValueError, match="root_inv_decomposition\\(method=3\\)"):
        M.root_inv_decomposition(method=3)


def test_matrix_function_result_dtype():
    M = _tasks()[0]
    with pytest.raises(TypeError, match="real floating-point.*complex128"):
        M.matrix_function(lambda e: e.to(torch.complex128))
    with pytest.raises(TypeError, match="real floating-point.*int64"):
        M.matrix_function(lambda e: e.long())
    # a float result of another precision is cast back to the operator's dtype
    F = M.matrix_function(lambda e: e.float().exp())
    assert F.dtype == torch.float64
    torch.testing.assert_close(F.to_dense(), torch.linalg.matrix_exp(M.to_dense()), rtol=1e-5, atol=1e-5)
