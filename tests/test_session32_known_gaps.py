"""Session 32, known gaps.

* ``covar_module = ScaleKernel(ConstantKernel()) + GroupKernel(k)`` (an intercept variance plus random effects, the
  kernel sum; also with ``ScaleKernel(GroupKernel(k))``): GPyTorch's ``ScaleKernel.forward`` multiplied the constant's
  expanded matrix by its outputscale, a dense ``n x n`` tensor, so the sum plus the likelihood's noise was a
  ``FallbackSumLinearOperator`` that trained by a dense Cholesky with a ``ClosedFormFallbackWarning`` (``n x n``
  memory), where ``ConstantKernel() + GroupKernel(k)`` was closed form. Checked: the marginal log likelihood and its
  gradients, and the posterior with ``fast_pred_var`` on and off, against the dense covariance formed by hand from the
  same parameters (single and batched models, a ``GaussianLikelihood`` and a ``GroupGaussianLikelihood``, float64 and
  float32), inside the closed-forms guard with the fallback warning an error; the peak memory of training at
  n = 20,000 (one child process) and the largest tensor prediction makes there; that ``ScaleKernel(ConstantKernel())``
  evaluates to GPyTorch's values and gradients, held expanded; and ``ChunkedInducingPointKernel +
  ScaleKernel(ConstantKernel())`` (documented as a fallback) against GPyTorch's own dense evaluation.
* ``BlockMeanAdagrad(params, maximize=numpy.True_)`` raised ``ValueError`` (torch.optim accepts NumPy bools); so did
  ``fused=numpy.False_``, ``check_finite=numpy.True_`` and ``FullMatrixAdagrad(..., foreach=numpy.False_)``. Checked:
  they are accepted by the constructors, ``add_param_group`` and ``load_state_dict``, stored as Python bools, step as
  the Python bools do, and strings and other non-bools are still refused with nothing changed.
"""

from __future__ import annotations

import contextlib
import copy
import textwrap
import warnings

import gpytorch
import numpy as np
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel
from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from closed_form_guard import closed_forms_only
from largest_tensor import LargestTensor
from peak_memory import peak_memory_increase

MB = 2**20


# ---------------------------------------------------------------------------- ScaleKernel(ConstantKernel()) + groups
def _data(n=90, k=7, dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, k, (n,), generator=generator)
    ids[:k] = torch.arange(k)  # every level seen in training
    covariate = torch.rand(n, generator=generator, dtype=torch.float64)
    y = 0.5 + ids.to(torch.float64) / 4 + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    x = torch.stack([covariate, ids.to(torch.float64)], -1)
    return x.to(dtype), y.to(dtype), ids, k


class _InterceptPlusGroups(gpytorch.models.ExactGP):
    """An intercept variance ``ScaleKernel(ConstantKernel())`` plus a random intercept on column 1 (the group kernel
    scaled or not), summed as kernels."""

    def __init__(self, x, y, likelihood, num_groups, batch, scaled_groups):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.intercept = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.ConstantKernel(batch_shape=batch), batch_shape=batch
        )
        group = GroupKernel(num_groups, active_dims=[1], batch_shape=batch)
        self.groups = gpytorch.kernels.ScaleKernel(group, batch_shape=batch) if scaled_groups else group
        self.covar_module = self.intercept + self.groups

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _model(batch, likelihood_kind, scaled_groups, dtype=torch.float64):
    x, y, ids, k = _data(dtype=dtype)
    y = y.expand(*batch, -1)
    if likelihood_kind == "group":
        likelihood = GroupGaussianLikelihood(k + 1, group_dim=1, train_inputs=x, batch_shape=batch)
    else:
        likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    model = _InterceptPlusGroups(x, y, likelihood, k + 1, batch, scaled_groups).to(dtype)
    entries = batch.numel() if batch else 1
    with torch.no_grad():
        model.intercept.outputscale = torch.linspace(0.6, 1.4, entries).reshape(batch)
        model.intercept.base_kernel.constant = torch.linspace(0.3, 0.5, entries).reshape(*batch, 1)
        if scaled_groups:
            model.groups.outputscale = torch.linspace(1.5, 0.5, entries).reshape(batch)
        if likelihood_kind == "group":
            likelihood.noise = torch.linspace(0.05, 0.4, k + 1).expand(*batch, k + 1)
        else:
            likelihood.noise = torch.linspace(0.1, 0.2, entries).reshape(*batch, 1)
    return model, likelihood, x, y, ids


def _dense_parts(model, likelihood, ids, test_ids=None):
    """The prior covariance of the training points (plus the noise) and, given test ids, the test-by-training
    covariance and the test points' prior variances, formed densely from the model's parameters."""
    batch = model.intercept.outputscale.shape
    intercept = (model.intercept.outputscale * model.intercept.base_kernel.constant.squeeze(-1)).reshape(*batch, 1, 1)
    groups = model.groups.base_kernel if isinstance(model.groups, gpytorch.kernels.ScaleKernel) else model.groups
    group_var = groups.var.reshape(*batch, 1, 1)
    if isinstance(model.groups, gpytorch.kernels.ScaleKernel):
        group_var = group_var * model.groups.outputscale.reshape(*batch, 1, 1)
    dtype = group_var.dtype
    if isinstance(likelihood, GroupGaussianLikelihood):
        noise = torch.diag_embed(likelihood.noise[..., ids])
    else:
        noise = likelihood.noise.unsqueeze(-1) * torch.eye(len(ids), dtype=dtype)
    train = intercept + group_var * (ids.unsqueeze(-1) == ids).to(dtype) + noise
    if test_ids is None:
        return train
    cross = intercept + group_var * (test_ids.unsqueeze(-1) == ids).to(dtype)
    prior = (intercept + group_var).squeeze(-1).expand(*batch, len(test_ids))
    return train, cross, prior


def _strict(n):
    """The closed-forms guard at ``n`` and the fallback warning raised."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error", ClosedFormFallbackWarning)
    stack.enter_context(closed_forms_only(n))
    stack.enter_context(gpytorch.settings.max_cholesky_size(0))
    return stack


CASES = [
    (torch.Size(), "gaussian", False),
    (torch.Size(), "group", True),
    (torch.Size([2]), "gaussian", True),
    (torch.Size([2]), "group", False),
]


@pytest.mark.parametrize("batch,likelihood_kind,scaled_groups", CASES, ids=["plain", "group_noise", "batch", "both"])
def test_scaled_constant_plus_group_kernel_sum_trains_and_predicts_in_closed_form(
    batch, likelihood_kind, scaled_groups
):
    model, likelihood, x, y, ids = _model(batch, likelihood_kind, scaled_groups)
    n = len(ids)
    with _strict(n):
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y, x).sum()
        loss.backward()
    params = dict(model.named_parameters())
    grads = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    C = _dense_parts(model, likelihood, ids)
    fit = (y.unsqueeze(-2) @ torch.linalg.solve(C, y.unsqueeze(-1))).reshape(batch) + torch.logdet(C)
    reference = ((0.5 * fit + 0.5 * n * np.log(2 * np.pi)) / n).sum()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)

    model.eval()
    test_ids = torch.tensor([0, 3, int(ids.max()) + 1])  # the last one never seen in training
    x_test = torch.stack([torch.tensor([0.2, 0.5, 0.9], dtype=x.dtype), test_ids.to(x.dtype)], -1)
    with torch.no_grad():
        C, cross, prior = _dense_parts(model, likelihood, ids, test_ids)
        mean = (cross @ torch.linalg.solve(C, y.unsqueeze(-1))).squeeze(-1)
        variance = prior - (cross * torch.linalg.solve(C, cross.mT).mT).sum(-1)
    for fast in (False, True):
        with torch.no_grad(), _strict(n), gpytorch.settings.fast_pred_var(fast):
            model.prediction_strategy = None  # each setting builds its own caches
            pred = model(x_test)
            pred_mean, pred_variance = pred.mean, pred.variance
        torch.testing.assert_close(pred_mean, mean, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(pred_variance, variance, rtol=1e-9, atol=1e-11)


def test_float32_scaled_constant_plus_groups_matches_the_float64_dense_reference():
    batch = torch.Size()
    model, likelihood, x, y, ids = _model(batch, "gaussian", True, dtype=torch.float32)
    n = len(ids)
    with _strict(n):
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
    assert loss.dtype == torch.float32
    params = dict(model.named_parameters())
    grads = {name: p.grad.clone() for name, p in params.items()}
    wide = copy.deepcopy(model).double()
    wide.zero_grad()
    C = _dense_parts(wide, wide.likelihood, ids)
    y64 = y.double()
    reference = 0.5 * (y64 @ torch.linalg.solve(C, y64) + torch.logdet(C) + n * np.log(2 * np.pi)) / n
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    for name, p in dict(wide.named_parameters()).items():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.eval()
    x_test = torch.tensor([[0.3, 1.0], [0.6, 7.0]])
    with torch.no_grad(), _strict(n):
        pred = model(x_test)
        pred_mean, pred_variance = pred.mean, pred.variance
    assert pred_mean.dtype == torch.float32
    with torch.no_grad():
        C, cross, prior = _dense_parts(wide, wide.likelihood, ids, torch.tensor([1, 7]))
        mean = cross @ torch.linalg.solve(C, y64)
        variance = prior - (cross * torch.linalg.solve(C, cross.mT).mT).sum(-1)
    torch.testing.assert_close(pred_mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred_variance.double(), variance, rtol=1e-4, atol=1e-5)


def _big_model_source():
    return """
        import warnings
        import gpytorch
        import torch
        from bma_gp import ClosedFormFallbackWarning, GroupKernel

        warnings.simplefilter("error", ClosedFormFallbackWarning)


        class Model(gpytorch.models.ExactGP):
            def __init__(self, x, y, k):
                super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
                self.mean_module = gpytorch.means.ConstantMean()
                intercept = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ConstantKernel())
                self.covar_module = intercept + GroupKernel(k, active_dims=[1])

            def forward(self, inputs):
                return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))


        def build(n, k=50):
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, k, (n,), generator=generator).to(torch.float64)
            x = torch.stack([torch.rand(n, generator=generator, dtype=torch.float64), ids], -1)
            y = torch.randn(n, generator=generator, dtype=torch.float64)
            return Model(x, y, k).double(), x, y


        def train(model, x, y):
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
            loss.backward()
    """


def test_training_scaled_constant_plus_groups_at_twenty_thousand_points_stays_small_in_memory():
    # a dense float64 n x n matrix is 3.2 GB at n = 20,000: GPyTorch's ScaleKernel formed one, and the fallback sum's
    # Cholesky another; the marginal log likelihood and its backward now stay far below
    setup = (
        _big_model_source()
        + """
        torch.set_num_threads(1)
        train(*build(60))  # the code paths warmed up
        model, x, y = build(20_000)
    """
    )
    increase = peak_memory_increase(setup, "train(model, x, y)")
    assert increase < 32 * MB, f"peak rose by {increase / MB:.0f} MB"


def test_predicting_scaled_constant_plus_groups_at_twenty_thousand_points_holds_no_large_tensor():
    # prediction, fast_pred_var off and on: no tensor (by the memory it holds) beyond a few vectors of length n
    namespace: dict = {}
    exec(textwrap.dedent(_big_model_source()), namespace)
    n = 20_000
    model, x, y = namespace["build"](n)
    model.eval()
    for fast in (False, True):
        model.prediction_strategy = None
        with torch.no_grad(), LargestTensor(storage=True) as probe, gpytorch.settings.fast_pred_var(fast):
            variance = model(x[:200]).variance
        assert variance.shape == (200,)
        assert probe.largest <= 8 * n, (fast, probe.largest, probe.where)


SCALE_CASES = {
    "square": dict(batch=(), scale_batch=(), nested=False, rows=6, last_dim_is_batch=False),
    "cross": dict(batch=(), scale_batch=(), nested=False, rows=4, last_dim_is_batch=False),
    "nested": dict(batch=(), scale_batch=(), nested=True, rows=6, last_dim_is_batch=False),
    "wider_scale": dict(batch=(), scale_batch=(3,), nested=False, rows=6, last_dim_is_batch=False),
    "batch": dict(batch=(2,), scale_batch=(2,), nested=True, rows=6, last_dim_is_batch=False),
    "last_dim_is_batch": dict(batch=(), scale_batch=(), nested=False, rows=6, last_dim_is_batch=True),
}


@pytest.mark.parametrize("case", list(SCALE_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_scaled_constant_kernel_evaluates_to_gpytorch_values_held_expanded(case, dtype):
    # the hooked ScaleKernel.forward around a ConstantKernel: GPyTorch's values, dtype and shape (and gradients), held
    # as one value per batch entry (strides 0 over the matrix) instead of GPyTorch's dense n x n product
    spec = SCALE_CASES[case]
    generator = torch.Generator().manual_seed(2)
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.ConstantKernel(batch_shape=torch.Size(spec["batch"])), batch_shape=torch.Size(spec["batch"])
    )
    if spec["nested"]:
        kernel = gpytorch.kernels.ScaleKernel(kernel, batch_shape=torch.Size(spec["scale_batch"]))
    elif spec["scale_batch"]:
        kernel.raw_outputscale = torch.nn.Parameter(torch.zeros(spec["scale_batch"]))
    kernel = kernel.to(dtype)
    with torch.no_grad():
        for p in kernel.parameters():
            p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).to(dtype) - 0.3)
    x1 = torch.rand(spec["rows"], 3, generator=generator, dtype=torch.float64).to(dtype)
    x2 = x1 if spec["rows"] == 6 else torch.rand(6, 3, generator=generator, dtype=torch.float64).to(dtype)
    options = dict(last_dim_is_batch=spec["last_dim_is_batch"])
    ours = kernel.forward(x1, x2, **options)
    original = getattr(type(kernel).forward, "_bma_gp_original", type(kernel).forward)

    def gpytorch_forward(k, a, b, **kw):  # GPyTorch's own forward at every level of the nesting
        inner = k.base_kernel
        base = gpytorch_forward(inner, a, b, **kw) if isinstance(inner, gpytorch.kernels.ScaleKernel) else None
        if base is None:
            return original(k, a, b, **kw)
        scales = k.outputscale.unsqueeze(-1) if kw.get("last_dim_is_batch") else k.outputscale
        return base.mul(scales.view(*scales.shape, 1, 1))

    theirs = gpytorch_forward(kernel, x1, x2, **options)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.stride()[-2:] == (0, 0) and ours.untyped_storage().nbytes() <= 8 * max(1, theirs[..., 0, 0].numel())
    weights = torch.rand(theirs.shape, generator=generator, dtype=torch.float64).to(dtype)
    mine = torch.autograd.grad((ours * weights).sum(), list(kernel.parameters()))
    reference = torch.autograd.grad((theirs * weights).sum(), list(kernel.parameters()))
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b)
    if x2 is x1:  # the diagonal: GPyTorch's own path, unchanged
        diagonal = kernel.forward(x1, x1, diag=True, **options)
        torch.testing.assert_close(diagonal, theirs.diagonal(dim1=-2, dim2=-1), rtol=0, atol=0)


class _SgprPlusIntercept(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, inducing_kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        inducing = torch.linspace(0, 4, 9, dtype=x.dtype).unsqueeze(-1)
        self.sgpr = inducing_kernel(base, inducing, likelihood)
        self.intercept = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ConstantKernel())
        self.covar_module = self.sgpr + self.intercept

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize(
    "inducing_kernel", [ChunkedInducingPointKernel, gpytorch.kernels.InducingPointKernel], ids=["chunked", "gpytorch"]
)
def test_inducing_points_plus_a_scaled_constant_train_and_predict_in_closed_form(inducing_kernel, monkeypatch):
    # ChunkedInducingPointKernel + ScaleKernel(ConstantKernel()) was documented as a fallback that warns (the scaled
    # constant formed n x n); now closed form, equal to GPyTorch's own dense evaluation of the same model (its
    # ScaleKernel.forward put back: the n x n constant, a dense Cholesky)
    generator = torch.Generator().manual_seed(3)
    n = 80
    x = 4 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    x_test = torch.linspace(0.1, 3.9, 5, dtype=torch.float64).unsqueeze(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = _SgprPlusIntercept(x, y, likelihood, inducing_kernel).double()
    with torch.no_grad():
        model.intercept.outputscale = 0.7
        model.intercept.base_kernel.constant = torch.tensor([0.4], dtype=torch.float64)
        likelihood.noise = 0.05

    def run(strict):
        """The loss, its gradients and the posterior (fast_pred_var off and on); strict: inside the closed-forms
        guard with the fallback warning an error, else recording the fallback warnings."""
        fallbacks = []

        def guard():
            if strict:
                return _strict(n)
            stack = contextlib.ExitStack()
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always", ClosedFormFallbackWarning)
            stack.callback(lambda: fallbacks.extend(w for w in caught if w.category is ClosedFormFallbackWarning))
            return stack

        model.train()
        model.zero_grad()
        with guard():
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
            loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.eval()
        predictions = []
        for fast in (False, True):
            model.prediction_strategy = None
            with torch.no_grad(), guard(), gpytorch.settings.fast_pred_var(fast):
                pred = model(x_test)
                predictions.append((pred.mean, pred.variance))
        return loss.detach(), grads, predictions, fallbacks

    loss, grads, predictions, _ = run(strict=True)
    forward = gpytorch.kernels.ScaleKernel.forward
    monkeypatch.setattr(gpytorch.kernels.ScaleKernel, "forward", getattr(forward, "_bma_gp_original", forward))
    with gpytorch.settings.max_cholesky_size(10_000), gpytorch.settings.fast_computations(False, False, False):
        dense_loss, dense_grads, dense_predictions, fallbacks = run(strict=False)
    assert fallbacks, "the reference did not take GPyTorch's dense path"
    torch.testing.assert_close(loss, dense_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == dense_grads.keys() and "intercept.raw_outputscale" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-7, atol=1e-10, msg=name)
    for (mean, variance), (dense_mean, dense_variance) in zip(predictions, dense_predictions):
        torch.testing.assert_close(mean, dense_mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(variance, dense_variance, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- NumPy bools in the optimizers
def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64)) for _ in range(2)]


def _loss(params, t):
    generator = torch.Generator().manual_seed(10 + t)
    return sum(((p - torch.randn(p.shape, generator=generator, dtype=p.dtype)) ** 2).sum() for p in params)


def _steps(opt, params, steps=3):
    for t in range(steps):
        opt.zero_grad()
        _loss(params, t).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_numpy_bools_are_accepted_by_the_constructors_as_python_bools():
    # BlockMeanAdagrad(params, maximize=numpy.True_) raised "Invalid maximize value: True; it must be True or False."
    # (a NumPy bool prints as True), as fused=numpy.False_ and check_finite=numpy.True_ did; torch.optim takes them
    torch.optim.Adagrad(_params(), maximize=np.True_, foreach=np.False_)
    params = _params()
    opt = BlockMeanAdagrad(params, lr=0.1, maximize=np.True_, fused=np.False_, check_finite=np.True_)
    assert opt.param_groups[0]["maximize"] is True and opt.defaults["maximize"] is True
    assert opt.fused is False and opt.check_finite is True
    plain_params = _params()
    plain = BlockMeanAdagrad(plain_params, lr=0.1, maximize=True, fused=False, check_finite=True)
    torch.testing.assert_close(_steps(opt, params), _steps(plain, plain_params), rtol=0, atol=0)
    assert opt.state_dict()["param_groups"] == plain.state_dict()["param_groups"]
    # maximize ascends, as torch.optim.Adagrad's does with numpy.True_: one step raises the loss
    for make in (
        lambda p: torch.optim.Adagrad(p, lr=0.1, maximize=np.True_),
        lambda p: BlockMeanAdagrad(p, lr=0.1, maximize=np.True_),
    ):
        fresh = _params()
        start = _loss(fresh, 0).item()
        _steps(make(fresh), fresh, steps=1)
        assert _loss(fresh, 0).item() > start
    opt.check_finite = np.False_
    assert opt.check_finite is False
    full = FullMatrixAdagrad(
        _params(), maximize=np.True_, foreach=np.False_, fused=np.False_, capturable=np.False_, check_finite=np.False_
    )
    assert full.param_groups[0]["maximize"] is True and full.check_finite is False


@pytest.mark.parametrize("value", ["yes", "False", 1, None, torch.tensor(True), np.array([True, False])])
def test_non_bools_are_still_refused(value):
    makers = [
        lambda: BlockMeanAdagrad(_params(), maximize=value),
        lambda: BlockMeanAdagrad(_params(), check_finite=value),
        lambda: FullMatrixAdagrad(_params(), maximize=value),
    ]
    if value is not None:  # fused=None is torch.optim's default ("let the optimizer choose"), the eager step
        makers.append(lambda: BlockMeanAdagrad(_params(), fused=value))
    for make in makers:
        with pytest.raises(ValueError, match="Invalid (maximize|fused|check_finite) value: .*must be True or False"):
            make()
    with pytest.raises(ValueError, match="Invalid capturable value: True"):  # torch.optim's flags: False only
        BlockMeanAdagrad(_params(), capturable=np.True_)
    opt = BlockMeanAdagrad(_params(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid check_finite value"):
        opt.check_finite = value
    assert opt.check_finite is True


def test_add_param_group_stores_numpy_bools_as_python_bools_and_refuses_the_rest_unchanged():
    opt = BlockMeanAdagrad(_params()[:1], lr=0.1)
    extra = _params(1)
    opt.add_param_group({"params": [extra[0]], "maximize": np.True_, "fused": np.False_, "check_finite": np.True_})
    group = opt.param_groups[-1]
    assert group["maximize"] is True and group["fused"] is False and group["check_finite"] is True
    with pytest.raises(ValueError, match="Invalid maximize value: 'yes'"):
        opt.add_param_group({"params": [extra[1]], "maximize": "yes"})
    with pytest.raises(ValueError, match="fused is an optimizer-wide setting"):
        opt.add_param_group({"params": [extra[1]], "fused": np.True_})
    assert len(opt.param_groups) == 2
    full = FullMatrixAdagrad(_params()[:1])
    full.add_param_group({"params": [extra[1]], "maximize": np.False_, "foreach": np.False_})
    assert full.param_groups[-1]["maximize"] is False


def test_load_state_dict_stores_numpy_bools_as_python_bools_and_refuses_the_rest_unchanged():
    params = _params()
    opt = BlockMeanAdagrad([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    _steps(opt, params, steps=1)
    saved = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["maximize"] = np.True_
    bad["param_groups"][1]["maximize"] = "yes"
    with pytest.raises(ValueError, match=r"Invalid maximize value: 'yes'.*param_groups'\]\[1\]; nothing was loaded"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and all(g["maximize"] is False for g in opt.param_groups)
    for key in before["state"]:
        for name, value in before["state"][key].items():
            torch.testing.assert_close(after["state"][key][name], value, rtol=0, atol=0)
    good = copy.deepcopy(saved)
    good["param_groups"][0]["maximize"] = np.True_
    opt.load_state_dict(good)
    assert opt.param_groups[0]["maximize"] is True and opt.param_groups[1]["maximize"] is False
    assert opt.state_dict()["param_groups"][0]["maximize"] is True


def test_maximize_edited_in_place_to_a_numpy_bool_steps_as_the_python_bool():
    # torch.optim reads the group's maximize at each step; so does the flat step, through bool()
    runs = []
    for value in (np.True_, True):
        params = _params()
        opt = BlockMeanAdagrad(params, lr=0.1)
        _steps(opt, params, steps=1)
        opt.param_groups[0]["maximize"] = value
        runs.append(_steps(opt, params))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
