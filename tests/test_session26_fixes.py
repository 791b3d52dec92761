"""Fixes from session 26 (user trials and known gaps), each checked against dense float64."""

from __future__ import annotations

import math

import pytest
import torch

from bma_gp import settings
from largest_tensor import LargestTensor
from test_sum_inverse_diagonal_elimination import build, dense_inverse_diagonal

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------ root_inv_decomposition forms its q x q core only when applied
def test_inverse_root_diagonal_needs_only_the_eliminated_rest():
    """``root_inv_decomposition().diagonal()`` of a sum past ``max_capacitance_size`` in q but not in the rest after
    elimination: the closed-form diagonal (it built the root's q x q eigendecomposition first, and raised)."""
    op, dense, _ = build(sizes=(30, 4), root=2)
    assert op.capacitance_size > 20 >= 4 + 2
    with settings.max_capacitance_size(20):
        root = op.root_inv_decomposition()
        got = root.diagonal()
        with pytest.raises(ValueError, match="max_capacitance_size"):  # the products need the q x q core
            root.root @ torch.ones(op.shape[-1], 1, dtype=op.dtype)
    torch.testing.assert_close(got, dense_inverse_diagonal(dense()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_lazy_inverse_root_products_match_the_dense_inverse(batch):
    op, dense, _ = build(batch=batch, root=2)
    M = dense()
    R = op.root_inv_decomposition().root
    assert R.shape == M.shape
    eye = torch.eye(M.shape[-1], dtype=M.dtype).expand_as(M)
    R_dense = R @ eye
    torch.testing.assert_close(R_dense @ R_dense.mT, torch.cholesky_inverse(torch.linalg.cholesky(M)), atol=1e-10,
                               rtol=1e-9)  # fmt: skip
    torch.testing.assert_close(R.mT @ eye, R_dense.mT)  # the transposed root is the transposed matrix
    torch.testing.assert_close(R.to_dense(), R_dense)


def test_inverse_root_diagonal_allocates_nothing_q_by_q():
    """Two crossed intercepts of 3,000 and 10 levels: reading the inverse root's diagonal allocates nothing of
    q^2 = 9 million entries (the root's core was q x q)."""
    from bma_gp import BlockMeanSumLinearOperator, Partition

    n, k1, k2 = 12000, 3000, 10
    gen = torch.Generator().manual_seed(0)
    l1, l2 = torch.randint(0, k1, (n,), generator=gen), torch.randint(0, k2, (n,), generator=gen)
    l1[:k1] = torch.arange(k1)
    op = BlockMeanSumLinearOperator(
        torch.full((n,), 0.5, dtype=torch.float64),
        torch.rand(k1, generator=gen, dtype=torch.float64) + 0.1,
        torch.rand(k2, generator=gen, dtype=torch.float64) + 0.1,
        partitions=[Partition.from_labels(l1), Partition.from_labels(l2)],
        diagonal=[True, True],
    )
    with LargestTensor() as largest:
        diag = op.root_inv_decomposition().diagonal()
    assert largest.largest < (k1 + k2) ** 2 // 4, (largest.largest, largest.where)
    torch.testing.assert_close(diag, op._inverse_diagonal())
    assert bool((diag > 0).all()) and bool((diag < 2).all())  # 1/d = 2 minus a positive correction


# ------------------------------------------------ predictive covariances times a constant, and sums of them
import gpytorch  # noqa: E402
from gpytorch.distributions import MultivariateNormal  # noqa: E402

from bma_gp import BlockMeanLinearOperator, GroupKernel, Partition  # noqa: E402
from closed_form_guard import closed_forms_only  # noqa: E402
from gp_reference import GP, grouped_data  # noqa: E402


def _models():
    x, y, _, gen = grouped_data(n=60)
    kernels = {
        "group": lambda: GroupKernel(7, active_dims=[2]),
        "group + group": lambda: GroupKernel(7, active_dims=[2]) + GroupKernel(7, active_dims=[2], rank=1),
    }
    return x, y, gen, kernels


def _predictive(kind, at_training=False):
    x, y, gen, kernels = _models()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.3
    model = GP(x, y, lik, kernels[kind]().double()).double().eval()
    t = 40
    xt = x[:t] if at_training else torch.cat(
        [torch.randn(t, 2, generator=gen, dtype=torch.float64), torch.randint(0, 7, (t, 1), generator=gen).double()],
        -1,
    )  # fmt: skip
    return model, xt


CASES_PRED = [("group", False), ("group + group", False), ("group", True)]


@pytest.mark.parametrize("kind,at_training", CASES_PRED)
def test_scaled_and_summed_predictive_distributions_are_exact(kind, at_training):
    """``pred * c`` (an outcome transform's un-standardisation) and ``pred + pred`` keep exact solves: past
    ``max_cholesky_size`` linear_operator's ConstantMul / Sum took CG and stochastic Lanczos (0.09-0.9 nats off)."""
    import warnings

    model, xt = _predictive(kind, at_training)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        pred = model.likelihood(model(xt))
        other = model(xt)
    C, C2 = pred.covariance_matrix, other.covariance_matrix
    r = torch.randn(xt.shape[0], dtype=torch.float64)
    cases = {
        "pred * 3": (pred * 3, 3 * pred.mean, 9 * C),
        "pred / 2": (pred / 2, pred.mean / 2, C / 4),
        "pred + pred": (pred + pred, 2 * pred.mean, 2 * C),
        "pred + other": (pred + other, pred.mean + other.mean, C + C2),
        "(pred * 3) + other": (pred * 3 + other, 3 * pred.mean + other.mean, 9 * C + C2),
    }
    for name, (dist, mean, cov) in cases.items():
        ref = torch.distributions.MultivariateNormal(mean, cov)
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(xt.shape[0] + 1):
            got = dist.log_prob(r)
            solved = dist.lazy_covariance_matrix.solve(r)
            root = dist.lazy_covariance_matrix.root_decomposition().root.to_dense()
            part = dist.lazy_covariance_matrix[..., :10, :10].logdet()
        torch.testing.assert_close(got, ref.log_prob(r), rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(solved, torch.linalg.solve(cov, r), rtol=1e-9, atol=1e-10, msg=name)
        torch.testing.assert_close(root @ root.mT, cov, rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(part, torch.logdet(cov[:10, :10]), rtol=1e-10, atol=1e-10, msg=name)


def test_scaled_predictive_gradients_and_refusals():
    model, xt = _predictive("group + group")
    r = torch.randn(xt.shape[0], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    pred = model.likelihood(model(xt))
    with gpytorch.settings.max_cholesky_size(0), closed_forms_only(xt.shape[0] + 1):
        got = torch.autograd.grad((pred * 2.5).log_prob(r), params, allow_unused=True)
    pred = model.likelihood(model(xt))
    ref = torch.distributions.MultivariateNormal(2.5 * pred.mean, 6.25 * pred.covariance_matrix).log_prob(r)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    checked = 0
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
            checked += 1
    assert checked >= 2
    with torch.no_grad():
        pred = model.likelihood(model(xt))
        negative = pred.lazy_covariance_matrix * -1.0
        torch.testing.assert_close(negative.solve(r), torch.linalg.solve(-pred.covariance_matrix, r))
        with pytest.raises(ValueError, match="constant <= 0 is not a covariance"):
            negative.logdet()
        with pytest.raises(ValueError, match="constant <= 0"):
            negative.root_decomposition()


def test_predictive_plus_an_unknown_matrix_warns_where_solved():
    """A matrix not known to be symmetric (a dense tensor): no exact sum, but a sum that says it leaves the closed
    forms where it is solved (linear_operator's took CG silently)."""
    from linear_operator.operators import DenseLinearOperator

    from bma_gp import ClosedFormFallbackWarning

    model, xt = _predictive("group")
    with torch.no_grad():
        C = model(xt).lazy_covariance_matrix
        extra = torch.eye(xt.shape[0], dtype=torch.float64) * 0.1
        total = C + DenseLinearOperator(extra)
        with pytest.warns(ClosedFormFallbackWarning):
            total.logdet()
        block = BlockMeanLinearOperator(torch.full((4,), 0.2, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                                        Partition.from_labels(torch.arange(xt.shape[0]) % 4))  # fmt: skip
        exact = C + block
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(xt.shape[0] + 1):
            got = exact.logdet()
        torch.testing.assert_close(got, torch.logdet(C.to_dense() + block.to_dense()), rtol=1e-10, atol=1e-10)


# ------------------------------------------------ sums without a closed form say so, however they are nested
def test_fallback_sum_nested_in_a_plain_sum_still_warns():
    """GPyTorch's variational strategy (eval mode) builds SumLinearOperator(K.add_jitter(), MatmulLinearOperator(...))
    around K = exact kernel + group kernel (a fallback sum): the outer sum was solved without the warning."""
    from linear_operator.operators import DenseLinearOperator, MatmulLinearOperator, SumLinearOperator

    from bma_gp import ClosedFormFallbackWarning

    x, y, _, gen = grouped_data(n=50)
    kernel = gpytorch.kernels.RBFKernel(active_dims=[0]).double() + GroupKernel(5, active_dims=[2]).double()
    U = 0.1 * torch.randn(50, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        K = kernel(x).add_jitter(1e-6)
        S = SumLinearOperator(K, MatmulLinearOperator(DenseLinearOperator(U), DenseLinearOperator(U.mT)))
        S = S.add_diagonal(torch.tensor(0.1, dtype=torch.float64))
        with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
            quad, logdet = S.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
    D = S.to_dense()
    torch.testing.assert_close(logdet, torch.logdet(D), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(quad, y @ torch.linalg.solve(D, y), rtol=1e-8, atol=1e-8)


def test_lcm_kernel_over_block_means_warns_where_solved():
    """LCMKernel over BlockMeanKernels of different partitions plus a MultitaskGaussianLikelihood's noise: no closed
    form, and now a warning (linear_operator's AddedDiagLinearOperator factorised it or took CG silently). Over one
    partition the sum is closed form since session 30 (tests/test_lcm_block_mean.py)."""
    from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning

    gen = torch.Generator().manual_seed(0)
    n, T = 40, 2
    X = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    Y = torch.randn(n, T, generator=gen, dtype=torch.float64)
    part = Partition.from_labels(torch.arange(n) % 6)

    class MGP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(X, Y, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, rank=0))
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=T)
            self.covar_module = gpytorch.kernels.LCMKernel(
                [BlockMeanKernel(gpytorch.kernels.RBFKernel(), X, part),
                 BlockMeanKernel(gpytorch.kernels.MaternKernel(), X, Partition.from_labels(torch.arange(n) % 4))],
                num_tasks=T, rank=1,
            )  # fmt: skip

        def forward(self, x):
            return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = MGP().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with pytest.warns(ClosedFormFallbackWarning, match="KroneckerProductLinearOperator"):
        value = mll(model(X), Y)
    with torch.no_grad():
        out = model.likelihood(model(X))
        r = (Y - out.mean).reshape(-1)
        D = out.covariance_matrix
    dense = -0.5 * (r @ torch.linalg.solve(D, r) + torch.logdet(D) + r.numel() * math.log(2 * math.pi)) / r.numel()
    torch.testing.assert_close(value.detach(), dense, rtol=1e-8, atol=1e-8)  # dense below max_cholesky_size


# ------------------------------------------------ from_independent_mvns: the members' closed forms
def _independent_members(n=90):
    gen = torch.Generator().manual_seed(5)
    p1 = Partition.from_labels(torch.randint(0, 7, (n,), generator=gen))
    p2 = Partition.from_labels(torch.arange(n) % 4)
    W = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    M1 = BlockMeanLinearOperator(torch.rand(7, generator=gen, dtype=torch.float64) + 0.5, W @ W.T / 7, p1)
    M2 = BlockMeanLinearOperator(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5,
                                 torch.rand(4, generator=gen, dtype=torch.float64), p2, diagonal=True)  # fmt: skip
    M3 = M1 + M2  # a sum
    return [M1, M2, M3]


def test_from_independent_mvns_of_block_means_is_solved_member_by_member():
    """MultitaskMultivariateNormal.from_independent_mvns of block mean MVNs: log_prob, solves and draws from the
    members' closed forms (the concatenation took CG, stochastic Lanczos and a rank-100 Lanczos root past
    max_cholesky_size); the same numbers as GPyTorch's dense path."""
    from gpytorch.distributions import MultitaskMultivariateNormal

    from bma_gp._independent_cat import IndependentCatLinearOperator

    members = _independent_members()
    n = members[0].shape[-1]
    zero = torch.zeros(n, dtype=torch.float64)
    mt = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M) for M in members])
    assert isinstance(mt.lazy_covariance_matrix.base_linear_op, IndependentCatLinearOperator)
    dense = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M.to_dense()) for M in members])
    y = torch.randn(n, len(members), dtype=torch.float64)
    with gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
        got = mt.log_prob(y)
        C = mt.lazy_covariance_matrix
        rhs = torch.randn(C.shape[-1], 2, dtype=torch.float64)
        solved = C.solve(rhs)
        root = C.root_decomposition().root
        inv_root = C.root_inv_decomposition().root
    with gpytorch.settings.max_cholesky_size(10**6):
        want = dense.log_prob(y)
    D = C.to_dense()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(solved, torch.linalg.solve(D, rhs), rtol=1e-9, atol=1e-10)
    R, Ri = root.to_dense(), inv_root.to_dense()
    torch.testing.assert_close(R @ R.mT, D, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Ri @ Ri.mT, torch.linalg.inv(D), rtol=1e-8, atol=1e-10)
    draws = mt.rsample(torch.Size([3]))
    assert draws.shape == (3, n, len(members))


def test_independent_mvns_plus_noise_and_predictive_members():
    """A per-task noise added to the concatenation (add_diagonal) keeps the members apart; predictive covariances of
    two group models as members are solved by their own exact factorisations."""
    from gpytorch.distributions import MultitaskMultivariateNormal

    members = _independent_members()
    n = members[0].shape[-1]
    zero = torch.zeros(n, dtype=torch.float64)
    mt = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M) for M in members])
    noise = torch.rand(len(members) * n, dtype=torch.float64) + 0.1
    noisy = mt.lazy_covariance_matrix.add_diagonal(noise)
    with gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
        got = noisy.logdet()
    torch.testing.assert_close(got, torch.logdet(mt.lazy_covariance_matrix.to_dense() + torch.diag(noise)),
                               rtol=1e-10, atol=1e-10)  # fmt: skip

    model_a, xt = _predictive("group")
    model_b, _ = _predictive("group + group")
    with torch.no_grad():
        preds = [model_a.likelihood(model_a(xt)), model_b.likelihood(model_b(xt))]
        mt = MultitaskMultivariateNormal.from_independent_mvns(preds)
        y = torch.randn(xt.shape[0], 2, dtype=torch.float64)
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(xt.shape[0] + 1):
            got = mt.log_prob(y)
        dense = MultitaskMultivariateNormal.from_independent_mvns(
            [MultivariateNormal(p.mean, p.covariance_matrix) for p in preds]
        )
        with gpytorch.settings.max_cholesky_size(10**6):
            want = dense.log_prob(y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------ torch.compile, module inspection, torch.func
def test_prediction_strategy_hook_under_torch_compile():
    """The prediction-strategy hook read a lazily cached covariance inside Dynamo's trace: every compiled
    prediction, plain GPyTorch models' included, stopped with "Guard failed on the same frame it was created" once
    bma_gp was imported. GPyTorch's ``prediction_strategy`` (what ``ExactGP`` calls on its first prediction) compiled
    on its own, a plain RBF prior: the strategy GPyTorch would choose, and the traced tensor work unchanged."""
    from gpytorch.models import exact_prediction_strategies

    x = torch.rand(20, 1, dtype=torch.float64)
    y = torch.sin(x[:, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    prior = MultivariateNormal(torch.zeros(20, dtype=torch.float64), gpytorch.kernels.RBFKernel().double()(x))

    def build(z):
        return z + 1, exact_prediction_strategies.prediction_strategy((x,), prior, y, likelihood)

    out, strategy = torch.compile(build, backend="eager")(torch.ones(2, dtype=torch.float64))
    assert type(strategy).__name__ == "DefaultPredictionStrategy"
    torch.testing.assert_close(out, torch.full((2,), 2.0, dtype=torch.float64))


def test_group_kernel_properties_it_lacks_read_as_absent():
    """``covar_matrix`` of a random-slope kernel and ``slope_covar`` of an intercept kernel: still a
    NotImplementedError with the reason, and an AttributeError, so that hasattr and torch.jit.trace's module
    inspection read them as absent (they raised through hasattr)."""
    intercept, slope = GroupKernel(4), GroupKernel(4, slope=True)
    assert not hasattr(intercept, "slope_covar") and hasattr(intercept, "covar_matrix")
    assert not hasattr(slope, "covar_matrix") and hasattr(slope, "slope_covar")
    with pytest.raises(NotImplementedError, match="slope_covar needs slope=True"):
        _ = intercept.slope_covar
    with pytest.raises(NotImplementedError, match="no covariance over group ids alone"):
        _ = slope.covar_matrix
    assert getattr(intercept, "slope_covar", None) is None


def test_torch_func_grad_through_chunked_inducing_points_names_the_kernel():
    from torch.func import functional_call, grad

    from bma_gp.kernels import ChunkedInducingPointKernel

    x = torch.rand(30, 2, dtype=torch.float64)
    kernel = ChunkedInducingPointKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double(), x[:5].clone(),
        gpytorch.likelihoods.GaussianLikelihood().double(),
    )  # fmt: skip
    kernel.train()
    params = {name: p.detach().clone() for name, p in kernel.named_parameters()}

    def logdet(p):
        return functional_call(kernel, p, (x,)).add_jitter(1e-3).to_dense().logdet()

    with pytest.raises(NotImplementedError, match="ChunkedInducingPointKernel .* reverse mode only"):
        grad(logdet)(params)
    value = logdet({name: p.clone().requires_grad_() for name, p in params.items()})
    assert torch.isfinite(value)  # reverse mode itself is unchanged


# ------------------------------------------------ cat_rows warns first; the CLI's SGPR predicts in large chunks
def test_cat_rows_warns_before_forming_dense_roots(monkeypatch):
    from linear_operator.operators import LinearOperator

    from bma_gp import ClosedFormFallbackWarning

    op = _independent_members(40)[0]

    def refuse(self, *args, **kwargs):  # what linear_operator's roots do at n = 1e5: an allocation refused
        raise RuntimeError("can't allocate")

    monkeypatch.setattr(LinearOperator, "cat_rows", refuse)
    cross, new = torch.zeros(2, 40, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    with pytest.warns(ClosedFormFallbackWarning, match="generate_roots=False"), pytest.raises(RuntimeError):
        op.cat_rows(cross, new)
    with pytest.warns(ClosedFormFallbackWarning) as record, pytest.raises(RuntimeError):
        op.cat_rows(cross, new, generate_roots=False, generate_inv_roots=False)
    assert "generate_roots=False" not in str(record[0].message)


def test_cli_sgpr_predicts_in_large_chunks():
    """GPyTorch's InducingPointKernel repeats its O(n m) training-side work per call: the CLI's SGPR predicts 8,192
    rows a call (it took 1,000: 24 s for 40,000 rows at n = 160,000), with the same numbers."""
    from bma_gp.cli import models

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0])
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    kernel = gpytorch.kernels.InducingPointKernel(
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double(), x[:16].clone(), lik
    )
    model = models.GP(x, y, lik, kernel).double()
    xt = torch.rand(2500, 1, generator=gen, dtype=torch.float64)
    models.predict(model, xt[:5])  # the first call builds the prediction strategy (a training-only call)
    calls = []
    original = model.forward
    model.forward = lambda z: (calls.append(z.shape[-2]), original(z))[1]
    mean, var = models.predict(model, xt, models.PREDICT_CHUNK["sgpr"])
    assert len(calls) == 1  # 2,500 rows in one call (the training rows ride along, GPyTorch's joint call)
    ref_mean, ref_var = models.predict(model, xt, 1000)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-8, atol=1e-10)
    assert models.PREDICT_CHUNK["blockmean"] == models.PREDICT_CHUNK["exact"] == 1000


# ------------------------------------------------ second round: inverse roots, either order, constants per batch
def test_predictive_inverse_roots_and_sums_in_either_order_are_exact():
    """root_inv_decomposition of a predictive covariance took a Lanczos root of rank 100 past max_cholesky_size (99.5%
    off); ``D + pred``, ``M + pred``, ``(pred * 2).add_jitter(c)`` and a constant per batch entry left the exact
    solves for CG."""
    import warnings

    from linear_operator.operators import DiagLinearOperator

    model, xt = _predictive("group + group")
    t = xt.shape[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        pred = model.likelihood(model(xt))
    C = pred.lazy_covariance_matrix
    D = pred.covariance_matrix
    d = torch.rand(t, dtype=torch.float64) + 0.1
    block = BlockMeanLinearOperator(torch.full((4,), 0.2, dtype=torch.float64), torch.eye(4, dtype=torch.float64),
                                    Partition.from_labels(torch.arange(t) % 4))  # fmt: skip
    constants = torch.tensor([2.0, 3.0], dtype=torch.float64).view(2, 1, 1)
    cases = {
        "C": (C, D),
        "C * 2": (C * 2, 2 * D),
        "D + C": (DiagLinearOperator(d) + C, D + torch.diag(d)),
        "M + C": (block + C, D + block.to_dense()),
        "(C * 2).add_jitter": ((C * 2).add_jitter(0.05), 2 * D + 0.05 * torch.eye(t, dtype=torch.float64)),
        "(C + C).add_diagonal": ((C + C).add_diagonal(d), 2 * D + torch.diag(d)),
        "C * constants": (C * constants, constants * D),
    }
    r = torch.randn(t, 1, dtype=torch.float64)
    for name, (op, dense) in cases.items():
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(t + 1):
            logdet = op.logdet()
            solved = op.solve(r)
            inv_root = op.root_inv_decomposition().root.to_dense()
        torch.testing.assert_close(logdet, torch.logdet(dense), rtol=1e-10, atol=1e-10, msg=name)
        torch.testing.assert_close(solved, torch.linalg.solve(dense, r), rtol=1e-9, atol=1e-10, msg=name)
        torch.testing.assert_close(inv_root @ inv_root.mT, torch.linalg.inv(dense), rtol=1e-8, atol=1e-10, msg=name)


def test_independent_mvns_times_a_constant_and_with_noise_stay_exact():
    from gpytorch.distributions import MultitaskMultivariateNormal
    from linear_operator.operators import DiagLinearOperator

    from bma_gp._independent_cat import IndependentCatLinearOperator

    members = _independent_members()
    n = members[0].shape[-1]
    zero = torch.zeros(n, dtype=torch.float64)
    mt = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M) for M in members])
    dense = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M.to_dense()) for M in members])
    y = torch.randn(n, len(members), dtype=torch.float64)
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=len(members), rank=0).double()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
        scaled = (mt * 2).log_prob(y)
        noisy = lik(mt * 2).log_prob(y)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        torch.testing.assert_close(scaled, (dense * 2).log_prob(y), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(noisy, lik(dense * 2).log_prob(y), rtol=1e-10, atol=1e-10)
    cat = mt.lazy_covariance_matrix.base_linear_op
    assert isinstance(cat, IndependentCatLinearOperator)
    d = torch.rand(*cat.shape[:-1], dtype=torch.float64) + 0.1
    for name, op, want in [
        ("D + cat", DiagLinearOperator(d) + cat, cat.to_dense() + torch.diag_embed(d)),
        ("cat * 2", cat * 2, 2 * cat.to_dense()),
    ]:
        assert isinstance(op, IndependentCatLinearOperator), name
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
            got = op.logdet()
        torch.testing.assert_close(got, torch.logdet(want), rtol=1e-10, atol=1e-10, msg=name)


# ------------------------------------------------ a sum times a task kernel: repeated backward through predictions
def test_repeated_backward_through_predictions_of_a_sum_times_a_task_kernel():
    """The held training covariance kept the task factor's Cholesky rows (row weights) with their graph: the second
    ``backward`` through a prediction of ``(GroupKernel + GroupKernel) * IndexKernel`` failed ("Trying to backward
    through the graph a second time"), as an acquisition loop on the candidates does."""
    from bma_gp import BlockMeanSumLinearOperator

    gen = torch.Generator().manual_seed(0)
    n = 60
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    codes = [torch.arange(n) % 5, torch.arange(n) // 3 % 4, torch.arange(n) // 7 % 2]
    X = torch.cat([x, *(c.to(torch.float64).unsqueeze(-1) for c in codes)], -1)
    y = torch.sin(5 * x[:, 0])
    kernel = (GroupKernel(5, active_dims=[2]) + GroupKernel(4, active_dims=[3])) * gpytorch.kernels.IndexKernel(
        2, rank=1, active_dims=[4]
    )
    model = GP(X, y, gpytorch.likelihoods.GaussianLikelihood(), kernel).double().eval()
    ids = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [4.0, 1.0, 1.0]], dtype=torch.float64)
    for _ in range(3):
        continuous = torch.rand(3, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
        out = model(torch.cat([continuous, ids], -1))
        loss = out.mean.sum() + out.variance.sum()
        loss.backward()  # raised on the second pass
        assert bool(torch.isfinite(loss))
    op = model.likelihood(model.forward(X)).lazy_covariance_matrix
    op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
    assert isinstance(op, BlockMeanSumLinearOperator)
    assert any(w is not None and w.requires_grad for w in op.weights)
    assert not any(w is not None and w.requires_grad for w in op.detach().weights)  # the weights detached too


# ------------------------------------------------ a random slope alone times a task kernel predicts in closed form
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("second", ["IndexKernel", "GroupKernel"])
def test_random_slope_times_a_task_kernel_predicts_in_closed_form(dtype, second):
    """``GroupKernel(slope=True) * IndexKernel`` (no other summand) formed its t x n cross covariance densely at new
    inputs (with a warning), and GPyTorch's ``K_*x alpha`` in float32 lost the means entirely (-3.2 for 0.17 with the
    covariate in calendar years); it now reads the training product's columns, as a sum times a task kernel does."""
    import warnings

    from bma_gp import ClosedFormFallbackWarning

    gen = torch.Generator().manual_seed(3)
    n, k = 120, 8
    ids = torch.arange(n) % k
    tasks = torch.randint(0, 3, (n,), generator=gen)
    cov = 2010.0 + torch.randint(0, 20, (n,), generator=gen).to(torch.float64)
    x = torch.stack([cov, ids.to(torch.float64), tasks.to(torch.float64)], -1)
    y = 0.1 * ids + 0.02 * (cov - 2010.0) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    slope = GroupKernel(k + 1, slope=True, active_dims=[1, 0])
    factor = (
        gpytorch.kernels.IndexKernel(3, rank=1, active_dims=[2])
        if second == "IndexKernel"
        else GroupKernel(3, rank=1, active_dims=[2])
    )
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), slope * factor).double()
    slope.var = torch.tensor([0.7, 0.01], dtype=torch.float64)
    slope.corr = 0.3
    model.likelihood.noise = 0.05
    model = model.to(dtype).eval()
    xt = torch.tensor([[2015.5, 1.0, 0.0], [2025.0, 3.0, 2.0], [2012.0, 7.0, 1.0], [2001.0, 8.0, 1.0]], dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        out = model(xt)
        mean, var = out.mean, out.variance
    with torch.no_grad():
        K = model.covar_module
        xd, xtd = x.to(torch.float64), xt.to(torch.float64)
        Kxx = K(xd, xd).to_dense().double() + float(model.likelihood.noise) * torch.eye(n, dtype=torch.float64)
        Ksx = K(xtd, xd).to_dense().double()
        Kss = K(xtd, xtd).to_dense().double()
        r = y.double() - float(model.mean_module.constant)
        want_mean = float(model.mean_module.constant) + Ksx @ torch.linalg.solve(Kxx, r)
        want_var = Kss.diagonal() - (Ksx * torch.linalg.solve(Kxx, Ksx.mT).mT).sum(-1)
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(mean.double(), want_mean, **tol)
    # the model's own K_** rounds at eps K_** (about 4e4 here, the covariate squared times the slope's variance): a
    # variance below that is known to that absolute level only, in float32 as in any float32 GP
    floor = 8 * torch.finfo(dtype).eps * float(Kss.diagonal().abs().max())
    torch.testing.assert_close(var.double(), want_var, rtol=tol["rtol"] * 10, atol=max(tol["atol"] * 10, floor))


def test_independent_cat_plus_a_batched_diagonal_or_another_cat():
    """A diagonal with an extra batch dimension, or a second concatenation over the same members, went to
    linear_operator's sum and CG without a word (8-27 nats off); anything else now warns where it is solved."""
    from gpytorch.distributions import MultitaskMultivariateNormal
    from linear_operator.operators import DenseLinearOperator, DiagLinearOperator

    from bma_gp import ClosedFormFallbackWarning
    from bma_gp._independent_cat import IndependentCatLinearOperator

    members = _independent_members()
    n = members[0].shape[-1]
    zero = torch.zeros(n, dtype=torch.float64)
    mt = MultitaskMultivariateNormal.from_independent_mvns([MultivariateNormal(zero, M) for M in members])
    cat = mt.lazy_covariance_matrix.base_linear_op
    d = torch.rand(2, *cat.shape[:-1], dtype=torch.float64) + 0.1
    for name, op, want in [
        ("cat + D(2, t, n)", cat + DiagLinearOperator(d), cat.to_dense() + torch.diag_embed(d)),
        ("cat + cat", cat + cat, 2 * cat.to_dense()),
    ]:
        assert isinstance(op, IndependentCatLinearOperator), name
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
            got = op.logdet()
        torch.testing.assert_close(got, torch.logdet(want), rtol=1e-10, atol=1e-10, msg=name)
    other = cat + DenseLinearOperator(0.1 * torch.eye(n, dtype=torch.float64).expand(*cat.shape))
    with pytest.warns(ClosedFormFallbackWarning):
        other.logdet()


def test_posterior_at_training_inputs_plus_a_negative_diagonal():
    """The posterior at the training inputs hands a diagonal with negative entries to the generic add_diagonal,
    which after this session's exact sums came back to its own (a RecursionError): now one exact dense sum."""
    x, y, _, _ = grouped_data(n=40)
    kernel = GroupKernel(7, active_dims=[2]) + GroupKernel(7, active_dims=[2], rank=1)
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood().double(), kernel.double()).double().eval()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        C = model(x).lazy_covariance_matrix
        shifted = C.add_diagonal(torch.tensor(-1e-3, dtype=torch.float64))
        want = C.to_dense() - 1e-3 * torch.eye(40, dtype=torch.float64)
        torch.testing.assert_close(shifted.to_dense(), want, rtol=1e-12, atol=1e-12)
        off = C[..., :5, 5:10].add_diagonal(torch.tensor(1.0, dtype=torch.float64))  # not a covariance: generic
        torch.testing.assert_close(off.to_dense(), C.to_dense()[:5, 5:10] + torch.eye(5, dtype=torch.float64))
