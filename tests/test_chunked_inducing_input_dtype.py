"""ChunkedInducingPointKernel takes inputs of the dtypes GPyTorch's InducingPointKernel takes.

GPyTorch's kernels promote their inputs: float32, float16, integer or boolean ``x`` with a float64 kernel (inducing
points and base kernel parameters) give float64 values, integer ``x`` with a float32 kernel float32 ones. The chunked
kernel crashed on them (float32 ``x``: "Expected out tensor to have dtype double, but got float" from the RBF root's
preallocated blocks; integer ``x``: ``torch.finfo`` of an integer dtype when sizing the row blocks). Every number here
(kernel matrix, marginal log-likelihood with the SGPR trace term, its gradients, predictions and their gradients) is
compared with GPyTorch's class on the same parameters, for the RBF root held lazily in training (``_RBFGram``), the
formed RBF root (prediction) and the generic path (any base kernel, differentiated by recomputation).

A float64 ``x`` with a float32 kernel fails in GPyTorch's class ("expected m1 and m2 to have the same dtype"): here it
is a ``TypeError`` that names the input.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import ChunkedInducingPointKernel, GroupKernel
from bma_gp._precision import core_dtype
from bma_gp.kernels import _rbf_gram
from bma_gp.kernels._rbf_root import rbf_root

torch.set_num_threads(1)

F64, F32 = torch.float64, torch.float32
IPK = gpytorch.kernels.InducingPointKernel

# inducing points off the integer lattice the inputs lie on: no input coincides with one (the gradient of a distance
# near 0 is rounding, and differs between any two formulas)
Z = torch.tensor([[-2.5, -1.5], [-0.5, 0.5], [1.5, -0.5], [2.5, 2.5], [0.5, -2.5]], dtype=F64)
N_GROUPS = 5


def data(n=40, seed=0):
    """Integer-valued inputs (exact in every dtype below): two continuous columns and a group id."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randint(-3, 4, (n, 2), generator=gen), torch.randint(N_GROUPS, (n, 1), generator=gen)], -1)
    y = torch.sin(x[:, 0].to(F64)) + 0.3 * torch.randn(n, generator=gen, dtype=F64)
    test = torch.cat([torch.randint(-4, 5, (7, 2), generator=gen), torch.randint(N_GROUPS, (7, 1), generator=gen)], -1)
    return x.to(F64), y, test.to(F64)


def base_kernel(name):
    if name == "rbf":  # no ScaleKernel: the RBF root with scale None
        kernel = gpytorch.kernels.RBFKernel()
        kernel.lengthscale = 1.7
        return kernel
    if name == "matern":
        inner = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=2)
    else:  # scale_rbf, generic_rbf
        inner = gpytorch.kernels.RBFKernel(ard_num_dims=2)
    inner.lengthscale = torch.tensor([[1.3, 2.1]])
    kernel = gpytorch.kernels.ScaleKernel(inner)
    kernel.outputscale = 0.8
    return kernel


def make_kernel(cls, name, likelihood):
    kernel = cls(base_kernel(name), Z.clone(), likelihood, active_dims=(0, 1))
    if name == "generic_rbf":  # an RBF base kernel through the generic path: recomputation under autograd
        kernel.analytic_rbf = False
    return kernel


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, cls, name, groups):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        covar = make_kernel(cls, name, likelihood)
        self.covar_module = covar + GroupKernel(N_GROUPS, active_dims=[2]) if groups else covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def models(x, y, param_dtype, name, groups=False):
    """GPyTorch's model and the chunked one, on the same parameters."""
    pair = []
    for cls in (IPK, ChunkedInducingPointKernel):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        likelihood.noise = 0.1
        pair.append(Model(x, y.to(param_dtype), likelihood, cls, name, groups).to(param_dtype))
    pair[1].load_state_dict(pair[0].state_dict())
    return pair


def assert_matches(actual, expected, param_dtype, msg=""):
    """Same dtype, and the same numbers to the kernel's precision (relative to the largest entry)."""
    assert actual.dtype == expected.dtype, f"{msg}: {actual.dtype} != {expected.dtype}"
    rtol = 1e-9 if param_dtype == F64 else 2e-4
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=msg)


RBF_KERNELS = ["scale_rbf", "rbf", "generic_rbf"]
ALL_KERNELS = [*RBF_KERNELS, "matern"]
# (parameters' dtype, inputs' dtype) that GPyTorch's class accepts; integer and boolean inputs only for RBF kernels
# (GPyTorch's MaternKernel takes the mean of x, which integers refuse: see the test below)
FLOAT_INPUTS = [(F64, F64), (F64, F32), (F64, torch.float16), (F32, F32), (F32, torch.float16)]
INT_INPUTS = [(F64, torch.int64), (F64, torch.bool), (F32, torch.int64), (F32, torch.int32)]
CASES = [(k, p, d) for k in ALL_KERNELS for p, d in FLOAT_INPUTS]
CASES += [(k, p, d) for k in RBF_KERNELS for p, d in INT_INPUTS]


def case_id(case):
    name, p, d = case
    return f"{name}-{str(p)[6:]}params-{str(d)[6:]}x"


def kernel_pair(name, param_dtype, mode):
    """GPyTorch's InducingPointKernel and this kernel with the same parameters, in ``param_dtype`` and ``mode``."""
    ref, ours = (
        make_kernel(cls, name, gpytorch.likelihoods.GaussianLikelihood()).to(param_dtype)
        for cls in (IPK, ChunkedInducingPointKernel)
    )
    ours.load_state_dict(ref.state_dict())
    for kernel in (ref, ours):
        kernel.train(mode == "train")
    return ref, ours


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_kernel_values_match_inducing_point_kernel(case, mode):
    name, param_dtype, x_dtype = case
    x, _, test = data()
    xs = [x.to(x_dtype), test.to(x_dtype)]
    ref, ours = kernel_pair(name, param_dtype, mode)
    expected, actual = ref(xs[0]).to_dense(), ours(xs[0]).to_dense()
    assert expected.dtype == param_dtype
    assert_matches(actual, expected, param_dtype, "K(x, x)")
    assert_matches(ours(xs[0], diag=True), ref(xs[0], diag=True), param_dtype, "diag")
    if mode == "eval":  # the t x n cross covariance of a prediction
        assert_matches(ours(xs[1], xs[0]).to_dense(), ref(xs[1], xs[0]).to_dense(), param_dtype, "K(test, x)")


def _train_step(model, x, y):
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = -mll(model(x), y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def with_groups(case):
    """A GroupKernel beside the SGPR kernel, except for boolean inputs (GroupKernel refuses boolean group ids)."""
    return case[2] != torch.bool


@pytest.mark.parametrize(
    "case, groups",
    [(case, False) for case in CASES] + [(case, True) for case in CASES if with_groups(case)],
    ids=[f"sgpr-{case_id(c)}" for c in CASES] + [f"sgpr+groups-{case_id(c)}" for c in CASES if with_groups(c)],
)
def test_marginal_likelihood_and_gradients_match(case, groups, monkeypatch):
    name, param_dtype, x_dtype = case
    x, y, _ = data()
    x = x.to(x_dtype)
    ref, ours = models(x, y, param_dtype, name, groups)
    ref_loss, ref_grads = _train_step(ref, x, y.to(param_dtype))

    grams = []  # the lazy RBF root's closed-form products, and the dtype they run in
    apply = _rbf_gram._RBFGram.apply
    monkeypatch.setattr(_rbf_gram._RBFGram, "apply", lambda *a: grams.append(a[4].dtype) or apply(*a))
    loss, grads = _train_step(ours, x, y.to(param_dtype))
    if name in ("scale_rbf", "rbf"):
        # in float64 for float32 parameters: the float32 model's inputs, the products in float64 (session 28)
        assert grams and set(grams) == {core_dtype(param_dtype)}, "the training step must take the lazy RBF root"
    else:
        assert not grams
    assert_matches(loss, ref_loss, param_dtype, "marginal log-likelihood")
    assert grads.keys() == ref_grads.keys() and any("inducing_points" in k for k in grads)
    for key, g in ref_grads.items():
        assert_matches(grads[key], g, param_dtype, key)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_predictions_and_their_gradients_match(case):
    name, param_dtype, x_dtype = case
    x, y, test = data()
    x, test = x.to(x_dtype), test.to(x_dtype)
    ref, ours = models(x, y, param_dtype, name, groups=with_groups(case))
    results = []
    for model in (ref, ours):
        model.eval()
        t = test.clone().requires_grad_(test.is_floating_point())
        pred = model.likelihood(model(t))
        mean, var = pred.mean, pred.variance
        (mean.sum() + var.sum()).backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results.append((mean.detach(), var.detach(), grads, t.grad))
    (m0, v0, g0, t0), (m1, v1, g1, t1) = results
    assert m0.dtype == param_dtype
    assert_matches(m1, m0, param_dtype, "mean")
    assert_matches(v1, v0, param_dtype, "variance")
    assert g1.keys() == g0.keys() and any("inducing_points" in k for k in g1)
    for key, g in g0.items():
        assert_matches(g1[key], g, param_dtype, key)
    if test.is_floating_point():  # the gradient of the test inputs comes back in their own dtype
        assert t1 is not None and t1.dtype == x_dtype
        assert_matches(t1, t0, param_dtype if x_dtype != torch.float16 else F32, "test inputs")


@pytest.mark.parametrize("name", ALL_KERNELS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inputs_wider_than_the_kernel_raise_a_type_error_naming_them(name, mode):
    """float64 inputs of a float32 kernel: GPyTorch's class fails in a matrix product; here a TypeError names them."""
    x, _, test = data()
    ref, ours = kernel_pair(name, F32, mode)
    with pytest.raises(RuntimeError, match="same dtype"):
        ref(x).to_dense()
    with pytest.raises(TypeError, match=r"x1 has dtype torch.float64, but the kernel computes in torch.float32"):
        ours(x).to_dense()
    with pytest.raises(TypeError, match=r"x1 has dtype torch.complex64"):
        ours(x.to(torch.complex64)).to_dense()
    if mode == "eval":  # a prediction: float32 training inputs, float64 test inputs (either side)
        with pytest.raises(TypeError, match=r"x1 has dtype torch.float64.*x1.to\(torch.float32\)"):
            ours(test, x.float()).to_dense()
        with pytest.raises(TypeError, match=r"x2 has dtype torch.float64.*model.to\(torch.float64\)"):
            ours(test.float(), x).to_dense()


def test_a_float32_model_with_float64_test_inputs_raises_a_type_error():
    x, y, test = data()
    _, ours = models(x.float(), y, F32, "scale_rbf", groups=True)
    _train_step(ours, x.float(), y.float())
    ours.eval()
    with pytest.raises(TypeError, match="x1 has dtype torch.float64"):
        ours(test)


@pytest.mark.parametrize("x_dtype", [torch.int64, torch.bool])
def test_integer_inputs_a_base_kernel_refuses_fail_as_in_gpytorch(x_dtype):
    """GPyTorch's MaternKernel refuses integer inputs (it takes their mean); the chunked kernel hands them to the
    base kernel unchanged, as GPyTorch's InducingPointKernel does, and fails with the same error."""
    x, _, _ = data()
    errors = []
    for cls in (IPK, ChunkedInducingPointKernel):
        kernel = make_kernel(cls, "matern", gpytorch.likelihoods.GaussianLikelihood()).double()
        with pytest.raises(RuntimeError) as info:
            kernel(x.to(x_dtype)).to_dense()
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_trial_repro_float32_and_integer_inputs_of_a_float64_kernel():
    torch.manual_seed(0)
    x = torch.randn(12, 2, dtype=F64)
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    for xx in (x.float(), x.round().long()):
        expected = IPK(base, x[:4].clone(), likelihood)(xx).to_dense()
        actual = ChunkedInducingPointKernel(base, x[:4].clone(), likelihood)(xx).to_dense()
        assert actual.dtype == expected.dtype == F64
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_scale", [True, False])
def test_rbf_root_promotes_mixed_dtypes(with_scale):
    """float32 or integer rows with float64 inducing points and parameters: the float64 root of the promoted rows,
    and gradients in each input's own dtype."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, generator=gen, dtype=F64)
    inducing = torch.randn(4, 2, generator=gen, dtype=F64).requires_grad_()
    inv_root = (torch.eye(4, dtype=F64) + 0.1 * torch.randn(4, 4, generator=gen, dtype=F64)).triu().requires_grad_()
    lengthscale = torch.tensor([[0.9, 1.4]], dtype=F64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True) if with_scale else None
    params = [t for t in (inducing, inv_root, lengthscale, scale) if t is not None]
    for rows_in in (x.float().requires_grad_(), x.round().long()):
        wide = rows_in.detach().double().requires_grad_(rows_in.requires_grad)
        out = []
        for xx in (rows_in, wide):
            root, diag = rbf_root(4, xx, inducing, inv_root, lengthscale, scale)
            assert root.dtype == diag.dtype == F64
            loss = (root * torch.linspace(-1, 1, root.numel(), dtype=F64).reshape(root.shape)).sum() + diag.sum()
            inputs = [*([xx] if xx.requires_grad else []), *params]
            out.append((root, diag, torch.autograd.grad(loss, inputs)))
        (r0, d0, g0), (r1, d1, g1) = out
        torch.testing.assert_close(r0, r1, rtol=0, atol=0)
        torch.testing.assert_close(d0, d1, rtol=0, atol=0)
        if rows_in.requires_grad:
            assert g0[0].dtype == F32
            torch.testing.assert_close(g0[0], g1[0].float())
            g0, g1 = g0[1:], g1[1:]
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
