"""The elementwise product of a predictive covariance with another matrix was linear_operator's
``MulLinearOperator``, which takes roots of both factors: a jittered Cholesky, and Lanczos past
``max_cholesky_size`` (the root of ``pred * I`` was 69% off), without a word. Times a diagonal it is now the diagonal
of products; times anything else the exact product, formed densely with a ``ClosedFormFallbackWarning``."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, IdentityLinearOperator

from bma_gp import ClosedFormFallbackWarning, GroupKernel

DT = torch.float64


def _predictive_covariance(batch=()):
    gen = torch.Generator().manual_seed(0)
    n, q = 40, 12
    groups = torch.randint(0, 5, (n, 1), generator=gen).to(DT)
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=DT), groups], -1)
    y = torch.randn(n, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.covar_module = GroupKernel(7, active_dims=[1]).double()

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(
                torch.zeros(z.shape[:-1], dtype=z.dtype), self.covar_module(z)
            )

    model = GP().eval()
    test = torch.cat(
        [torch.rand(*batch, q, 1, generator=gen, dtype=DT), torch.randint(0, 7, (*batch, q, 1), generator=gen).to(DT)],
        -1,
    )
    with torch.no_grad():
        return model(test).lazy_covariance_matrix


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("order", ["pred * D", "D * pred"])
@pytest.mark.parametrize("kind", ["diagonal", "identity"])
def test_times_diagonal_is_diagonal(batch, order, kind):
    pred = _predictive_covariance(batch)
    q = pred.shape[-1]
    d = torch.rand(q, dtype=DT, generator=torch.Generator().manual_seed(1)) + 1
    D = DiagLinearOperator(d) if kind == "diagonal" else IdentityLinearOperator(q, dtype=DT)
    op = pred * D if order == "pred * D" else D * pred
    assert isinstance(op, DiagLinearOperator), type(op).__name__
    torch.testing.assert_close(op.to_dense(), pred.to_dense() * D.to_dense())
    with gpytorch.settings.max_cholesky_size(5):  # linear_operator's product took Lanczos here
        root = op.root_decomposition().root.to_dense()
    torch.testing.assert_close(root @ root.mT, op.to_dense(), rtol=1e-10, atol=1e-12)


def test_times_dense_is_exact_and_warns():
    pred = _predictive_covariance()
    q = pred.shape[-1]
    A = torch.rand(q, q, dtype=DT, generator=torch.Generator().manual_seed(2))
    other = DenseLinearOperator(A @ A.mT + torch.eye(q, dtype=DT))
    with pytest.warns(ClosedFormFallbackWarning, match="elementwise"):
        op = pred * other
    torch.testing.assert_close(op.to_dense(), pred.to_dense() * other.to_dense())
    rhs = torch.randn(q, dtype=DT, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        x = op.solve(rhs)
    torch.testing.assert_close(x, torch.linalg.solve(op.to_dense(), rhs), rtol=1e-9, atol=1e-9)


def test_identity_times_block_mean_operator_is_its_diagonal():
    # linear_operator's IdentityLinearOperator * A returned A itself (wrong off the diagonal)
    from bma_gp import BlockMeanLinearOperator, Partition

    M = BlockMeanLinearOperator(
        torch.tensor([1.5, 2.0, 1.2], dtype=DT),
        torch.eye(3, dtype=DT) + 0.3,
        Partition.from_labels(torch.arange(10) % 3),
    )
    op = IdentityLinearOperator(10, dtype=DT) * M
    assert isinstance(op, DiagLinearOperator)
    torch.testing.assert_close(op.to_dense(), torch.diag(M.to_dense().diagonal()))
