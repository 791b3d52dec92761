"""The life cycle of GPyTorch models on this package's kernels and likelihoods: hyperparameters changed between
predictions, and settings, against a dense reference conditioned by hand from the same hyperparameters."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupGaussianLikelihood, GroupKernel, Partition
from gp_reference import GP

N = 48


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(N, generator=gen, dtype=torch.float64)
    g = torch.arange(N) % 6
    train_x = torch.stack([x, g.double(), (torch.arange(N) % 4).double()], -1)
    y = torch.sin(x) + 0.3 * g + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    test_x = torch.tensor([[0.5, 0, 0], [1.5, 3, 1], [2.5, 5, 2], [3.5, 6, 3]], dtype=torch.float64)  # 6: unseen
    return train_x, y, test_x


def _model(kind: str, train_x, y, likelihood=None) -> GP:
    likelihood = gpytorch.likelihoods.GaussianLikelihood() if likelihood is None else likelihood
    if kind == "block_mean":
        partition = Partition.from_labels((2 * train_x[:, 0]).long())
        kernel = gpytorch.kernels.ScaleKernel(
            BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[0]), train_x, partition)
        )
    elif kind == "group":
        kernel = GroupKernel(8, active_dims=[1])
    elif kind == "slope":
        kernel = GroupKernel(8, slope=True, active_dims=[1, 0])
    elif kind == "crossed":
        kernel = GroupKernel(8, active_dims=[1]) + GroupKernel(4, active_dims=[2])
    elif kind == "sgpr+group":
        inducing = torch.linspace(0, 4, 6, dtype=torch.float64).unsqueeze(-1)
        smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        kernel = GroupKernel(8, active_dims=[1]) + ChunkedInducingPointKernel(
            smooth, inducing, likelihood, active_dims=[0]
        )
    else:
        raise AssertionError(kind)
    return GP(train_x, y, likelihood, kernel).double()


def _predict(model: GP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pred = model(x)
        return pred.mean, pred.variance


def _dense_reference(model: GP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance at ``x`` from the model's kernel evaluated densely on the training and test inputs with
    the current hyperparameters, conditioned by a Cholesky factorisation here (in eval mode: an inducing-point
    kernel's training-mode covariance is another)."""
    model.eval()
    train_x, y = model.train_inputs[0], model.train_targets
    n = train_x.shape[-2]
    everything = torch.cat([train_x, x])
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a BlockMeanKernel evaluated eagerly says so
        K = model.covar_module(everything)
        K = K if torch.is_tensor(K) else K.to_dense()
        mean = model.mean_module(everything)
        lik = model.likelihood
        if isinstance(lik, GroupGaussianLikelihood):
            noise = lik.noise[train_x[:, lik.group_dim].long()]
        elif isinstance(lik, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
            noise = lik.noise
        else:
            noise = lik.noise.expand(n)
    L = torch.linalg.cholesky(K[:n, :n] + torch.diag(noise))
    cross = K[n:, :n]
    alpha = torch.cholesky_solve((y - mean[:n]).unsqueeze(-1), L).squeeze(-1)
    covar = K[n:, n:] - cross @ torch.cholesky_solve(cross.mT, L)
    return mean[n:] + cross @ alpha, covar.diagonal()


def _change(model: GP, how: str) -> None:
    """Move every hyperparameter, in eval mode, after a prediction cached the strategy."""
    if how == "assignment":
        model.likelihood.noise = 0.05
        model.mean_module.constant = 0.7
        for module in model.modules():
            if isinstance(module, GroupKernel):
                module.var = 2.0 * module.var.detach()
            if isinstance(module, gpytorch.kernels.RBFKernel):
                module.lengthscale = 2.0 * module.lengthscale.detach()
    elif how == "initialize":
        model.initialize(**{"likelihood.noise": 0.2, "mean_module.constant": -0.3})
        for module in model.modules():
            if isinstance(module, gpytorch.kernels.ScaleKernel):
                module.initialize(outputscale=3.0)
    elif how == "optimizer step":  # e.g. a loss on eval-mode predictions
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        optimizer.zero_grad()
        x = model.train_inputs[0][:5].clone()
        x[:, 0] += 0.25  # new points in the training groups
        pred = model(x)
        (pred.mean.sum() + pred.variance.sum()).backward()
        optimizer.step()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("kind", ["block_mean", "group", "slope", "crossed", "sgpr+group"])
@pytest.mark.parametrize("how", ["assignment", "initialize", "optimizer step"])
def test_hyperparameters_changed_in_eval_mode_reach_the_next_prediction(kind, how):
    """The block mean strategies cached their solves and factors for the mean and the variances, and nothing dropped
    them when a hyperparameter changed in eval mode: the next prediction gave the old hyperparameters' mean and
    variances (off by up to 1.5 in the mean), with no error. GPyTorch drops its caches in train() and
    load_state_dict only, and computes its variances afresh; the strategy is now rebuilt when a parameter, buffer or
    fixed noise differs from the one it was built with."""
    train_x, y, test_x = _data()
    model = _model(kind, train_x, y)
    model.likelihood.noise = 0.1
    mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)
    _change(model, how)
    mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    assert not torch.allclose(ref_mean, _dense_reference(_model(kind, train_x, y), test_x)[0])  # it did change
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["group", "slope"])
def test_group_noise_changed_in_eval_mode_reaches_the_next_prediction(kind):
    """The same for a GroupGaussianLikelihood's per-group noise set between two predictions."""
    train_x, y, test_x = _data()
    likelihood = GroupGaussianLikelihood(8, group_dim=1, train_inputs=train_x)
    model = _model(kind, train_x, y, likelihood)
    _predict(model, test_x)
    likelihood.noise = torch.linspace(0.05, 0.6, 8, dtype=torch.float64)
    mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)


@pytest.mark.filterwarnings("ignore::bma_gp.ClosedFormFallbackWarning")  # GPyTorch's strategy, as documented
@pytest.mark.parametrize("kind", ["group", "crossed", "sgpr+group"])
def test_hyperparameters_changed_under_eager_kernels_reach_the_next_prediction(kind):
    """Under ``lazily_evaluate_kernels(False)`` the model gets GPyTorch's default strategy, on a training covariance
    evaluated with the old hyperparameters: mean and variances stayed the old ones (variances off by 1.1 for two
    crossed groupings). Its strategy is rebuilt as the package's own are."""
    train_x, y, test_x = _data()
    model = _model(kind, train_x, y)
    model.likelihood.noise = 0.1
    with gpytorch.settings.lazily_evaluate_kernels(False):
        _predict(model, test_x)
        _change(model, "assignment")
        mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["block_mean", "crossed"])
def test_fixed_noise_changed_in_eval_mode_reaches_the_next_prediction(kind):
    """A ``FixedNoiseGaussianLikelihood``'s noise is a plain attribute, neither a parameter nor a buffer: setting it
    between two predictions must rebuild the strategy too."""
    train_x, y, test_x = _data()
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=torch.full((N,), 0.1, dtype=torch.float64))
    model = _model(kind, train_x, y, likelihood)
    _predict(model, test_x)
    likelihood.noise = torch.linspace(0.01, 0.5, N, dtype=torch.float64)
    mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)


@pytest.mark.filterwarnings("ignore:The input matches the stored training data")  # the posterior there, on purpose
@pytest.mark.parametrize("kind", ["block_mean", "slope", "crossed", "sgpr+group"])
def test_skip_posterior_variances_keeps_the_model_dtype(kind):
    """Under ``skip_posterior_variances`` the sums' strategy (and a slope's, whose cross covariance is a sum) handed
    the covariance to GPyTorch, whose ``ZeroLinearOperator`` is float32: a float64 model's predictive variances came
    back float32 (1e-6 after GPyTorch's float32 clamp, not 1e-10); the zero now takes the test covariance's dtype."""
    train_x, y, test_x = _data()
    model = _model(kind, train_x, y)
    model.likelihood.noise = 0.1
    ref_mean, _ = _dense_reference(model, test_x)
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances(True):
        for x in (test_x, train_x):
            pred = model(x)
            assert pred.lazy_covariance_matrix.dtype == torch.float64
            assert pred.variance.dtype == torch.float64
            assert bool((pred.variance <= 1e-10).all())
            assert model.likelihood(pred).variance.dtype == torch.float64
        torch.testing.assert_close(model(test_x).mean, ref_mean, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["group", "slope", "scaled group"])
def test_a_prediction_that_raised_leaves_the_kernel_usable(kind):
    """GPyTorch's ``LazyEvaluatedKernelTensor.evaluate_kernel`` sets the kernel's ``active_dims`` to None for the
    call and restores it only after a return. A ``GroupKernel`` refusing an id that is not a group (its documented
    ``ValueError``) left it None: every later prediction (and training step) of the model then fed the kernel all
    input columns and failed with "x1 must hold one column of group ids ... got (4, 3)". It is restored now."""
    train_x, y, test_x = _data()
    if kind == "scaled group":
        kernel = gpytorch.kernels.ScaleKernel(GroupKernel(8, active_dims=[1]))
        model = GP(train_x, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double()
    else:
        model = _model(kind, train_x, y)
    model.likelihood.noise = 0.1
    bad = test_x.clone()
    bad[0, 1] = 0.5  # not a group id
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="not an integer group id"):
        model(bad)
    mean, var = _predict(model, test_x)
    ref_mean, ref_var = _dense_reference(model, test_x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    bad_train = train_x.clone()
    bad_train[0, 1] = 9.0  # past num_groups
    model.set_train_data(bad_train, y, strict=False)
    with pytest.raises(ValueError, match="not an integer group id"):
        mll(model(bad_train), y)
    model.set_train_data(train_x, y, strict=False)
    assert torch.isfinite(mll(model(train_x), y))


def test_a_group_and_gpytorch_inducing_point_model_predicts_after_a_dtype_move():
    """A strategy built before ``model.float()`` is rebuilt by the next prediction (docs/gp.md), but GPyTorch's own
    ``InducingPointKernel`` beside a ``GroupKernel`` kept its eval-mode ``K_ZZ`` root as a plain attribute in the old
    dtype: the prediction failed with "expected m1 and m2 to have the same dtype". The rebuild now clears the
    modules' eval-mode caches too, as ``model.train()`` does."""
    train_x, y, test_x = _data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    inducing = torch.linspace(0, 4, 6, dtype=torch.float64).unsqueeze(-1)
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    sgpr = gpytorch.kernels.InducingPointKernel(smooth, inducing, likelihood, active_dims=[0])
    model = GP(train_x, y, likelihood, GroupKernel(8, active_dims=[1]) + sgpr).double()
    model.likelihood.noise = 0.1
    mean, var = _predict(model, test_x)
    model.float()
    mean32, var32 = _predict(model, test_x.float())
    assert mean32.dtype == var32.dtype == torch.float32
    torch.testing.assert_close(mean32.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var32.double(), var, rtol=1e-4, atol=1e-5)
    model.double()
    mean64, var64 = _predict(model, test_x)
    assert mean64.dtype == torch.float64
    torch.testing.assert_close(mean64, mean, rtol=1e-5, atol=1e-6)  # the parameters went through float32
    torch.testing.assert_close(var64, var, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::bma_gp.ClosedFormFallbackWarning")  # GPyTorch's strategy and update, as documented
@pytest.mark.parametrize("kind", ["group+rbf", "group, eager kernels"])
@pytest.mark.parametrize("change", ["hyperparameters", "dtype"])
def test_a_fantasy_of_a_stale_strategy_conditions_on_the_current_model(kind, change):
    """Where GPyTorch's fantasy update runs (an exact kernel in the sum; GPyTorch's own strategy under
    ``lazily_evaluate_kernels(False)``) it appends the fantasy rows to the parent's caches. A parent whose
    hyperparameters changed in eval mode, or that was moved by ``model.float()`` / ``.double()``, after its last
    prediction handed over caches of the old model: ``NotPSDError`` or "expected scalar type Double but found
    Float". The parent's strategy is now rebuilt first, as its next prediction would rebuild it."""
    train_x, y, test_x = _data()
    fantasy_x = torch.tensor([[1.0, 2, 1], [2.0, 6, 0]], dtype=torch.float64)
    fantasy_y = torch.tensor([0.5, -0.3], dtype=torch.float64)

    def build(x, targets):
        if kind == "group+rbf":
            smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))
            return GP(x, targets, gpytorch.likelihoods.GaussianLikelihood(), GroupKernel(8, active_dims=[1]) + smooth)
        return _model("group", x, targets)

    lazy = gpytorch.settings.lazily_evaluate_kernels(kind == "group+rbf")
    model = build(train_x, y).double()
    model.likelihood.noise = 0.1
    with lazy:
        if change == "dtype":
            model.float()
            _predict(model, test_x.float())
            model.double()
        else:
            _predict(model, test_x)
            _change(model, "assignment")
        fantasy = model.get_fantasy_model(fantasy_x, fantasy_y)
        mean, var = _predict(fantasy, test_x)
    given_all = build(torch.cat([model.train_inputs[0], fantasy_x]), torch.cat([model.train_targets, fantasy_y]))
    given_all.double().load_state_dict(model.state_dict())
    ref_mean, ref_var = _dense_reference(given_all, test_x)
    assert mean.dtype == torch.float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=1e-8)
