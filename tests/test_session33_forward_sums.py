"""Session 33: a block mean kernel combined with other kernel outputs in the model's ``forward``.

Found: a model whose ``forward`` adds (or multiplies) kernel outputs, ``self.bmk(x) + self.rbf(x)`` rather than one
kernel module, was not checked against its training inputs with GPyTorch's lazy evaluation on (the default). After
``model.set_train_data(x2, y2, strict=False)`` without ``bmk.set_train_data(x2, partition2)`` the block mean kernel
took the new training inputs for new points, so the marginal likelihood and the predictions were those of the exact
base kernel, silently: at n = 40 the loss 0.147 against 0.556 of the correctly re-bound model for ``bmk + rbf``
(posterior means up to 0.36 apart), 0.180 against 0.556 for ``bmk * rbf`` (0.43), 0.404 against 0.631 for
``bmk.add_diagonal(d)`` (0.23). The check read the prior only where it was one lazily evaluated kernel. It now
also walks a prior built of several (the lazily evaluated kernel tensors still in the sum), and a block mean kernel
evaluated while the model is called (a product, ``add_diagonal``, the package's closed-form sums evaluate their terms
there) checks the inputs its ``forward`` gets, as it did only under ``lazily_evaluate_kernels(False)``. Inputs are
checked only where their columns are columns of the model's training inputs, so a ``forward`` that transforms its
inputs, a kernel evaluating the block mean kernel at points of its own, inducing points, fantasy models and batch
models are left alone. Group ids as a second input (``self.bmk(x) + self.group(g)``, GPyTorch's Hadamard form
``self.bmk(x).mul(self.task(g))``) were unchecked too and are now refused the same way.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel, Partition

RBF = gpytorch.kernels.RBFKernel
Scale = gpytorch.kernels.ScaleKernel
MVN = gpytorch.distributions.MultivariateNormal
DTYPE = torch.float64
N = 30
MESSAGE = r"also call kernel\.set_train_data\(x, partition\) on the BlockMeanKernel"


def _data(seed: int, n: int = N):
    """Inputs (two features and a group id column), targets, the partition of the first feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=DTYPE)
    x[:, 2] = torch.randint(0, 4, (n,), generator=g).to(DTYPE)
    y = torch.sin(5 * x[:, 0]) + x[:, 2] / 4 + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    part = Partition.from_labels(torch.unique((x[:, 0] * 5).long(), return_inverse=True)[1])
    return x, y, part


def _bmk(x, part):
    return BlockMeanKernel(RBF(active_dims=[0, 1]), x, part)


class _Flip(gpytorch.kernels.Kernel):
    """A kernel that evaluates the block mean kernel at points of its own (``1 - x``): new points for it."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x1, x2, diag=False, **params):
        return self.kernel.forward(1 - x1, 1 - x2, diag=diag, **params)


# each: (x, partition) -> the modules, and the forward's covariance from them
FORMS = {
    "bmk + rbf": (lambda x, p: {"bmk": _bmk(x, p), "rbf": RBF(active_dims=[1])}, lambda m, x: m.bmk(x) + m.rbf(x)),
    "rbf + bmk": (lambda x, p: {"bmk": _bmk(x, p), "rbf": RBF(active_dims=[1])}, lambda m, x: m.rbf(x) + m.bmk(x)),
    "bmk + group": (
        lambda x, p: {"bmk": _bmk(x, p), "group": GroupKernel(4, active_dims=[2])},
        lambda m, x: m.bmk(x) + m.group(x),
    ),
    "scale(bmk) + rbf + group": (
        lambda x, p: {"bmk": Scale(_bmk(x, p)), "rbf": RBF(active_dims=[1]), "group": GroupKernel(4, active_dims=[2])},
        lambda m, x: m.bmk(x) + m.rbf(x) + m.group(x),
    ),
    "bmk * rbf": (lambda x, p: {"bmk": _bmk(x, p), "rbf": RBF(active_dims=[1])}, lambda m, x: m.bmk(x) * m.rbf(x)),
    "bmk.add_diagonal": (
        lambda x, p: {"bmk": _bmk(x, p)},
        lambda m, x: m.bmk(x).add_diagonal(torch.tensor(0.2, dtype=x.dtype)),
    ),
    "sgpr(bmk) + group": (
        lambda x, p: {
            "bmk": ChunkedInducingPointKernel(_bmk(x, p), x[::3].clone(), gpytorch.likelihoods.GaussianLikelihood()),
            "group": GroupKernel(4, active_dims=[2]),
        },
        lambda m, x: m.bmk(x) + m.group(x),
    ),
    "sgpr(scale(bmk) + rbf) + group": (
        lambda x, p: {
            "bmk": gpytorch.kernels.InducingPointKernel(
                Scale(_bmk(x, p)) + RBF(active_dims=[1]), x[::3].clone(), gpytorch.likelihoods.GaussianLikelihood()
            ),
            "group": GroupKernel(4, active_dims=[2]),
        },
        lambda m, x: m.bmk(x) + m.group(x),
    ),
}


class _Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, modules, covariance, transform=None):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        for name, module in modules.items():
            setattr(self, name, module)
        self.covariance = covariance
        self.transform = transform

    def forward(self, x):
        z = x if self.transform is None else self.transform(x)
        return MVN(self.mean_module(x), self.covariance(self, z))


def _model(form, x, y, part, transform=None):
    modules, covariance = FORMS[form]
    model = _Model(x, y, modules(x if transform is None else transform(x), part), covariance, transform).to(DTYPE)
    with torch.no_grad():
        model.likelihood.noise = 0.05
        for module in model.modules():
            if isinstance(module, RBF):
                module.lengthscale = 0.4
    return model


def _sgpr_or_bmk(model):
    """The block mean kernel of ``model`` (inside the inducing-point kernel and the ScaleKernel, where they are)."""
    return next(m for m in model.modules() if isinstance(m, BlockMeanKernel))


def _loss_and_prediction(model, x, y, test):
    model.train()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    model.eval()
    with torch.no_grad():
        pred = model.likelihood(model(test))
    return loss.detach(), pred.mean, pred.variance


def _assert_close(got, want):
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (a, b)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback sums' and eager evaluation's ClosedFormFallbackWarning
        yield


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize("form", list(FORMS))
def test_model_set_train_data_alone_is_refused_in_training_and_prediction(form, lazy):
    """After ``model.set_train_data`` without ``kernel.set_train_data`` the block mean kernel would take the new
    training inputs for new points (the exact base kernel): the marginal likelihood and the prediction raise the
    block mean kernel's ``ValueError``, with lazy evaluation on and off. Once the kernel is bound as well, the model
    trains and predicts as a model built on the new data (also after the refused prediction: no strategy built on
    the old binding is kept)."""
    x, y, part = _data(0)
    x2, y2, part2 = _data(1)
    test = _data(2, n=6)[0]
    model = _model(form, x, y, part)
    model.set_train_data(x2, y2, strict=False)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        model.train()
        with pytest.raises(ValueError, match=MESSAGE):
            -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x2), y2)
        model.eval()
        with pytest.raises(ValueError, match=MESSAGE), torch.no_grad():
            model(test)
        assert model.prediction_strategy is None
        _sgpr_or_bmk(model).set_train_data(x2, part2)
        fresh = _model(form, x2, y2, part2)
        if isinstance(model.bmk, gpytorch.kernels.InducingPointKernel):  # the same inducing points
            fresh.bmk.inducing_points.data.copy_(model.bmk.inducing_points)
        _assert_close(_loss_and_prediction(model, x2, y2, test), _loss_and_prediction(fresh, x2, y2, test))


@pytest.mark.parametrize("form", ["bmk + rbf", "bmk * rbf", "bmk.add_diagonal"])
def test_bound_model_equals_dense_covariance_and_eager_evaluation(form):
    """A correctly bound forward sum: its loss is the Gaussian log-likelihood of its covariance made dense (plus the
    noise), and lazy and eager evaluation agree on the loss and the predictions."""
    x, y, part = _data(0)
    test = _data(2, n=6)[0]
    model = _model(form, x, y, part)
    lazy = _loss_and_prediction(model, x, y, test)
    with torch.no_grad():
        covariance = FORMS[form][1](model, x).to_dense() + 0.05 * torch.eye(N, dtype=DTYPE)
        mean = model.mean_module(x)
    dense = -MVN(mean, covariance).log_prob(y) / N
    assert torch.allclose(lazy[0], dense, rtol=1e-8), (lazy[0], dense)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        _assert_close(_loss_and_prediction(model, x, y, test), lazy)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_forward_that_transforms_its_inputs_is_not_refused(lazy):
    """A ``forward`` that hands its kernels transformed inputs (bound to the transformed training inputs): no false
    alarm, and the model equals one given the transformed data."""
    x, y, part = _data(0)
    test = _data(2, n=6)[0]

    def transform(t):
        return torch.cat([2 * t[..., :2] - 1, t[..., 2:]], dim=-1)

    model = _model("bmk + group", x, y, part, transform=transform)
    plain = _model("bmk + group", transform(x), y, part)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        _assert_close(
            _loss_and_prediction(model, x, y, test), _loss_and_prediction(plain, transform(x), y, transform(test))
        )


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_kernel_that_gives_the_block_mean_kernel_points_of_its_own_is_not_refused(lazy):
    """A kernel that evaluates the block mean kernel at ``1 - x`` gives it new points (the exact base kernel there):
    no false alarm, and the loss is the dense one of the base kernel at ``1 - x`` plus the other summand."""
    x, y, part = _data(0)
    model = _Model(x, y, {"flip": _Flip(_bmk(x, part)), "rbf": RBF(active_dims=[1])}, lambda m, z: m.flip(z) + m.rbf(z))
    model = model.to(DTYPE)
    model.likelihood.noise = 0.05
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        loss = _loss_and_prediction(model, x, y, _data(2, n=6)[0])[0]
    with torch.no_grad():
        base = model.flip.kernel.base_kernel
        covariance = base(1 - x).to_dense() + model.rbf(x).to_dense() + 0.05 * torch.eye(N, dtype=DTYPE)
    dense = -MVN(model.mean_module(x).detach(), covariance).log_prob(y) / N
    assert torch.allclose(loss, dense, rtol=1e-8), (loss, dense)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_inducing_points_of_a_forward_sum_are_not_refused(lazy):
    """An inducing-point kernel around the block mean kernel in a forward sum evaluates it at its inducing points
    (``K_ZZ``, ``K_XZ``): no false alarm, and the model equals the same kernels summed as one kernel module."""
    x, y, part = _data(0)
    test = _data(2, n=6)[0]
    model = _model("sgpr(bmk) + group", x, y, part)
    one = _Model(x, y, {"sum": model.bmk + model.group}, lambda m, z: m.sum(z)).to(DTYPE)
    one.likelihood.noise = 0.05
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        _assert_close(_loss_and_prediction(model, x, y, test), _loss_and_prediction(one, x, y, test))


def test_fantasy_model_of_a_forward_sum_is_not_refused():
    """A fantasy model's training inputs extend the block mean kernel's (the fantasy points are new points for it):
    no false alarm in prediction, in training mode, and under eager evaluation, and its predictions are those of a
    model on all the points whose partition gives each fantasy point a block of its own."""
    x, y, part = _data(0)
    xf, yf, _ = _data(3, n=3)
    test = _data(2, n=6)[0]
    model = _model("bmk + rbf", x, y, part)
    model.eval()
    with torch.no_grad():
        model(test)
        fantasy = model.get_fantasy_model(xf, yf)
        got = fantasy(test).mean
        with gpytorch.settings.lazily_evaluate_kernels(False):
            eager = fantasy(test).mean
    labels = torch.cat([part.labels, part.num_blocks + torch.arange(3)])
    xa, ya = torch.cat([x, xf]), torch.cat([y, yf])
    everything = _model("bmk + rbf", xa, ya, Partition.from_labels(labels))
    everything.mean_module.load_state_dict(model.mean_module.state_dict())
    everything.eval()
    with torch.no_grad():
        want = everything(test).mean
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-9), (got, want)
    assert torch.allclose(eager, want, rtol=1e-7, atol=1e-9), (eager, want)
    fantasy.train()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(fantasy.likelihood, fantasy)(fantasy(xa), ya)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_batch_model_with_a_forward_sum_is_not_refused(lazy):
    """A batch of two models over the same inputs (one outputscale and lengthscale each): no false alarm, and the
    loss is the mean of the dense Gaussian log-likelihoods of the batch members."""
    x, y, part = _data(0)
    ys = torch.stack([y, y.flip(0)])
    batch = torch.Size([2])
    modules = {"bmk": Scale(_bmk(x, part), batch_shape=batch), "rbf": RBF(active_dims=[1], batch_shape=batch)}
    model = _Model(x, ys, modules, lambda m, z: m.bmk(z) + m.rbf(z)).to(DTYPE)
    model.likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch).to(DTYPE)
    model.mean_module = gpytorch.means.ConstantMean(batch_shape=batch).to(DTYPE)
    with torch.no_grad():
        model.likelihood.noise = torch.tensor([[0.05], [0.1]], dtype=DTYPE)
        model.bmk.outputscale = torch.tensor([0.5, 2.0], dtype=DTYPE)
        model.rbf.lengthscale = torch.tensor([[[0.3]], [[0.6]]], dtype=DTYPE)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        loss, mean, _ = _loss_and_prediction(model, x, ys, _data(2, n=6)[0])
    with torch.no_grad():
        noise = model.likelihood.noise.view(2, 1, 1) * torch.eye(N, dtype=DTYPE)
        covariance = model.bmk(x).to_dense() + model.rbf(x).to_dense() + noise
    dense = -(MVN(model.mean_module(x).detach(), covariance).log_prob(ys) / N).sum()
    assert mean.shape == (2, 6) and torch.allclose(loss.sum(), dense, rtol=1e-8), (loss, dense)


class _TwoInputs(gpytorch.models.ExactGP):
    """Group ids as a second input: ``self.bmk(x) + self.group(g)``, or GPyTorch's Hadamard form
    ``self.bmk(x).mul(self.task(g))``."""

    def __init__(self, x, ids, y, part, hadamard):
        super().__init__((x, ids), y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.bmk = _bmk(x, part)
        self.other = gpytorch.kernels.IndexKernel(4, rank=1) if hadamard else GroupKernel(4)
        self.hadamard = hadamard
        if hadamard:
            with torch.no_grad():
                self.other.covar_factor.copy_(torch.linspace(0.2, 1.0, 4).view(4, 1))
                self.other.raw_var.copy_(torch.linspace(-1.0, 0.5, 4))  # both random at construction

    def forward(self, x, ids):
        covariance = self.bmk(x).mul(self.other(ids)) if self.hadamard else self.bmk(x) + self.other(ids)
        return MVN(self.mean_module(x), covariance)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["sum", "hadamard"])
def test_group_ids_as_a_second_input(hadamard, lazy):
    """A model with two training inputs: the block mean kernel is checked against the first (its columns are the
    model's), after ``model.set_train_data`` alone it is refused, and once bound the model equals a fresh one."""
    (x, _, part), (x2, y2, part2) = _data(0), _data(1)
    ids, ids2 = x[:, 2:].long(), x2[:, 2:].long()
    test = _data(2, n=6)[0]
    model = _TwoInputs(x[:, :2], ids, _data(0)[1], part, hadamard).to(DTYPE)
    model.set_train_data((x2[:, :2], ids2), y2, strict=False)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.lazily_evaluate_kernels(lazy):
        model.train()
        with pytest.raises(ValueError, match=MESSAGE):
            mll(model(x2[:, :2], ids2), y2)
        model.eval()
        with pytest.raises(ValueError, match=MESSAGE), torch.no_grad():
            model(test[:, :2], test[:, 2:].long())
        model.bmk.set_train_data(x2[:, :2], part2)
        fresh = _TwoInputs(x2[:, :2], ids2, y2, part2, hadamard).to(DTYPE)
        results = []
        for m in (model, fresh):
            m.train()
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)(m(x2[:, :2], ids2), y2)
            m.eval()
            with torch.no_grad():
                results.append((loss.detach(), m(test[:, :2], test[:, 2:].long()).mean))
    _assert_close(*results)


class _Wrapped(gpytorch.kernels.Kernel):
    """A kernel wrapper the check does not know, passing the block mean kernel the inputs as they come."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x1, x2, diag=False, **params):
        return self.kernel.forward(x1, x2, diag=diag, **params)


def test_block_mean_kernel_inside_an_unknown_wrapper_is_left_to_it_with_lazy_evaluation():
    """With lazy evaluation on, a block mean kernel inside a kernel the check does not know is not checked (as the
    lazy check of a model's prior leaves it; the tests' dense references are built so, on training inputs that
    extend its ``train_x``): no refusal, and the loss is the dense one of the kernel it evaluates (its training
    inputs followed by new points). Under ``lazily_evaluate_kernels(False)`` the kernel still refuses them."""
    x, y, part = _data(0)
    xf, yf, _ = _data(3, n=4)
    xa, ya = torch.cat([x, xf]), torch.cat([y, yf])
    model = _Model(
        xa, ya, {"wrapped": _Wrapped(_bmk(x, part)), "rbf": RBF(active_dims=[1])}, lambda m, z: m.wrapped(z) + m.rbf(z)
    )
    model = model.to(DTYPE)
    model.likelihood.noise = 0.05
    loss = _loss_and_prediction(model, xa, ya, _data(2, n=6)[0])[0]
    with torch.no_grad():
        covariance = (
            model.wrapped.kernel(xa).to_dense() + model.rbf(xa).to_dense() + 0.05 * torch.eye(N + 4, dtype=DTYPE)
        )
    dense = -MVN(model.mean_module(xa).detach(), covariance).log_prob(ya) / (N + 4)
    assert torch.allclose(loss, dense, rtol=1e-8), (loss, dense)
    model.train()
    with gpytorch.settings.lazily_evaluate_kernels(False), pytest.raises(ValueError, match=MESSAGE):
        model(xa)
