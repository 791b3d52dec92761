"""Trial 48: casting a predictive covariance, and models evaluated under ``torch.inference_mode()``.

* ``pred.lazy_covariance_matrix.to(dtype)`` (``half()``, ``float()``, ``type(...)``, ...) cast the prior ``K_**`` and
  the part the data explain separately and subtracted them in the new dtype: with noise 1e-4 a posterior variance of
  2e-6 came out 0 in float16, 0.0039 in bfloat16, and ``.float()`` of a float64 model's covariance was 1 % off. Now
  the difference is formed in the working precision and rounded once, as ``C.to_dense().to(dtype)`` rounds it.
* A model with a ``GroupKernel`` evaluated once under inference mode could not be trained afterwards ("Inference
  tensors cannot be saved for backward": the kernel's kept partitions held inference tensors), and a
  ``ChunkedInducingPointKernel`` model failed its first prediction under inference mode ("Inference tensors do not
  track version counter") and every later one until ``train()``.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupGaussianLikelihood, GroupKernel, Partition
from gp_reference import GP

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


# ---------------------------------------------------------------------------------------------------------- casts
N = 200
LEVELS = 6


def _cast_data():
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.rand(N, generator=g), torch.randint(0, 4, (N,), generator=g).float()], -1).double()
    y = torch.sin(6 * x[:, 0])
    xt = torch.stack([torch.rand(6, generator=g).double(), torch.tensor([0.0, 1, 2, 3, 0, 5]).double()], -1)
    return x, y, xt


def _cast_kernel(kind, x):
    rbf = gpytorch.kernels.RBFKernel(active_dims=[0])
    partition = Partition.from_labels(torch.arange(N) // 2)
    return {
        "bmk": lambda: BlockMeanKernel(rbf, x, partition),
        "group": lambda: GroupKernel(LEVELS, active_dims=[1]),
        "bmk+group": lambda: BlockMeanKernel(rbf, x, partition) + GroupKernel(LEVELS, active_dims=[1]),
        "slope": lambda: GroupKernel(LEVELS, slope=True, active_dims=[1, 0]),
    }[kind]()


def _cast_model(kind, dtype=torch.float64):
    x, y, xt = _cast_data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 1e-4  # well-observed blocks: posterior variances far below the prior's
    model = GP(x, y, likelihood, _cast_kernel(kind, x)).double().to(dtype).eval()
    return model, x.to(dtype), xt.to(dtype)


CASTS = {
    "to(float16)": (lambda c: c.to(torch.float16), torch.float16),
    "half()": (lambda c: c.half(), torch.float16),
    "to(bfloat16)": (lambda c: c.to(torch.bfloat16), torch.bfloat16),
    "type(bfloat16)": (lambda c: c.type(torch.bfloat16), torch.bfloat16),
    "float()": (lambda c: c.float(), torch.float32),
    "type(float32)": (lambda c: c.type(torch.float32), torch.float32),
    "to(device, float32)": (lambda c: c.to(torch.device("cpu"), torch.float32), torch.float32),
    "to(dtype=, device=)": (lambda c: c.to(dtype=torch.float32, device="cpu"), torch.float32),
}

# (kind, where): the operators of both strategies, at new inputs and (the sum strategy's) at the training inputs
WHERE = [
    ("bmk", "new"),  # _PredictiveDifference, a factor's Gram matrix
    ("group", "new"),  # _PredictiveDifference, a one-hot Gram matrix
    ("bmk+group", "new"),  # PredictiveCovarianceLinearOperator
    ("slope", "new"),  # PredictiveCovarianceLinearOperator
    ("bmk+group", "train"),  # TrainingPosteriorLinearOperator
    ("slope", "train"),  # TrainingPosteriorLinearOperator
]


def _covariance(kind, where, dtype=torch.float64):
    model, x, xt = _cast_model(kind, dtype)
    with torch.no_grad():
        return model(xt if where == "new" else x).lazy_covariance_matrix


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("kind,where", WHERE, ids=[f"{k}-{w}" for k, w in WHERE])
def test_a_cast_predictive_covariance_rounds_the_working_precision_difference_once(kind, where, cast):
    C = _covariance(kind, where)
    fn, dtype = CASTS[cast]
    with torch.no_grad():
        cast_op = fn(C)
        assert cast_op.dtype == dtype and type(cast_op) is type(C)
        # a float64 model computes in float64: the cast rounds each of its numbers once
        assert torch.equal(cast_op.diagonal(), C.diagonal().to(dtype))
        assert torch.equal(cast_op.to_dense(), C.to_dense().to(dtype))
        assert torch.equal(cast_op[1, 2].reshape(()), C[1, 2].reshape(()).to(dtype))
        rhs = torch.randn(C.shape[-1], 3, dtype=torch.float64).to(dtype)
        product = cast_op @ rhs
        assert product.dtype == dtype
        want = C.to_dense() @ rhs.double()
        # K_** x - G x cancels: the product's error is the rounding of K_** x, relative to the largest prior entry
        scale = C.to_dense().abs().max() * rhs.double().abs().sum(0).max()
        assert ((product.double() - want).abs().max() / scale).item() < 2 * torch.finfo(dtype).eps


def test_small_posterior_variances_survive_a_cast_to_half_precision():
    """The reported case: a block mean kernel, noise 1e-4, variances about 2e-6 (float16's subnormal range)."""
    C = _covariance("bmk", "new")
    with torch.no_grad():
        exact = C.diagonal()
        assert bool((exact < 1e-4).all())
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cast = C.to(dtype).diagonal().double()
            rounded = exact.to(dtype).double()
            assert torch.equal(cast, rounded)
            assert bool((cast > 0).all())  # was 0.0 everywhere in float16
        torch.testing.assert_close(C.float().diagonal().double(), exact, rtol=1e-7, atol=0)  # was 1 % off


@pytest.mark.parametrize("kind", ["bmk", "group", "bmk+group"])
def test_double_of_a_float32_models_covariance_keeps_its_working_precision(kind):
    """A guard (widening lost nothing before either): the cast operator's float64 numbers are the working
    precision's."""
    C = _covariance(kind, "new", torch.float32)
    with torch.no_grad():
        wide = C.double()
        assert wide.dtype == torch.float64
        # the float64 numbers are the working precision's, which round to the float32 operator's own
        assert torch.equal(wide.diagonal().float(), C.diagonal())
        assert not torch.equal(wide.diagonal(), C.diagonal().double())  # more than float32's digits
        # (the float32 operator of a sum rounds K_**'s entries to float32 before it subtracts; widened, K_** is
        # formed in float64 from the same parameters: the two agree to that rounding, relative to K_**)
        dense = C.to_dense().double()
        atol = 2 * torch.finfo(torch.float32).eps * dense.abs().max().item()
        torch.testing.assert_close(wide.to_dense(), dense, rtol=0, atol=atol)


@pytest.mark.parametrize("kind,where", WHERE, ids=[f"{k}-{w}" for k, w in WHERE])
def test_a_cast_covariance_keeps_its_closed_form_solves_roots_and_structure(kind, where):
    C = _covariance(kind, where)
    with torch.no_grad():
        D = C.to_dense()
        cast = C.float()
        # the likelihood's noise on the cast operator, a joint log-density's solve and log-determinant
        noisy = cast.add_diagonal(torch.tensor(1e-3, dtype=torch.float32))
        assert type(noisy) is type(C) and noisy.dtype == torch.float32
        dense = D + 1e-3 * torch.eye(D.shape[-1], dtype=D.dtype)
        rhs = torch.randn(D.shape[-1], 2, dtype=torch.float64)
        quad, logdet = noisy.inv_quad_logdet(rhs.float(), logdet=True)
        assert quad.dtype == logdet.dtype == torch.float32
        torch.testing.assert_close(quad.double(), (rhs * torch.linalg.solve(dense, rhs)).sum(), rtol=1e-5, atol=0)
        torch.testing.assert_close(logdet.double(), torch.logdet(dense), rtol=1e-5, atol=0)
        # the root a draw takes: exact to float32's rounding of its entries
        root = noisy.root_decomposition().root.to_dense()
        assert root.dtype == torch.float32
        torch.testing.assert_close((root.double() @ root.double().mT), dense, rtol=0, atol=1e-6 * dense.max().item())
        draws = gpytorch.distributions.MultivariateNormal(torch.zeros(D.shape[-1]), noisy).rsample(torch.Size([3]))
        assert draws.dtype == torch.float32 and bool(draws.isfinite().all())
        # batches and indexing keep the output dtype and the working-precision difference
        assert torch.equal(cast.expand(2, *cast.shape).diagonal()[1], cast.diagonal())
        assert torch.equal(cast.unsqueeze(0).diagonal()[0], cast.diagonal())
        sub = cast[..., :3, :3]
        assert sub.dtype == torch.float32
        # the entries of the float64 working precision rounded once: the indexed path and the dense one differ only by
        # float64 rounding (magnified by the solve's conditioning: 7.7e-12 of 1 on an AMD EPYC's BLAS, 0 on Intel's),
        # far below float32's 1.2e-7, which a float32 computation of the small entries would be off by
        torch.testing.assert_close(sub.to_dense(), D[:3, :3].float(), rtol=0, atol=1e-9 * D.abs().max().item())
        # a device alone keeps the dtype
        same = C.to("cpu")
        assert same.dtype == torch.float64 and type(same) is type(C)
        torch.testing.assert_close(same.diagonal(), C.diagonal(), rtol=1e-12, atol=1e-15 * D.abs().max().item())


def test_a_predictive_covariance_refuses_a_cast_to_an_integer_dtype():
    C = _covariance("bmk+group", "new")
    with pytest.raises(TypeError, match="floating-point dtype"):
        C.to(torch.int64)
    with pytest.raises(TypeError, match="floating-point dtype"):
        _covariance("bmk", "new").type(torch.int32)


# -------------------------------------------------------------------------------------------- inference mode
M = 60


def _inference_data():
    g = torch.Generator().manual_seed(2)
    x = torch.stack([torch.rand(M, generator=g), torch.randint(0, 5, (M,), generator=g).float()], -1).double()
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(M, generator=g, dtype=torch.float64)
    xt = torch.stack([torch.rand(7, generator=g).double(), torch.tensor([0.0, 1, 2, 3, 4, 0, 5]).double()], -1)
    return x, y, xt


def _inference_model(kind, noise="gaussian"):
    torch.manual_seed(0)  # a cross-group factor's random initial value: the same in the runs compared
    x, y, xt = _inference_data()
    if noise == "gaussian":
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
    else:
        likelihood = GroupGaussianLikelihood(6, group_dim=1, train_inputs=x)
    partition = Partition.from_labels(torch.arange(M) // 6)

    def base():
        return gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0]))

    def inducing():
        return ChunkedInducingPointKernel(base(), x[:8, :1].clone(), likelihood=likelihood)

    kernel = {
        "group": lambda: GroupKernel(6, active_dims=[1]),
        "group_rank": lambda: GroupKernel(6, rank=1, active_dims=[1]),
        "group_slope": lambda: GroupKernel(6, slope=True, active_dims=[1, 0]),
        "bmk+group": lambda: BlockMeanKernel(base(), x, partition) + GroupKernel(6, active_dims=[1]),
        "group+group": lambda: GroupKernel(6, active_dims=[1]) + GroupKernel(6, rank=1, active_dims=[1]),
        "rbf+group": lambda: base() + GroupKernel(6, active_dims=[1]),
        "bmk*group": lambda: BlockMeanKernel(base(), x, partition) * GroupKernel(6, active_dims=[1]),
        "cipk": inducing,
        "cipk+group": lambda: inducing() + GroupKernel(6, active_dims=[1]),
    }[kind]()
    return GP(x, y, likelihood, kernel).double(), x, y, xt


def _sequence(kind, first, noise="gaussian"):
    """A prediction under ``first`` (inference mode or no_grad), one under no_grad, a training step's gradients, and
    a prediction with gradients with respect to the test inputs: everything each step returns."""
    model, x, y, xt = _inference_model(kind, noise)
    model.eval()
    out = []
    with first():
        post = model.likelihood(model(xt), xt)
        out += [post.mean.clone(), post.variance.clone(), model(x).variance.clone()]
    with torch.no_grad():
        post = model.likelihood(model(xt), xt)
        out += [post.mean, post.variance]
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    loss = -mll(model(x), y)
    loss.backward()
    out += [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.eval()
    xg = xt.clone().requires_grad_(True)
    pred = model(xg)
    (pred.mean.sum() + pred.variance.sum()).backward()
    out += [pred.mean.detach(), pred.variance.detach(), xg.grad]
    return out


@pytest.mark.parametrize(
    "kind",
    ["group", "group_rank", "group_slope", "bmk+group", "group+group", "rbf+group", "bmk*group", "cipk", "cipk+group"],
)
def test_a_model_predicts_trains_and_differentiates_after_a_prediction_under_inference_mode(kind):
    with_inference = _sequence(kind, torch.inference_mode)
    reference = _sequence(kind, torch.no_grad)
    _same(with_inference, reference)


def _same(with_inference, reference):
    assert len(with_inference) == len(reference)
    # nothing after the inference-mode prediction is an inference tensor (None: no gradient reaches group ids)
    assert not any(t is not None and t.is_inference() for t in with_inference[3:])
    for got, want in zip(with_inference, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_group_noise_model_trains_after_a_prediction_under_inference_mode():
    _same(
        _sequence("bmk+group", torch.inference_mode, noise="groups"),
        _sequence("bmk+group", torch.no_grad, noise="groups"),
    )


def test_an_inducing_point_model_predicts_under_no_grad_after_inference_mode_without_train():
    """The reported follow-up: after the first inference-mode prediction failed, every later one did too."""
    model, x, _, xt = _inference_model("cipk+group")
    model.eval()
    with torch.inference_mode():
        first = model(xt).mean.clone()
        again = model(xt).mean.clone()  # the kept root of the training inputs, under inference mode
    with torch.no_grad():
        later = model(xt).mean
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(later, first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the keeper
def test_a_value_kept_under_inference_mode_is_served_under_inference_mode_only():
    from bma_gp.kernels._kept import KeptByInput

    kept = KeptByInput(2)
    calls = []

    def compute():
        calls.append(torch.is_inference_mode_enabled())
        return torch.ones(2) * len(calls)

    x = torch.arange(3.0)
    with torch.inference_mode():
        first = kept(x, compute)
        assert first.is_inference()
        assert kept(x, compute) is first  # served again under inference mode
    normal = kept(x, compute)  # not served outside inference mode: computed again
    assert calls == [True, False] and not normal.is_inference() and len(kept) == 1  # the inference value dropped
    with torch.inference_mode():
        assert kept(x, compute) is normal  # a value made outside inference mode serves both
    assert kept(x, compute) is normal and calls == [True, False]


def test_version_key_reads_no_version_of_an_inference_tensor():
    from bma_gp.kernels._kept import version_key

    t = torch.ones(2)
    assert version_key(t) == (id(t), t._version)
    with torch.inference_mode():
        u = torch.ones(2)
    assert version_key(u) == (id(u), None)
