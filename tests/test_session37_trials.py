"""Session 37 user trials: an empty test set of a crossed model predicts without a fallback warning; ``active_dims``
beyond the inputs' columns are refused by name; a param group repeating ``eps`` as a tensor of the optimizer's value
is accepted (and one of another value is refused with its exact number); ``maximize`` edited in place to
``numpy.True_`` is saved as a Python bool. Each test failed on the code before."""

from __future__ import annotations

import io
import warnings

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import ClosedFormFallbackWarning, GroupKernel
from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from gp_reference import GP


@pytest.mark.parametrize("batch", [(), (2,)])
def test_an_empty_test_set_of_crossed_groupings_predicts_without_a_warning(batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 10, (100,), generator=gen), torch.randint(0, 5, (100,), generator=gen)], -1)
    x = x.double().expand(*batch, 100, 2)
    y = torch.randn(*batch, 100, generator=gen, dtype=torch.float64)
    kernel = GroupKernel(10, active_dims=[0], batch_shape=torch.Size(batch)) + GroupKernel(
        5, active_dims=[1], batch_shape=torch.Size(batch)
    )
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size(batch))
    model = GP(x, y, likelihood, kernel, batch_shape=batch).double().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        empty = model(x[..., :0, :])
        mean, variance = empty.mean, empty.variance
        full = model(x[..., :3, :]).variance  # the closed form still serves a non-empty set afterwards
    assert mean.shape == variance.shape == (*batch, 0)
    assert full.shape == (*batch, 3) and bool((full > 0).all())


def test_active_dims_beyond_the_columns_are_refused_by_name():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"GroupKernel\(active_dims=\[3\]\): x1 has 2 columns .* \[3\]"):
        GroupKernel(3, active_dims=[3])(x).to_dense()
    total = GroupKernel(3, active_dims=[1]) + GroupKernel(3, active_dims=[5])
    with pytest.raises(ValueError, match=r"active_dims \[5\] select columns it does not have"):
        total(x).to_dense()
    assert GroupKernel(3, active_dims=[1])(x).to_dense().shape == (4, 4)  # columns that exist: unchanged


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
def test_a_group_repeating_eps_as_a_tensor_of_the_same_value_is_accepted(cls):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    eps = cls([p]).eps
    opt = cls([{"params": [p], "eps": torch.tensor(eps, dtype=torch.float64)}])
    p.grad = torch.ones_like(p)
    opt.step()  # the per-step check of the groups accepts it too
    assert opt.eps == eps
    other = torch.tensor(eps, dtype=torch.float32)  # prints as the same number, is another
    with pytest.raises(ValueError, match=rf"the number {float(other)!r}"):
        cls([{"params": [p], "eps": other}])


@pytest.mark.parametrize("cls", [BlockMeanAdagrad, FullMatrixAdagrad])
@pytest.mark.parametrize("save_before_step", [False, True])
def test_maximize_set_in_place_to_numpy_bool_saves_a_python_bool(cls, save_before_step):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = cls([p], lr=0.1)
    opt.param_groups[0]["maximize"] = np.True_
    if not save_before_step:
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        assert bool((p.detach() > before).all())  # maximised
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["maximize"] is True


def _crossed_model(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, 8, (60,), generator=gen), torch.randint(0, 4, (60,), generator=gen)], -1).double()
    y = torch.randn(60, generator=gen, dtype=torch.float64)
    kernel = GroupKernel(8, active_dims=[0]) + GroupKernel(4, active_dims=[1])
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    test_x = torch.stack([torch.randint(0, 8, (5,), generator=gen), torch.randint(0, 4, (5,), generator=gen)], -1)
    test_y = torch.randn(5, generator=gen, dtype=torch.float64)
    return model.eval(), test_x.double(), test_y


def _predictive_gradients(model, test_x, test_y):
    with gpytorch.settings.detach_test_caches(False):
        loss = -model.likelihood(model(test_x)).log_prob(test_y)
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def test_gradients_after_a_prediction_without_autograd_keep_the_solve_live():
    """A prediction under ``torch.no_grad()`` (a validation metric) built the strategy without a graph; the gradients of
    a predictive loss under ``detach_test_caches(False)`` then held the solve fixed (17.03 against -0.28). The strategy
    is rebuilt with autograd on: the gradients equal those of a model that never predicted without it."""
    fresh, test_x, test_y = _crossed_model()
    expected = _predictive_gradients(fresh, test_x, test_y)
    model, _, _ = _crossed_model()
    with torch.no_grad():
        model(test_x).mean  # noqa: B018  (builds the strategy without autograd)
    got = _predictive_gradients(model, test_x, test_y)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)
    # with the default detach_test_caches the strategy built without autograd is kept (nothing of it is differentiated)
    model, _, _ = _crossed_model()
    with torch.no_grad():
        model(test_x)
    kept = model.prediction_strategy
    model(test_x).mean.sum().backward()
    assert model.prediction_strategy is kept


def test_a_fallback_sqrt_inv_matmul_names_the_quadrature_it_runs():
    """The warning of ``sqrt_inv_matmul`` without a closed form named the dense Cholesky and CG and Lanczos, and called
    an elementwise product "this sum"; linear_operator runs its contour-integral quadrature (MINRES) at every size."""
    from bma_gp import BlockMeanLinearOperator, Partition

    n = 12
    M = BlockMeanLinearOperator(
        torch.rand(3, dtype=torch.float64) + 0.5,
        torch.eye(3, dtype=torch.float64),
        Partition.from_labels(torch.arange(n) % 3),
    )
    with pytest.warns(ClosedFormFallbackWarning):
        product = M * (2 * torch.ones(n, n, dtype=torch.float64))
    with pytest.warns(ClosedFormFallbackWarning) as record:
        product.sqrt_inv_matmul(torch.ones(n, 1, dtype=torch.float64))
    message = str(record[0].message)
    assert "contour-integral quadrature (CG and MINRES" in message and "this sum" not in message
    assert "formed by an operation without a closed form" in message
    with pytest.warns(ClosedFormFallbackWarning, match="dense Cholesky up to max_cholesky_size"):
        product.solve(torch.ones(n, 1, dtype=torch.float64))


@pytest.mark.parametrize("other", [5, 40])  # 40: R^2 > q, the structured stable forms all the same
@pytest.mark.parametrize("noise", [1e-6, 1e-8])
def test_variances_past_the_formed_weights_threshold_keep_their_accuracy(noise, other):
    """Crossed intercepts whose eliminated grouping has more levels than ``_DENSE_WEIGHT_MAX_ELIMINATED``: the
    variances at seen levels came from ``K_** - F W F^T``, which cancels at the size of ``n / noise`` (22 % off at
    noise 1e-8, 1766 x 5 levels); the weight there is ``G - Sigma`` now, as below the threshold."""
    from bma_gp.kernels import sum_prediction_strategy as sps

    levels = sps._DENSE_WEIGHT_MAX_ELIMINATED + 100
    n = 2 * levels + 200
    gen = torch.Generator().manual_seed(3)
    first = torch.cat([torch.arange(levels), torch.randint(0, levels, (n - levels,), generator=gen)])
    second = torch.randint(0, other, (n,), generator=gen)
    x = torch.stack([first, second], -1).double()
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    kernel = GroupKernel(levels, active_dims=[0]) + GroupKernel(other, active_dims=[1])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(1e-12))
    model = GP(x, y, likelihood, kernel).double()
    with torch.no_grad():
        kernel.kernels[0].var, kernel.kernels[1].var = 0.8, 0.4
        likelihood.noise = noise
    model.eval()
    test_x = x[torch.randint(0, n, (40,), generator=gen)]
    with torch.no_grad():
        variance = model(test_x).variance
    same = [(a[:, None] == b[None, :]).double() for a, b in ((test_x[:, 0], x[:, 0]), (test_x[:, 1], x[:, 1]))]
    K = 0.8 * (x[:, :1] == x[:, 0]).double() + 0.4 * (x[:, 1:] == x[:, 1]).double() + noise * torch.eye(n).double()
    cross = 0.8 * same[0] + 0.4 * same[1]
    expected = 1.2 - (cross * torch.cholesky_solve(cross.mT, torch.linalg.cholesky(K)).mT).sum(-1)
    assert bool(((variance - expected).abs() / expected).max() < 1e-3)


@pytest.mark.parametrize("diagonal", [False, True])
def test_a_non_finite_lam_says_what_it_is_in_a_gp(diagonal):
    """``lam[0] = nan`` named the operator's own argument only; in a GP it is the likelihood's noise, and a NaN there
    is a diverged training run (a user trial: an L-BFGS line search on uncentred targets)."""
    from bma_gp import BlockMeanLinearOperator, Partition

    lam = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    B = torch.ones(2, dtype=torch.float64) if diagonal else torch.eye(2, dtype=torch.float64)
    op = BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.tensor([0, 0, 1, 1])), diagonal=diagonal)
    with pytest.raises(ValueError, match=r"lam\[0\] = nan.*likelihood's noise.*centre and scale the targets"):
        op.solve(torch.ones(4, 1, dtype=torch.float64))


def test_sqrt_inv_matmul_of_a_lazily_evaluated_multitask_prior_is_closed_form():
    """``model(x).lazy_covariance_matrix`` of a ``MultitaskKernel(BlockMeanKernel)`` is a lazily evaluated kernel
    tensor, whose ``sqrt_inv_matmul`` ran linear_operator's quadrature without a word (0.55 off with one CG
    iteration); it is the evaluated operator's closed form."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor
    from linear_operator import settings as lo_settings

    from bma_gp import BlockMeanKernel, Partition
    from closed_form_guard import closed_forms_only

    gen = torch.Generator().manual_seed(4)
    n = 30
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    base = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, Partition.from_labels(torch.arange(n) % 5))
    kernel = gpytorch.kernels.MultitaskKernel(base, num_tasks=2, rank=1).double()
    with torch.no_grad():
        kernel.task_covar_module.covar_factor.fill_(0.5)
    covar = kernel(x)
    assert isinstance(covar, LazyEvaluatedKernelTensor)
    dense = covar.to_dense().detach()
    e, V = torch.linalg.eigh(dense)
    rhs = torch.randn(2 * n, 2, generator=gen, dtype=torch.float64)
    with lo_settings.max_cg_iterations(1), closed_forms_only(n), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        got = covar.sqrt_inv_matmul(rhs)
    expected = (V * e.rsqrt().unsqueeze(-2)) @ V.mT @ rhs
    assert bool(((got - expected).abs().max() / expected.abs().max()) < 1e-9)
