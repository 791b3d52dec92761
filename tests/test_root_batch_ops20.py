"""Batch and dtype operations on roots known by their products (trial 20): linear_operator's default rebuilt a
``_WoodburyRoot``, ``_ZLRoot`` or a posterior root with the old shape (``unsqueeze`` kept ``(n, n)``, a repeated
root held one copy: ``BatchRepeatLinearOperator(root, (2,))`` summed to half the dense value) or crashed (``.to()``);
they now refuse in words. ``ChunkedInducingPointKernel``'s lazy training root forms ``U`` for them, as GPyTorch's
``InducingPointKernel`` gives."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from linear_operator.operators import BatchRepeatLinearOperator, DenseLinearOperator

from bma_gp import BlockMeanSumLinearOperator, ChunkedInducingPointKernel, GroupKernel, Partition

DTYPE = torch.float64


def _sum(noise: bool):
    torch.manual_seed(0)
    P = Partition.from_labels(torch.tensor([2, 0, 1, 0, 2, 3, 0]))
    W = torch.randn(4, 4, dtype=DTYPE)
    d = torch.rand(7, dtype=DTYPE) + 0.5 if noise else torch.zeros(7, dtype=DTYPE)
    return BlockMeanSumLinearOperator(d, W @ W.T, partitions=[P])


@pytest.mark.parametrize(
    ("noise", "which"),
    [(True, "root"), (True, "root_inv"), (False, "root")],  # a sum without noise is singular: no inverse root
    ids=["woodbury", "woodbury_inverse", "zl"],
)
def test_sum_roots_refuse_batch_and_dtype_changes(noise, which):
    S = _sum(noise)
    product = S.root_decomposition() if which == "root" else S.root_inv_decomposition()
    for op in (product, product.root):
        with pytest.raises(ValueError, match="keeps its batch shape, dtype and device"):
            op.unsqueeze(0)
        with pytest.raises(ValueError, match="keeps its batch shape, dtype and device"):
            op.repeat(2, 1, 1)
        with pytest.raises(ValueError, match="keeps its batch shape, dtype and device"):
            BatchRepeatLinearOperator(op, torch.Size([2]))
        with pytest.raises(ValueError, match=r"\.to\(torch.float32"):
            op.to(torch.float32)
        torch.testing.assert_close(op.to(DTYPE).to_dense(), op.to_dense())  # nothing changes
    # the way the message gives: change the operator, then take its root
    R = S.unsqueeze(0).repeat(2, 1, 1).root_decomposition().root.to_dense()
    torch.testing.assert_close(R @ R.mT, S.to_dense().expand(2, 7, 7))


def test_a_batch_repeat_of_the_sum_itself_still_roots():
    S = _sum(True)
    rep = BatchRepeatLinearOperator(S, torch.Size([2]))
    with gpytorch.settings.max_cholesky_size(0):
        R = rep.root_decomposition().root.to_dense()
        draws = gpytorch.distributions.MultivariateNormal(torch.zeros(2, 7, dtype=DTYPE), rep).rsample(torch.Size([3]))
    torch.testing.assert_close(R @ R.mT, S.to_dense().expand(2, 7, 7))
    assert draws.shape == (3, 2, 7)


def test_posterior_roots_refuse_batch_and_dtype_changes():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(30, 1, generator=g, dtype=DTYPE), torch.randint(0, 4, (30, 1), generator=g)], -1)
    y = torch.sin(6 * x[:, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = ChunkedInducingPointKernel(
                gpytorch.kernels.RBFKernel(), x[:5, :1].clone(), likelihood, active_dims=[0]
            ) + GroupKernel(5, active_dims=[1])

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().to(DTYPE).eval()
    with torch.no_grad(), gpytorch.settings.debug(False):
        covar = model(x).lazy_covariance_matrix
        assert type(covar).__name__ == "TrainingPosteriorLinearOperator"
        root = covar.root_decomposition().root
        with pytest.raises(ValueError, match="keeps its batch shape"):
            root.unsqueeze(0)
        with pytest.raises(ValueError, match=r"\.to\(torch.float32"):
            root.to(torch.float32)


def test_lazy_training_root_unsqueezes_and_repeats_like_gpytorchs():
    torch.manual_seed(0)
    x = torch.randn(20, 1, dtype=DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    results = []
    for cls in (gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel):
        kernel = cls(gpytorch.kernels.RBFKernel(), x[:4].clone(), likelihood).to(DTYPE)
        kernel.train()
        K = kernel(x).evaluate_kernel()
        assert K.unsqueeze(0).shape == (1, 20, 20)
        assert K.repeat(3, 1, 1).shape == (3, 20, 20)
        results.append((K.repeat(3, 1, 1).to_dense(), K.unsqueeze(0).expand(2, 20, 20).sum(0).to_dense(), K.to_dense()))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(results[1][1], 2 * results[1][2])
    assert isinstance(DenseLinearOperator(results[1][2]).unsqueeze(0), DenseLinearOperator)
