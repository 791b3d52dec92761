"""The root of a sum's posterior covariance at the training inputs allows the rounding that the solves with the
noisy training covariance put into it (their condition times eps): a positive semidefinite posterior of a
low-rank prior was refused as "not positive definite" at noise 1e-3 and below, in float64."""

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, GroupKernel, Partition
from bma_gp.block_mean_sum_linear_operator import gram_root_core
from gp_reference import GP


@pytest.mark.parametrize("noise", [1e-3, 1e-5, 1e-7])
def test_training_posterior_root_of_a_low_rank_prior(noise):
    gen = torch.Generator().manual_seed(0)
    n = 100
    x = torch.stack(
        [torch.rand(n, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen).double()], -1
    )
    y = torch.sin(6 * x[:, 0])
    covar = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), x, Partition.from_labels(torch.arange(n) // 2))
    covar = covar + GroupKernel(6, active_dims=[1])  # rank at most 50 + 4 < n: the posterior is singular
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-9))
    likelihood.noise = noise
    model = GP(x, y, likelihood, covar).double().eval()
    with torch.no_grad(), pytest.warns(gpytorch.utils.warnings.GPInputWarning):
        S = model(x).lazy_covariance_matrix
    with torch.no_grad():
        assert type(S).__name__ == "TrainingPosteriorLinearOperator"
        dense = S.to_dense()
        R = S.root_decomposition().root.to_dense()
    scale = dense.diagonal().abs().max()
    # the posterior variances are about the noise: rounding of the prior (about 1) is a larger fraction of them
    assert float((R @ R.mT - dense).abs().max() / scale) < 1e-6


def test_the_band_clamps_rounding_and_still_refuses_a_negative_direction():
    q = 4
    A = torch.eye(q, dtype=torch.float64)
    for shift, band, ok in [(1e-6, 0.0, False), (1e-6, 1e-5, True), (1e-3, 1e-5, False)]:
        G = torch.diag(torch.tensor([-1.0 - shift, 0.5, 0.0, 2.0], dtype=torch.float64))  # I + G: -shift, 1.5, 1, 3
        if ok:
            X = gram_root_core(A, G, "root", "this test's matrix", band=band)
            root = torch.eye(q, dtype=torch.float64) + X
            torch.testing.assert_close(root @ root, torch.diag(torch.tensor([0.0, 1.5, 1.0, 3.0], dtype=torch.float64)))
        else:
            with pytest.raises(ValueError, match="this test's matrix is not positive definite"):
                gram_root_core(A, G, "root", "this test's matrix", band=band)
