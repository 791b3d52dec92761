"""GPyTorch models and lifecycles around the block mean kernels, against the same model evaluated densely.

The reference wraps the model's kernel in :class:`DenseKernel`, which evaluates it and hands GPyTorch a plain
tensor, so the model is conditioned by GPyTorch's dense path (Cholesky, ``max_cholesky_size`` raised past ``n``).
"""

from __future__ import annotations

import copy
import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, GroupKernel, Partition
from gp_reference import GP, dense_copy, dense_prediction

DTYPE = torch.float64


def assert_predicts_as_dense(model: GP, xt: torch.Tensor) -> None:
    """The model's prediction at ``xt`` equals the dense reference's (float64, 1e-9)."""
    with torch.no_grad():
        pred = model(xt)
        mean, variance = pred.mean, pred.variance
    ref_mean, ref_variance = dense_prediction(dense_copy(model), xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(variance, ref_variance, rtol=1e-9, atol=1e-9)


def block_mean_data(n=60, k=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=DTYPE)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)
    return x, y, Partition.from_labels(torch.arange(n) % k)


def block_mean_model(x, y, partition) -> GP:
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    return GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), BlockMeanKernel(base, x, partition)).to(DTYPE)


# ---------------------------------------------------------------------------- stale prediction caches
def test_set_partition_in_eval_mode_refuses_the_stale_prediction_cache():
    """An ExactGP in eval mode caches its prediction strategy; a new partition set on the kernel afterwards used to
    be combined with solves against the old training covariance (wrong means, negative variances, no error)."""
    x, y, partition = block_mean_data()
    new_partition = Partition.from_labels(torch.arange(60) // 10)
    xt = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    model = block_mean_model(x, y, partition)
    model.eval()
    with torch.no_grad():
        model(xt)  # caches the prediction strategy
    model.covar_module.set_partition(new_partition)
    with torch.no_grad(), pytest.raises(ValueError, match=r"set_partition.*model\.set_train_data"):
        model(xt)
    model.set_train_data(x, y, strict=False)  # what the message says: drops the cache
    assert_predicts_as_dense(model, xt)


def test_kernel_set_train_data_in_eval_mode_refuses_the_stale_prediction_cache():
    x, y, partition = block_mean_data()
    x2, y2, partition2 = block_mean_data(n=40, k=4, seed=5)
    xt = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    model = block_mean_model(x, y, partition)
    model.eval()
    with torch.no_grad():
        model(xt)
    model.covar_module.set_train_data(x2, partition2)  # the model's own data not yet updated
    with torch.no_grad(), pytest.raises(ValueError, match="set_train_data"):
        model(xt)
    model.set_train_data(x2, y2, strict=False)
    with torch.no_grad():
        mean = model(xt).mean
    ref_mean, _ = dense_prediction(dense_copy(model), xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)


def test_stale_prediction_cache_is_refused_in_sums_too():
    """The sums' strategy (an AdditiveKernel holding a BlockMeanKernel) records the kernel's data as well."""
    x, y, partition = block_mean_data()
    ids = (torch.arange(60) % 5).to(DTYPE).unsqueeze(-1)
    inputs = torch.cat([x, ids], -1)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0, 1]))
    kernel = BlockMeanKernel(base, inputs, partition) + GroupKernel(5, active_dims=[2])
    model = GP(inputs, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    xt = torch.cat([torch.randn(4, 2, dtype=DTYPE), torch.tensor([[0.0], [1.0], [4.0], [2.0]], dtype=DTYPE)], -1)
    model.eval()
    with torch.no_grad():
        model(xt)
    model.covar_module.kernels[0].set_partition(Partition.from_labels(torch.arange(60) // 10))
    with torch.no_grad(), pytest.raises(ValueError, match="set_partition"):
        model(xt)
    model.train()
    model.eval()
    assert_predicts_as_dense(model, xt)


# ---------------------------------------------------------------------------- batched test inputs
@pytest.mark.parametrize("slope", [False, True])
def test_group_kernel_batched_test_inputs_predict_without_a_spurious_warning(slope):
    """``(b, q, d)`` test inputs (batched acquisition functions) on an unbatched model: the test-by-test block is a
    small dense matrix that the prediction never solves with. It used to warn that solves leave the closed forms."""
    generator = torch.Generator().manual_seed(0)
    ids = (torch.arange(40) % 5).to(DTYPE).unsqueeze(-1)
    y = torch.randn(40, generator=generator, dtype=DTYPE) + ids[:, 0]
    if slope:
        inputs = torch.cat([ids, torch.randn(40, 1, generator=generator, dtype=DTYPE)], -1)
        xt = torch.tensor([[[0.0, 0.5], [5.0, 1.0], [2.0, -1.0]], [[1.0, 0.0], [3.0, 2.0], [2.0, 0.3]]], dtype=DTYPE)
    else:
        inputs = ids
        xt = torch.tensor([[[0.0], [5.0], [2.0]], [[1.0], [3.0], [2.0]]], dtype=DTYPE)
    kernel = GroupKernel(6, slope=slope)
    model = GP(inputs, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).to(DTYPE)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        pred = model.likelihood(model(xt))
        mean, variance = pred.mean, pred.variance
    ref_mean, ref_variance = dense_prediction(dense_copy(model), xt)
    assert mean.shape == (2, 3)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(variance - model.likelihood.noise, ref_variance, rtol=1e-9, atol=1e-9)
    with pytest.warns(ClosedFormFallbackWarning, match="differ across the batch"):  # in training it still warns
        kernel.train()
        kernel(xt).to_dense()


# ---------------------------------------------------------------------------- copies of SGPR-plus-groups models
def test_deepcopy_of_a_chunked_sgpr_model_keeps_its_mode_and_its_own_likelihood():
    """GPyTorch's InducingPointKernel.__deepcopy__ builds a fresh kernel: in training mode (so a copied model in eval
    mode raised "x1 should equal x2 in training mode") and holding the original's likelihood (so the copy's SGPR trace
    term read, and trained, the original's noise). ChunkedInducingPointKernel's copy keeps both right."""
    from bma_gp.kernels import ChunkedInducingPointKernel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, generator=generator, dtype=DTYPE)
    ids = (torch.arange(80) % 4).to(DTYPE).unsqueeze(-1)
    inputs = torch.cat([x, ids], -1)
    y = torch.sin(2 * x[:, 0]) + ids[:, 0] * 0.3 + 0.1 * torch.randn(80, generator=generator, dtype=DTYPE)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    smooth = ChunkedInducingPointKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()),
        torch.linspace(-2, 2, 6, dtype=DTYPE).unsqueeze(-1),
        likelihood,
        active_dims=[0],
    )
    model = GP(inputs, y, likelihood, smooth + GroupKernel(4, active_dims=[1])).to(DTYPE)
    xt = torch.tensor([[0.1, 0.0], [-1.0, 3.0], [0.5, 2.0]], dtype=DTYPE)
    model.eval()
    with torch.no_grad():
        mean = model(xt).mean

    copied = copy.deepcopy(model)
    assert not any(module.training for module in copied.modules())
    with torch.no_grad():
        torch.testing.assert_close(copied(xt).mean, mean, rtol=1e-12, atol=1e-12)
    copied_smooth = copied.covar_module.kernels[0]
    assert copied_smooth.likelihood is copied.likelihood and copied.likelihood is not likelihood

    # training the copy moves the copy's noise, never the original's
    copied.train()
    copied.likelihood.noise = 0.3
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(copied.likelihood, copied)
    (-mll(copied(inputs), y)).backward()
    assert copied.likelihood.raw_noise.grad is not None
    assert likelihood.raw_noise.grad is None
    reference = copy.deepcopy(copied)  # the same model built by hand: a fresh kernel on the copied likelihood
    reference.covar_module.kernels[0] = ChunkedInducingPointKernel(
        copy.deepcopy(copied_smooth.base_kernel),
        copied_smooth.inducing_points.detach().clone(),
        reference.likelihood,
        active_dims=[0],
    ).to(DTYPE)
    reference_mll = gpytorch.mlls.ExactMarginalLogLikelihood(reference.likelihood, reference)
    torch.testing.assert_close(mll(copied(inputs), y), reference_mll(reference(inputs), y), rtol=1e-12, atol=1e-12)


def test_deepcopy_of_an_eval_mode_chunked_sgpr_model_forms_its_own_inducing_root():
    """A copy of a model that predicted in eval mode held the original's cached K_ZZ and inverse root; the copy has no
    prediction strategy whose hyperparameter check would clear them, so that a lengthscale set on the copy in eval
    mode predicted with the original's K_ZZ (6e-2 off a model built afresh)."""
    from bma_gp.kernels import ChunkedInducingPointKernel

    generator = torch.Generator().manual_seed(1)
    x = torch.rand(120, 1, generator=generator, dtype=DTYPE)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(120, generator=generator, dtype=DTYPE)
    xt = torch.rand(10, 1, generator=generator, dtype=DTYPE)

    def build() -> GP:
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        return GP(x, y, likelihood, ChunkedInducingPointKernel(base, x[:12].clone(), likelihood)).to(DTYPE)

    def mean(model: GP) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(xt).mean

    model = build()
    mean(model)  # caches K_ZZ and its inverse root on the kernel
    copied = copy.deepcopy(model)
    assert not hasattr(copied.covar_module, "_cached_kernel_inv_root")
    copied.initialize(**{"covar_module.base_kernel.base_kernel.lengthscale": 0.05})
    fresh = build()
    fresh.load_state_dict(copied.state_dict())
    torch.testing.assert_close(mean(copied), mean(fresh), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean(model), mean(build()), rtol=1e-10, atol=1e-10)  # the original unchanged


# ---------------------------------------------------------------------------- fantasy models
def test_group_kernel_fantasy_model_is_the_model_given_all_points():
    """get_fantasy_model of a GroupKernel model raised NotImplementedError (whose message once sent the user to "the
    kernel's set_train_data", which GroupKernel does not have); it is now the model given all the points."""
    ids = (torch.arange(30) % 5).to(DTYPE).unsqueeze(-1)
    y = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    model = GP(ids, y, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(6)).to(DTYPE)
    model.eval()
    xt = torch.tensor([[0.0], [5.0], [2.0]], dtype=DTYPE)
    with torch.no_grad():
        model(xt)
    new_ids, new_y = torch.tensor([[5.0], [2.0]], dtype=DTYPE), torch.tensor([1.0, -1.0], dtype=DTYPE)
    with torch.no_grad():
        fantasy_mean = model.get_fantasy_model(new_ids, new_y)(xt).mean
    model.set_train_data(torch.cat([ids, new_ids]), torch.cat([y, new_y]), strict=False)
    with torch.no_grad():
        mean = model(xt).mean
    ref_mean, _ = dense_prediction(dense_copy(model), xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fantasy_mean, ref_mean, rtol=1e-9, atol=1e-9)
