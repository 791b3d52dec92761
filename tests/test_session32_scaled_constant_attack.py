"""Session 32, an attack on ``ScaleKernel(ConstantKernel())`` held expanded.

Since session 32 ``import bma_gp`` replaces GPyTorch's ``ScaleKernel.forward``: around a ``ConstantKernel`` (in one
or more ``ScaleKernel`` wrappers) it returns the scaled constant held expanded, one value per batch entry, instead of
GPyTorch's dense ``n x n`` product. The hook is global, so every GPyTorch model sees it. What was wrong:

* a ``ConstantKernel`` subclass whose matrix is not an expanded constant was evaluated twice per call (the hook
  evaluated it, then handed over to GPyTorch's ``forward``, which evaluated it again): twice the cost of a dense
  subclass and a second draw of a random one. Checked: evaluated once, GPyTorch's values.
* ``ChunkedInducingPointKernel(..., likelihood=GaussianLikelihood())`` with a likelihood of its own whose noise
  equals the model's (two fresh likelihoods start equal) sent the SGPR trace term's gradient to the model's noise
  (-0.17 became 8.8, the kernel's noise -0.78 became -9.7; their sum was right): the term reused the marginal
  likelihood's Gram matrix for any noise of equal values. ``ChunkedInducingPointKernel + ScaleKernel(ConstantKernel())``
  reaches that path since the hook. Checked: the loss and every gradient against GPyTorch's ``InducingPointKernel`` on
  the same values, alone and plus a scaled constant, and that the model's own likelihood still reuses the Gram
  matrix (one pass).

What held, checked against the same model with GPyTorch's ``ScaleKernel.forward`` put back (its dense evaluation):
plain GPyTorch models (products and sums with an RBF kernel, the scaled constant alone, nested scales, batch shapes
broadcast between the constant and the scale, ``lazily_evaluate_kernels(False)``, ``AdditiveStructureKernel``
(``last_dim_is_batch``), ``MultitaskKernel``, a variational model, float32): the marginal log likelihood, every
gradient, the posterior with ``fast_pred_var`` on and off and a fantasy model; the kernel's values, dtype, shape and
gradients over batch shapes, cross covariances, ``last_dim_is_batch``, ``diag`` and dtypes down to bfloat16; ``vmap``,
``torch.func.grad``, ``deepcopy`` and pickling; the package's kernels with a scaled constant (``* GroupKernel``,
``(+ GroupKernel) * IndexKernel``, with a ``FixedNoiseGaussianLikelihood`` and a ``GroupGaussianLikelihood``).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import ConstantKernel, IndexKernel, InducingPointKernel, RBFKernel, ScaleKernel

from bma_gp import ChunkedInducingPointKernel, ClosedFormFallbackWarning, GroupGaussianLikelihood, GroupKernel

B = torch.Size([2])
NO_BATCH = torch.Size()


@contextlib.contextmanager
def gpytorch_scale_forward():
    """GPyTorch's own ``ScaleKernel.forward`` (the dense product), the package's put back afterwards."""
    hooked = ScaleKernel.forward
    ScaleKernel.forward = hooked._bma_gp_original
    try:
        yield
    finally:
        ScaleKernel.forward = hooked


def _both(fn):
    """``fn()`` with the package's ``ScaleKernel.forward`` and with GPyTorch's, each from the same seed; fallback
    warnings of GPyTorch's dense evaluation ignored."""
    out = []
    for ctx in (contextlib.nullcontext(), gpytorch_scale_forward()):
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", ClosedFormFallbackWarning)
            torch.manual_seed(0)
            out.append(fn())
    assert ScaleKernel.forward is not ScaleKernel.forward.__dict__.get("_bma_gp_original")
    return out


def _assert_same(hooked, dense, rtol=1e-9, atol=1e-11):
    assert len(hooked) == len(dense)
    for i, (a, b) in enumerate(zip(hooked, dense)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"output {i}: {m}")


def _data(n=30, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (n,), generator=g)
    ids[:4] = torch.arange(4)
    xc = torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.stack([xc, ids.double()], -1)
    y = torch.sin(4 * xc) + ids / 3 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    xt = torch.stack([torch.rand(5, generator=g, dtype=torch.float64), torch.tensor([0.0, 1, 2, 3, 1])], -1)
    return x.to(dtype), y.to(dtype), xt.to(dtype)


def _set_params(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.linspace(-0.3, 0.4, p.numel()).reshape(p.shape))


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar, multitask=False):
        super().__init__(x, y, likelihood)
        self.multitask = multitask
        mean = gpytorch.means.ConstantMean()
        self.mean_module = gpytorch.means.MultitaskMean(mean, num_tasks=2) if multitask else mean
        self.covar_module = covar

    def forward(self, x):
        cls = gpytorch.distributions.MultitaskMultivariateNormal if self.multitask else None
        mvn = (cls or gpytorch.distributions.MultivariateNormal)(self.mean_module(x), self.covar_module(x))
        return mvn


def _exact_run(make_covar, make_likelihood=None, batch=NO_BATCH, dtype=torch.float64, lazy=True, mt=False):
    """Loss and gradients of the exact marginal log likelihood, the posterior (fast_pred_var off and on) and a
    fantasy model's mean."""
    x, y, xt = _data(dtype=dtype)
    if mt:
        y = torch.stack([y, y.flip(0)], -1)
    y = y.expand(*batch, *y.shape)

    def run():
        with gpytorch.settings.lazily_evaluate_kernels(lazy):
            if make_likelihood is not None:
                likelihood = make_likelihood(x)
            elif mt:
                likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
            else:
                likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
            model = _GP(x, y, likelihood, make_covar(), multitask=mt).to(dtype)
            _set_params(model)
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y).sum()
            loss.backward()
            out = [loss.detach()] + [p.grad for p in model.parameters()]
            model.eval()
            for fast in (False, True):
                model.prediction_strategy = None
                with torch.no_grad(), gpytorch.settings.fast_pred_var(fast):
                    pred = model(xt)
                    out += [pred.mean, pred.variance]
            if not mt:
                kwargs = {}
                if isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
                    kwargs["noise"] = torch.full((2,), 0.1, dtype=dtype)
                with torch.no_grad():
                    fantasy = model.get_fantasy_model(
                        xt[:2].expand(*batch, 2, 2), y.new_tensor([0.2, 0.5]).expand(*batch, 2), **kwargs
                    )
                    out.append(fantasy(xt).mean)
            return out

    return run


def _sc(**kwargs):
    return ScaleKernel(ConstantKernel(**kwargs))


PLAIN = {
    "sc_times_rbf": (lambda: _sc() * RBFKernel(), {}),
    "sc_alone": (lambda: _sc(), {}),
    "nested_scales_plus_scaled_rbf": (lambda: ScaleKernel(_sc()) + ScaleKernel(RBFKernel()), {}),
    "priors_active_dims": (
        lambda: (
            ScaleKernel(
                ConstantKernel(active_dims=[1], constant_prior=gpytorch.priors.GammaPrior(2.0, 2.0)),
                outputscale_prior=gpytorch.priors.GammaPrior(2.0, 2.0),
            )
            + RBFKernel(active_dims=[0])
        ),
        {},
    ),
    "batch_scale_around_plain_constant": (
        lambda: ScaleKernel(ConstantKernel(), batch_shape=B) * RBFKernel(),
        {"batch": B},
    ),
    "batch_constant_in_plain_scale": (lambda: _sc(batch_shape=B) + RBFKernel(batch_shape=B), {"batch": B}),
    "not_lazily_evaluated": (lambda: _sc() * RBFKernel() + _sc(), {"lazy": False}),
    "additive_structure": (lambda: gpytorch.kernels.AdditiveStructureKernel(_sc() + RBFKernel(), num_dims=2), {}),
    "multitask": (lambda: gpytorch.kernels.MultitaskKernel(_sc() + RBFKernel(), num_tasks=2, rank=1), {"mt": True}),
    "float32": (lambda: _sc() * RBFKernel() + _sc(), {"dtype": torch.float32}),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_gpytorch_model_with_a_scaled_constant_matches_gpytorchs_dense_scale(name):
    make_covar, options = PLAIN[name]
    hooked, dense = _both(_exact_run(make_covar, **options))
    if options.get("dtype") == torch.float32:
        _assert_same(hooked, dense, rtol=1e-4, atol=1e-5)
    else:
        _assert_same(hooked, dense, rtol=1e-8, atol=1e-10)


PACKAGE = {
    "sc_times_groups": (lambda: _sc() * GroupKernel(4, active_dims=[1]), None),
    "sc_plus_groups_times_index": (
        lambda: (_sc(active_dims=[0]) + GroupKernel(4, active_dims=[1])) * IndexKernel(4, rank=1, active_dims=[1]),
        None,
    ),
    "sc_plus_groups_fixed_noise": (
        lambda: _sc() + GroupKernel(4, active_dims=[1]),
        lambda x: gpytorch.likelihoods.FixedNoiseGaussianLikelihood(torch.linspace(0.05, 0.2, len(x))),
    ),
    "sc_plus_groups_group_noise": (
        lambda: _sc() + ScaleKernel(GroupKernel(4, active_dims=[1])),
        lambda x: GroupGaussianLikelihood(4, group_dim=1, train_inputs=x),
    ),
}


@pytest.mark.parametrize("name", list(PACKAGE))
def test_package_kernels_with_a_scaled_constant_match_the_dense_evaluation(name):
    make_covar, make_likelihood = PACKAGE[name]
    hooked, dense = _both(_exact_run(make_covar, make_likelihood))
    _assert_same(hooked, dense, rtol=1e-8, atol=1e-10)


def test_variational_model_with_a_scaled_constant_matches_gpytorchs_dense_scale():
    x, y, xt = _data()

    class VGP(gpytorch.models.ApproximateGP):
        def __init__(self):
            distribution = gpytorch.variational.CholeskyVariationalDistribution(8)
            super().__init__(gpytorch.variational.VariationalStrategy(self, x[:8].clone(), distribution))
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = _sc() + _sc() * RBFKernel()

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    def run():
        model, likelihood = VGP().double(), gpytorch.likelihoods.GaussianLikelihood().double()
        _set_params(model)
        with torch.no_grad():
            chol = model.variational_strategy._variational_distribution.chol_variational_covar
            chol.copy_(0.5 * torch.eye(8) + 0.01 * torch.ones(8, 8, dtype=torch.float64).tril())
        model.variational_strategy.variational_params_initialized.fill_(1)
        loss = -gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))(model(x), y)
        loss.backward()
        model.eval()
        with torch.no_grad():
            pred = model(xt)
        return [loss.detach()] + [p.grad for p in model.parameters()] + [pred.mean, pred.variance]

    hooked, dense = _both(run)
    _assert_same(hooked, dense, rtol=1e-8, atol=1e-10)


KERNEL_CASES = [
    # (constant batch, scale batch, input batch, second input's size, last_dim_is_batch, nested scales)
    ((), (), (), None, False, 1),
    ((2,), (2,), (), None, False, 1),
    ((), (2,), (), 4, False, 1),
    ((2,), (), (3, 1), 1, False, 1),
    ((3, 1), (1, 2), (), None, False, 2),
    ((), (), (4, 1, 1), 4, False, 1),
    ((2,), (2,), (), None, True, 1),
    ((), (), (), 3, True, 2),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[str(i) for i in range(len(KERNEL_CASES))])
def test_scaled_constant_evaluates_to_gpytorchs_values_shape_and_gradients(case):
    constant_batch, scale_batch, input_batch, n2, last_dim_is_batch, nested = case
    g = torch.Generator().manual_seed(3)
    x1 = torch.rand(*input_batch, 5, 3, generator=g, dtype=torch.float64)
    x2 = x1 if n2 is None else torch.rand(*input_batch, n2, 3, generator=g, dtype=torch.float64)

    def run():
        kernel = ConstantKernel(batch_shape=torch.Size(constant_batch))
        for _ in range(nested):
            kernel = ScaleKernel(kernel, batch_shape=torch.Size(scale_batch))
        kernel = kernel.double()
        _set_params(kernel)
        kwargs = {"last_dim_is_batch": True} if last_dim_is_batch else {}
        out = kernel(x1, x2, **kwargs).to_dense()
        diag = kernel(x1, x1, diag=True, **kwargs) if n2 is None else out
        (out.sum() + diag.sum()).backward()
        return [out, diag] + [p.grad for p in kernel.parameters()]

    hooked, dense = _both(run)
    _assert_same(hooked, dense, rtol=1e-12, atol=1e-14)
    assert hooked[0].stride()[-2:] == (0, 0) or min(hooked[0].shape[-2:]) == 1  # held expanded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_constant_dtypes_follow_gpytorchs_promotion(dtype):
    x = torch.rand(6, 2, dtype=torch.float64)

    def run():
        kernel = ScaleKernel(ConstantKernel()).to(dtype)
        _set_params(kernel)
        out = [kernel(x.to(dtype)).to_dense(), kernel(x).to_dense()]  # the constant's dtype, then float64 inputs
        out[0].sum().backward()
        return out + [p.grad for p in kernel.parameters()]

    hooked, dense = _both(run)
    # the values exactly; the gradients, sums over n x n entries, to the order of summation
    _assert_same(hooked, dense, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_constant_subclass_with_its_own_matrix_is_evaluated_once():
    calls = []

    class JitteredConstant(ConstantKernel):
        """A constant plus a random diagonal: not an expanded constant."""

        def forward(self, x1, x2, diag=False, last_dim_is_batch=False):
            calls.append(1)
            res = super().forward(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch)
            return res + torch.diag_embed(torch.rand(res.shape[:-1], dtype=res.dtype)) if not diag else res

    x = torch.rand(5, 2, dtype=torch.float64)

    def run():
        kernel = ScaleKernel(ScaleKernel(JitteredConstant())).double()
        _set_params(kernel)
        calls.clear()
        out = kernel(x).to_dense()
        out.sum().backward()
        return [out, torch.tensor(len(calls))] + [p.grad for p in kernel.parameters()]

    hooked, dense = _both(run)
    assert int(hooked[1]) == 1, f"the base kernel was evaluated {int(hooked[1])} times"
    _assert_same(hooked[:1] + hooked[2:], dense[:1] + dense[2:], rtol=1e-12, atol=1e-14)


def test_functional_transforms_and_copies_match_gpytorchs_dense_scale():
    x = torch.rand(6, 2, dtype=torch.float64)
    xs = torch.rand(3, 6, 2, dtype=torch.float64)

    def run():
        kernel = (ScaleKernel(ConstantKernel()) * RBFKernel()).double()
        _set_params(kernel)
        scaled = kernel.kernels[0]  # GPyTorch's products (torch.equal) and RBF kernel refuse functorch transforms
        mapped = torch.vmap(lambda xx: scaled(xx).to_dense())(xs)
        params = dict(scaled.named_parameters())
        grads = torch.func.grad(lambda p: torch.func.functional_call(scaled, p, (x,)).to_dense().pow(2).sum())(params)
        copied = copy.deepcopy(kernel)(x).to_dense()
        pickled = pickle.loads(pickle.dumps(kernel))(x).to_dense()
        return [mapped, *grads.values(), copied, pickled]

    hooked, dense = _both(run)
    _assert_same(hooked, dense, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ an inducing-point kernel with a likelihood of its own
def _sgpr_loss_and_grads(kernel_class, scaled_constant, kernel_noise):
    x, y, _ = _data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    own = gpytorch.likelihoods.GaussianLikelihood().double()  # the kernel's, for its trace term
    inducing = kernel_class(RBFKernel(), x[:6].clone(), own)
    covar = inducing + ScaleKernel(ConstantKernel()) if scaled_constant else inducing
    model = _GP(x, y, likelihood, covar).double()
    with torch.no_grad():
        likelihood.noise = torch.tensor(0.05)
        own.noise = torch.tensor(kernel_noise)
        if scaled_constant:
            covar.kernels[1].outputscale = torch.tensor(2.0)
            covar.kernels[1].base_kernel.constant = torch.tensor([0.35])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("scaled_constant", [False, True], ids=["alone", "plus_scaled_constant"])
@pytest.mark.parametrize("kernel_noise", [0.05, 0.3], ids=["equal_noise", "other_noise"])
def test_inducing_point_kernel_with_its_own_likelihood_gets_its_own_trace_gradient(scaled_constant, kernel_noise):
    chunked = _sgpr_loss_and_grads(ChunkedInducingPointKernel, scaled_constant, kernel_noise)
    with gpytorch_scale_forward():
        reference = _sgpr_loss_and_grads(InducingPointKernel, scaled_constant, kernel_noise)
    _assert_same(chunked, reference, rtol=1e-8, atol=1e-10)


def test_the_models_own_likelihood_still_reuses_the_marginal_likelihoods_gram_matrix():
    from bma_gp.kernels._rbf_gram import RBFRootFactor

    x, y, _ = _data()
    calls = []
    original = RBFRootFactor._gram

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    def run(kernel_class):
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        model = _GP(x, y, likelihood, kernel_class(RBFKernel(), x[:6].clone(), likelihood)).double()
        _set_params(model)
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    RBFRootFactor._gram = counted
    try:
        chunked = run(ChunkedInducingPointKernel)
    finally:
        RBFRootFactor._gram = original
    assert len(calls) == 1  # the trace term took the marginal likelihood's Gram matrix: no second pass
    _assert_same(chunked, run(InducingPointKernel), rtol=1e-8, atol=1e-10)
