"""GroupGaussianLikelihood's training-data state as a GPyTorch user changes the data: the stored training groups
after ``model.set_train_data``, the ``observed`` flags of a batched likelihood, fantasy models, state dicts and
moves between dtypes."""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import GroupGaussianLikelihood, GroupKernel

DTYPE = torch.float64
K = 4
NOISE = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DTYPE)


def grouped(n, seed, levels=K):
    """Columns: a covariate, the group id."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DTYPE)
    a = torch.randint(0, levels, (n,), generator=g)
    return torch.stack([t, a.to(DTYPE)], -1), torch.randn(n, generator=g, dtype=DTYPE)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel=None):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = GroupKernel(K, active_dims=[1]) if kernel is None else kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def dense_mll(model, x, y):
    with torch.no_grad():
        covar = model.covar_module(x).to_dense() + torch.diag(model.likelihood.noise[x[:, 1].long()])
        return torch.distributions.MultivariateNormal(model.mean_module(x), covar).log_prob(y) / y.shape[0]


def normal(n, batch=()):
    return gpytorch.distributions.MultivariateNormal(
        torch.zeros(*batch, n, dtype=DTYPE), torch.eye(n, dtype=DTYPE).expand(*batch, n, n)
    )


# ---------------------------------------------------------------------------- set_train_data
def test_new_training_data_without_the_likelihoods_groups_raises():
    x, y = grouped(40, 0)
    likelihood = GroupGaussianLikelihood(K, group_dim=1, train_inputs=x)
    model = GP(x, y, likelihood).to(DTYPE)
    likelihood.noise = NOISE
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with torch.no_grad():
        assert mll(model(x), y).item() == pytest.approx(dense_mll(model, x, y).item(), rel=1e-10)
        # new data of the same size: the stored groups of the old data gave a wrong marginal likelihood, silently
        x2, y2 = grouped(40, 1)
        model.set_train_data(x2, y2, strict=False)
        with pytest.raises(ValueError, match=r"likelihood\.set_train_inputs\(x\)"):
            mll(model(x2), y2)
        # the inputs passed with the call need no stored groups
        assert mll(model(x2), y2, x2).item() == pytest.approx(dense_mll(model, x2, y2).item(), rel=1e-10)
        likelihood.set_train_inputs(x2)
        assert mll(model(x2), y2).item() == pytest.approx(dense_mll(model, x2, y2).item(), rel=1e-10)
        # of another size: the same message (it named only set_train_inputs, not model.set_train_data)
        x3, y3 = grouped(30, 2)
        model.set_train_data(x3, y3, strict=False)
        with pytest.raises(ValueError, match=r"model\.set_train_data"):
            mll(model(x3), y3)


def test_stored_ids_of_another_layout_are_not_compared_with_the_models_inputs():
    # 1-D ids given to the likelihood, a model on the covariate alone: nothing to compare, the stored ids are used
    x, y = grouped(30, 3)
    ids = x[:, 1].long()
    likelihood = GroupGaussianLikelihood(K, train_inputs=ids)
    model = GP(x[:, :1], y, likelihood, gpytorch.kernels.RBFKernel()).to(DTYPE)
    likelihood.noise = NOISE
    model.train()
    with torch.no_grad():
        variance = likelihood(model(x[:, :1])).variance
    torch.testing.assert_close(variance - model.covar_module(x[:, :1]).diagonal(), NOISE[ids])
    # inputs of as many columns whose group column holds no ids (two covariates): not compared either
    covariates = torch.stack([x[:, 0], x[:, 0] ** 2 + 0.5], -1)
    likelihood = GroupGaussianLikelihood(K, group_dim=1, train_inputs=x)
    model = GP(covariates, y, likelihood, gpytorch.kernels.RBFKernel()).to(DTYPE)
    likelihood.noise = NOISE
    model.train()
    with torch.no_grad():
        variance = likelihood(model(covariates)).variance
    torch.testing.assert_close(variance - model.covar_module(covariates).diagonal(), NOISE[ids])


# ---------------------------------------------------------------------------- observed levels of a batched likelihood
def batched_likelihood(unseen="mean"):
    likelihood = GroupGaussianLikelihood(3, group_dim=0, batch_shape=torch.Size([2]), unseen=unseen).to(DTYPE)
    likelihood.noise = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], dtype=DTYPE)
    return likelihood


def test_each_batch_entry_records_its_own_levels():
    likelihood = batched_likelihood()
    trained = torch.tensor([[[0.0], [0.0]], [[1.0], [1.0]]], dtype=DTYPE)  # entry 0 saw level 0, entry 1 level 1
    likelihood(normal(2, (2,)), trained)
    # one flag vector for both entries marked level 1 as trained for entry 0 (and level 0 for entry 1)
    assert likelihood.observed.tolist() == [[True, False, False], [False, True, False]]
    likelihood.eval()
    with torch.no_grad():
        variance = likelihood(normal(3), torch.tensor([[0.0], [1.0], [2.0]], dtype=DTYPE)).variance
    # each entry: its own trained level's noise, and for the others the mean over its own trained levels
    torch.testing.assert_close(variance - 1.0, torch.tensor([[0.1, 0.1, 0.1], [2.0, 2.0, 2.0]], dtype=DTYPE))
    # ids of shape (n,) count for every entry
    likelihood.set_train_inputs(torch.tensor([[2.0]], dtype=DTYPE))
    assert likelihood.observed.tolist() == [[True, False, True], [False, True, True]]


def test_unseen_error_names_the_batch_entry():
    likelihood = batched_likelihood("error")
    likelihood.set_train_inputs(torch.tensor([[[0.0], [1.0]], [[1.0], [2.0]]], dtype=DTYPE))
    likelihood.eval()
    ids = torch.tensor([[1.0], [2.0]], dtype=DTYPE)
    with pytest.raises(ValueError, match=r"group 2 was not in the training data of batch entry \(0,\)"):
        likelihood(normal(2), ids)
    with torch.no_grad():  # each entry's own levels pass
        variance = likelihood(normal(2, (2,)), torch.tensor([[[1.0], [0.0]], [[2.0], [1.0]]], dtype=DTYPE)).variance
    torch.testing.assert_close(variance - 1.0, torch.tensor([[0.2, 0.1], [3.0, 2.0]], dtype=DTYPE))


def test_batched_train_inputs_of_another_batch_shape_change_nothing():
    likelihood = batched_likelihood()
    with pytest.raises(ValueError, match="train_inputs has batch shape"):
        likelihood.set_train_inputs(torch.zeros(3, 2, 1, dtype=DTYPE))
    assert likelihood.noise_covar.train_groups is None and not bool(likelihood.observed.any())


def test_state_dict_with_one_flag_vector_loads_into_a_batched_likelihood():
    state = batched_likelihood().state_dict()
    state["noise_covar.observed"] = torch.tensor([True, False, True])  # the former layout
    likelihood = batched_likelihood()
    likelihood.load_state_dict(state)
    assert likelihood.observed.tolist() == [[True, False, True]] * 2
    again = batched_likelihood()
    again.load_state_dict(likelihood.state_dict())
    assert torch.equal(again.observed, likelihood.observed)


# ---------------------------------------------------------------------------- fantasy models
def test_fantasy_points_of_an_unseen_level_predict_as_the_model_given_all_points():
    x, y = grouped(30, 4, levels=K - 1)  # level K - 1 is not in the training data
    likelihood = GroupGaussianLikelihood(K, group_dim=1, train_inputs=x)
    model = GP(x, y, likelihood, gpytorch.kernels.RBFKernel(active_dims=[0])).to(DTYPE)
    likelihood.noise = NOISE
    model.eval()
    xt = torch.tensor([[0.3, K - 1.0], [0.6, 0.0]], dtype=DTYPE)
    xf, yf = torch.tensor([[0.2, K - 1.0], [0.4, K - 1.0]], dtype=DTYPE), torch.tensor([1.0, 1.2], dtype=DTYPE)
    with torch.no_grad():
        model(xt)
        fantasy = model.get_fantasy_model(xf, yf)
        pred = fantasy.likelihood(fantasy(xt), xt)
        # conditioning records nothing, in the fantasy or the original: the level keeps the unseen policy
        assert fantasy.likelihood.observed.tolist() == likelihood.observed.tolist() == [True] * (K - 1) + [False]
        model.set_train_data(torch.cat([x, xf]), torch.cat([y, yf]), strict=False)
        full = model.likelihood(model(xt), xt)
    torch.testing.assert_close(pred.mean, full.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.variance, full.variance, rtol=1e-10, atol=1e-12)
    # a known noise marked by hand is used as it is
    likelihood.observed[..., K - 1] = True
    with torch.no_grad():
        marked = likelihood(normal(2), xt).variance - 1.0
    torch.testing.assert_close(marked, NOISE[[K - 1, 0]])


def test_unseen_error_says_how_to_mark_a_level():
    x, _ = grouped(20, 5, levels=K - 1)
    likelihood = GroupGaussianLikelihood(K, group_dim=1, train_inputs=x, unseen="error").to(DTYPE)
    likelihood.eval()
    with pytest.raises(ValueError, match=rf"likelihood\.observed\[\.\.\., {K - 1}\] = True"):
        likelihood(normal(1), torch.tensor([[0.0, K - 1.0]], dtype=DTYPE))
