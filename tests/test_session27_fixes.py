"""Regression tests for what the session-27 user trials found (operator and model fuzzers).

Each test failed on the code before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from bma_gp import BlockMeanLinearOperator, BlockMeanSumLinearOperator, ClosedFormFallbackWarning, Partition

DT = torch.float64


def _exact_gp(x, y, likelihood, covar):
    """A zero-mean ``ExactGP`` with ``covar`` as its kernel."""
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.covar_module = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(torch.zeros_like(z[:, 0]), self.covar_module(z))

    return GP()


def _expected_mll(model, likelihood, covar, x, y):
    """GPyTorch's exact marginal log likelihood per point, formed densely: ``log N(y; 0, K + noise)`` plus the SGPR
    trace terms that the model's training forward pass registered (GPyTorch adds them)."""
    trace_terms = sum(term.loss() for term in model.added_loss_terms())
    with torch.no_grad():
        K = covar(x).to_dense() + likelihood.noise * torch.eye(len(y), dtype=y.dtype)
    log_density = torch.distributions.MultivariateNormal(torch.zeros_like(y), K).log_prob(y)
    return (log_density + trace_terms) / len(y)


def _sgpr_data(n: int):
    """``(x, y, likelihood, Z)``: ``n`` points on [0, 5], a sine, a Gaussian likelihood and 6 inducing points."""
    import gpytorch

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=gen, dtype=DT) * 5
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    return x, torch.sin(x[:, 0]), likelihood, torch.linspace(0, 5, 6, dtype=DT)[:, None]


def _pd_operator() -> BlockMeanLinearOperator:
    return BlockMeanLinearOperator(
        torch.tensor([1.0, 1.0], dtype=DT),
        torch.tensor([[0.5, 2.0], [2.0, 3.0]], dtype=DT),
        Partition.from_labels(torch.tensor([0, 0, 1])),
    )


def _lu_reference(op, rhs):
    dense = op.to_dense()
    return torch.linalg.solve(dense, rhs), torch.logdet(dense)


@pytest.mark.parametrize("add_diagonal", [False, True])
def test_square_submatrix_with_other_columns_is_solved_as_not_symmetric(add_diagonal):
    # rows (1, 0), columns (1, 2): [[1.5, 2], [0.5, 2]], square but not symmetric; linear_operator's Cholesky read
    # one triangle of it (solve [0.909, -0.727] for [2, -1]); after add_diagonal its AddedDiagLinearOperator did the
    # same without any warning
    A = _pd_operator()[torch.tensor([1, 0]), :][:, torch.tensor([1, 2])]
    if add_diagonal:
        A = A.add_diagonal(torch.tensor(1.0, dtype=DT))
    x = torch.tensor([1.0, -1.0], dtype=DT)
    expected, logdet = _lu_reference(A, x)
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
        solved = A.solve(x)
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
        inv_quad, got_logdet = A.inv_quad_logdet(x, logdet=True)
    torch.testing.assert_close(solved, expected)
    torch.testing.assert_close(inv_quad, x @ expected)
    torch.testing.assert_close(got_logdet, logdet)


def test_the_same_points_on_both_sides_stay_symmetric():
    # a repeated point on both sides is no principal submatrix, but it is symmetric: the generic (Cholesky) path
    M = _pd_operator()
    idx = torch.tensor([2, 0, 0])
    A = M[idx][:, idx].add_diagonal(torch.tensor(0.5, dtype=DT))
    x = torch.tensor([1.0, -1.0, 0.5], dtype=DT)
    with pytest.warns(ClosedFormFallbackWarning) as record:
        solved = A.solve(x)
    assert not any("not symmetric" in str(w.message) for w in record)
    torch.testing.assert_close(solved, torch.linalg.solve(A.to_dense(), x))


def _sum_and_product():
    p = Partition.from_labels(torch.tensor([0, 0, 0]))
    S = BlockMeanSumLinearOperator(
        torch.tensor([0.9, 0.4, 0.6], dtype=DT), torch.tensor([0.9], dtype=DT), partitions=[p], diagonal=[True]
    )
    N = BlockMeanLinearOperator(torch.tensor([0.5], dtype=DT), torch.tensor([1.0], dtype=DT), p, diagonal=True)
    D = DiagLinearOperator(torch.tensor([0.7, 1.1, 0.6], dtype=DT))
    return S, N, D


@pytest.mark.parametrize("build", ["(S@N)*2", "(S@N)*2+D", "(D+S@N)*2", "2*(S@N).mT", "((S@N)*2)*-3"])
def test_multiples_of_a_non_symmetric_product_keep_the_lu_solve(build):
    # (S @ N) * 2 became linear_operator's ConstantMulLinearOperator, solved by Cholesky without a word (75% off)
    S, N, D = _sum_and_product()
    A = {
        "(S@N)*2": lambda: (S @ N) * 2.0,
        "(S@N)*2+D": lambda: (S @ N) * 2.0 + D,
        "(D+S@N)*2": lambda: (D + S @ N) * 2.0,
        "2*(S@N).mT": lambda: (S @ N).mT * 2.0,
        "((S@N)*2)*-3": lambda: ((S @ N) * 2.0) * -3.0,
    }[build]()
    x = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    expected, logdet = _lu_reference(A, x)
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
        solved = A.solve(x)
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
        got_logdet = A.logdet()
    torch.testing.assert_close(solved, expected)
    torch.testing.assert_close(got_logdet, logdet, equal_nan=True)
    with pytest.raises(ValueError, match="not symmetric"):
        A.root_decomposition()


def _weighted_sum():
    return BlockMeanSumLinearOperator(
        torch.tensor([0.4, 0.7], dtype=DT),
        torch.tensor([[0.1]], dtype=DT),
        partitions=[Partition.from_labels(torch.tensor([0, 0]))],
        root=torch.tensor([[0.7], [-0.5]], dtype=DT),
    )


@pytest.mark.parametrize("factor", [0.9, -1.0, torch.tensor(0.5, dtype=DT)])
def test_a_multiple_of_a_negative_multiple_is_one_multiple_of_the_sum(factor):
    # (-S) * 0.9 was linear_operator's ConstantMulLinearOperator around the negative multiple: its eigvalsh clamped
    # the spectrum to [0, 0] (dense [-1.14, -0.69]) without a warning
    S = _weighted_sum()
    A = (-S) * factor
    dense = -S.to_dense() * factor
    torch.testing.assert_close(A.to_dense(), dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        torch.testing.assert_close(A.eigvalsh(), torch.linalg.eigvalsh(dense))
    x = torch.tensor([1.0, -2.0], dtype=DT)
    torch.testing.assert_close(A.solve(x), torch.linalg.solve(dense, x))
    if float(factor) > 0:  # c (-S) with c > 0 is negative definite: roots refuse, as for -S itself
        with pytest.raises(ValueError, match="negative"):
            A.root_decomposition()
    else:  # (-S) * -1 is S: a sum again, with its closed forms
        assert isinstance(A, BlockMeanSumLinearOperator)


def test_the_transpose_of_a_negative_multiple_keeps_its_solves():
    S = _weighted_sum()
    A = (-S).mT
    x = torch.tensor([1.0, -2.0], dtype=DT)
    torch.testing.assert_close(A.solve(x), torch.linalg.solve(-S.to_dense(), x))
    with pytest.raises(ValueError, match="negative"):
        A.root_decomposition()


def test_adding_a_non_symmetric_operator_keeps_the_symmetric_gradient():
    # the docs promise symmetric gradients for symmetric=True; M + N (N symmetric=False) used M's raw B
    p = Partition.from_labels(torch.tensor([0, 1, 1]))
    B = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=DT, requires_grad=True)
    M = BlockMeanLinearOperator(torch.ones(2, dtype=DT), B, p)
    N = BlockMeanLinearOperator(
        torch.ones(2, dtype=DT), torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=DT), p, symmetric=False
    )
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=DT)
    (alone,) = torch.autograd.grad((M.to_dense() * W).sum(), B)
    for total in (M + N, N + M):
        (grad,) = torch.autograd.grad((total.to_dense() * W).sum(), B)
        torch.testing.assert_close(grad, alone)
        torch.testing.assert_close(grad, grad.mT)
    torch.testing.assert_close((M + N).to_dense(), M.to_dense() + N.to_dense())


def test_rows_of_an_operator_times_another_operator():
    # M[rows, :] @ N raised "Can only unsqueeze batch dimensions of BlockMeanLinearOperator"
    M = BlockMeanLinearOperator(torch.ones(2, dtype=DT), torch.eye(2, dtype=DT), Partition.from_labels([0, 0, 1]))
    N = BlockMeanLinearOperator(torch.ones(2, dtype=DT), torch.eye(2, dtype=DT), Partition.from_labels([0, 1, 1]))
    for rows in (torch.tensor([0, 2]), torch.tensor([0, 2, 1])):
        R = M[rows, :]
        torch.testing.assert_close((R @ N).to_dense(), R.to_dense() @ N.to_dense())
    with pytest.raises(ValueError, match="columns"):
        M[torch.tensor([0, 2]), :] @ BlockMeanLinearOperator(
            torch.ones(1, dtype=DT), torch.eye(1, dtype=DT), Partition.from_labels([0, 0])
        )


# ---------------------------------------------------------------------------------------------------- the optimizer


def _functional_setup(shapes, dtype=torch.float64):
    from bma_gp.optim.param_blocks import ParamBlocks

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    blocks = ParamBlocks.build(params, "tensor")
    k = blocks.num_blocks
    h = torch.zeros(blocks.bounds[-1], dtype=dtype)
    stats = {"U": torch.zeros(k, k, dtype=dtype), "w": torch.zeros(k, dtype=dtype), "step": 0}
    return params, blocks, h, stats


def _functional_step(params, grads, h, stats, blocks, fused=False, update_interval=2):
    from bma_gp.optim.functional import block_mean_adagrad

    m = len(params)
    block_mean_adagrad(
        params, grads, h, stats, blocks, None, lr=[0.1] * m, weight_decay=[0.0] * m, maximize=[False] * m,
        eps=1e-10, damping=0.1, update_interval=update_interval, mask=True, check_finite=True, fused=fused,
    )  # fmt: skip


def test_functional_step_without_any_gradient_is_not_counted():
    # the class returns at once when no parameter has a gradient; the functional form counted the step, which moved
    # the root's refresh schedule (update_interval=2: parameters 0.21 apart after four steps)
    from bma_gp.optim import BlockMeanAdagrad

    shapes = [(3,), (2, 2)]
    params, blocks, h, stats = _functional_setup(shapes)
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    opt = BlockMeanAdagrad(ours, lr=0.1, damping=0.1, eps=1e-10, update_interval=2)
    gen = torch.Generator().manual_seed(1)
    sequence = [[torch.randn(s, generator=gen, dtype=DT) for s in shapes] for _ in range(4)]
    sequence[1] = [None, None]
    for grads in sequence:
        before = (h.clone(), stats["U"].clone(), stats["step"], [p.clone() for p in params])
        _functional_step(params, grads, h, stats, blocks)
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
        if grads[0] is None:
            assert stats["step"] == before[2]
            assert torch.equal(h, before[0]) and torch.equal(stats["U"], before[1])
            assert all(torch.equal(p, q) for p, q in zip(params, before[3]))
    assert stats["step"] == opt.global_state["step"] == 3
    for p, q in zip(params, ours):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-14)


def test_fused_functional_step_with_only_empty_gradients():
    # fused=True with no gradient entries (a zero-width layer alone) raised torch.cat's "expected a non-empty list"
    # after pages of compiler logs; it now counts the step as the eager path does and moves nothing
    params, blocks, h, stats = _functional_setup([(3,), (0,), (4,)], torch.float32)
    before = [p.clone() for p in params]
    _functional_step(params, [None, torch.zeros(0), None], h, stats, blocks, fused=True, update_interval=1)
    assert stats["step"] == 1
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert not h.any()


# ---------------------------------------------------------------------------------------------------- inducing points


def _inducing_sum_model(extra: str):
    import gpytorch

    from bma_gp import ChunkedInducingPointKernel

    gen = torch.Generator().manual_seed(0)
    n = 60
    x = torch.rand(n, 1, generator=gen, dtype=DT)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).double()
    sgpr = ChunkedInducingPointKernel(base, torch.linspace(0, 1, 6, dtype=DT)[:, None], likelihood)
    other = {
        "constant": gpytorch.kernels.ConstantKernel(),
        "scaled_constant": gpytorch.kernels.ConstantKernel(),
        "rbf": gpytorch.kernels.RBFKernel(),
        "inducing": ChunkedInducingPointKernel(
            gpytorch.kernels.RBFKernel(), torch.linspace(0, 1, 4, dtype=DT)[:, None], likelihood
        ),
    }[extra].double()
    covar = gpytorch.kernels.ScaleKernel(sgpr + other).double() if extra == "scaled_constant" else sgpr + other

    return _exact_gp(x, y, likelihood, covar).double(), likelihood, covar, x, y


@pytest.mark.parametrize("extra", ["constant", "inducing", "scaled_constant"])
def test_inducing_points_plus_a_family_kernel_train_and_predict_in_closed_form(extra):
    # ChunkedInducingPointKernel + ConstantKernel went to CG and Lanczos past max_cholesky_size without a word; a low
    # rank root plus a one-block term (or a second root) is in the closed-form family; in a ScaleKernel the sum is
    # evaluated first (a root plus GPyTorch's constant matrix), and that took CG with gradients 42% off (warned)
    import gpytorch

    from closed_form_guard import closed_forms_only

    model, likelihood, covar, x, y = _inducing_sum_model(extra)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model.train())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(len(y)):
            value = mll(model(x), y)
        torch.testing.assert_close(value, _expected_mll(model, likelihood, covar, x, y), rtol=1e-7, atol=1e-8)
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(len(y)):
            model.eval()
            x_new = torch.linspace(-0.1, 1.1, 5, dtype=DT)[:, None]
            pred = model(x_new)
            mean, var = pred.mean, pred.variance
    with torch.no_grad():  # in eval mode (an inducing-point kernel's training covariance differs from it: jitter)
        K = covar(x).to_dense() + likelihood.noise * torch.eye(len(y), dtype=DT)
        cross, test = covar(x_new, x).to_dense(), covar(x_new).to_dense()
        torch.testing.assert_close(mean, cross @ torch.linalg.solve(K, y), rtol=1e-6, atol=1e-7)
        expected_var = (test - cross @ torch.linalg.solve(K, cross.mT)).diagonal()
        torch.testing.assert_close(var, expected_var, rtol=1e-6, atol=1e-7)


def test_inducing_points_plus_an_exact_kernel_warns():
    import gpytorch

    model, likelihood, _, x, y = _inducing_sum_model("rbf")
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model.train())
    with gpytorch.settings.max_cholesky_size(0), pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        mll(model(x), y)


# ---------------------------------------------------------------------------------- linear_operator's wrappers


def _product(batch=()):
    gen = torch.Generator().manual_seed(3)
    n = 8

    def factor(k):
        W = torch.randn(*batch, k, k, generator=gen, dtype=DT)
        B = W @ W.mT / k + 0.1 * torch.eye(k, dtype=DT)
        lam = torch.rand(*batch, k, generator=gen, dtype=DT) + 1
        return BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.arange(n) % k))

    return factor(3) @ factor(2)  # a product over two partitions: not symmetric


def _assert_lu(op, dense, what="not symmetric"):
    x = torch.linspace(-1.0, 1.0, dense.shape[-1], dtype=DT)
    with pytest.warns(ClosedFormFallbackWarning, match=what):
        solved = op.solve(x)
    with pytest.warns(ClosedFormFallbackWarning, match=what):
        logdet = op.logdet()
    torch.testing.assert_close(solved, torch.linalg.solve(dense, x))
    torch.testing.assert_close(logdet, torch.logdet(dense), equal_nan=True)


def test_wrappers_of_a_non_symmetric_product_solve_with_lu():
    # MaskedLinearOperator(P, m, m), InterpolatedLinearOperator(P, perm, perm) built directly and P * dense were solved
    # by Cholesky of one triangle (5-31% off), silently
    from linear_operator.operators import DenseLinearOperator, InterpolatedLinearOperator, MaskedLinearOperator

    P = _product()
    Pd = P.to_dense()
    mask = torch.ones(8, dtype=torch.bool)
    mask[[2, 5]] = False
    _assert_lu(MaskedLinearOperator(P, mask, mask), Pd[mask][:, mask])
    perm = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    ones = torch.ones(8, 1, dtype=DT)
    _assert_lu(InterpolatedLinearOperator(P, perm.unsqueeze(-1), ones, perm.unsqueeze(-1), ones), Pd[perm][:, perm])
    X = torch.eye(8, dtype=DT) + 0.1 * torch.ones(8, 8, dtype=DT)
    with pytest.warns(ClosedFormFallbackWarning):  # formed densely: says so when it is formed
        elementwise = P * DenseLinearOperator(X)
    _assert_lu(elementwise, Pd * X)
    _assert_lu(elementwise * 2.0, 2 * Pd * X)
    _assert_lu(elementwise.mT, (Pd * X).mT)


def test_principal_interpolation_built_directly_stays_closed_form():
    from linear_operator.operators import InterpolatedLinearOperator

    M = _pd_operator()
    idx = torch.tensor([[2], [0]])
    ones = torch.ones(2, 1, dtype=DT)
    sub = InterpolatedLinearOperator(M, idx, ones, idx, ones)
    assert isinstance(sub, BlockMeanLinearOperator)
    torch.testing.assert_close(sub.to_dense(), M.to_dense()[[2, 0]][:, [2, 0]])


@pytest.mark.parametrize("layout", ["interleaved", "interleaved+diag", "sum_batch"])
def test_svd_of_layouts_of_non_symmetric_products(layout):
    # linear_operator's svd takes |eigh| of one triangle: 2-4% off for these layouts, silently
    from linear_operator.operators import BlockInterleavedLinearOperator, SumBatchLinearOperator

    P = _product(batch=(2,))
    op = {
        "interleaved": lambda: BlockInterleavedLinearOperator(P),
        "interleaved+diag": lambda: BlockInterleavedLinearOperator(P).add_diagonal(torch.tensor(0.5, dtype=DT)),
        "sum_batch": lambda: SumBatchLinearOperator(P),
    }[layout]()
    with pytest.warns(ClosedFormFallbackWarning, match="svd"):
        _, S, _ = op.svd()
    torch.testing.assert_close(S.sort(descending=True).values, torch.linalg.svdvals(op.to_dense()))


def test_negative_multiple_of_rows_and_columns_transposes_and_adds():
    # (-S)[r][:, c].mT returned the untransposed matrix (a regression of this session), and its add_diagonal solved
    # by Cholesky of one triangle
    S = BlockMeanSumLinearOperator(
        torch.tensor([1.0, 2.0, 1.5, 1.2], dtype=DT),
        torch.tensor([0.5, 0.3], dtype=DT),
        partitions=[Partition.from_labels([0, 0, 1, 1])],
        diagonal=[True],
    )
    A = (-S)[torch.tensor([0, 2])][:, torch.tensor([1, 3])]
    dense = -S.to_dense()[[0, 2]][:, [1, 3]]
    torch.testing.assert_close(A.mT.to_dense(), dense.mT)
    x = torch.tensor([1.0, 2.0], dtype=DT)
    torch.testing.assert_close(A.mT @ x, dense.mT @ x)
    with pytest.warns(ClosedFormFallbackWarning, match="not symmetric"):
        torch.testing.assert_close(A.mT.solve(x), torch.linalg.solve(dense.mT, x))
    shifted = A.add_diagonal(torch.tensor(3.0, dtype=DT))
    _assert_lu(shifted, dense + 3 * torch.eye(2, dtype=DT))


def test_sums_with_a_fallback_stay_fallbacks_in_either_order():
    # D + A, A + dense, A + tensor were linear_operator's plain sums (Cholesky of one triangle, CG past
    # max_cholesky_size) for a non-symmetric A; a fallback sum plus a tensor lost its warning
    from linear_operator.operators import DenseLinearOperator

    M = _pd_operator()
    A = M[torch.tensor([1, 0]), :][:, torch.tensor([1, 2])]
    Ad = A.to_dense()
    d = torch.tensor([1.0, 2.0], dtype=DT)
    for total, dense in [
        (DiagLinearOperator(d) + A, Ad + torch.diag(d)),
        (A + DiagLinearOperator(d), Ad + torch.diag(d)),
        (A + torch.eye(2, dtype=DT), Ad + torch.eye(2, dtype=DT)),
        (DenseLinearOperator(torch.eye(2, dtype=DT)) + A, Ad + torch.eye(2, dtype=DT)),
    ]:
        _assert_lu(total, dense)
    K = DenseLinearOperator(torch.eye(3, dtype=DT) + 0.2)
    with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        (M + K + torch.eye(3, dtype=DT)).inv_quad_logdet(torch.ones(3, 1, dtype=DT), logdet=True)


def test_rows_and_columns_of_a_sum_of_three_terms_solve_with_lu():
    from linear_operator.operators import DenseLinearOperator

    M = BlockMeanLinearOperator(
        torch.tensor([1.0, 1.0], dtype=DT),
        torch.tensor([[0.5, 2.0], [2.0, 3.0]], dtype=DT),
        Partition.from_labels([0, 0, 1, 1]),
    )
    K = DenseLinearOperator(0.5 ** torch.arange(4.0, dtype=DT).sub(torch.arange(4.0, dtype=DT)[:, None]).abs())
    total = M + K + DiagLinearOperator(torch.full((4,), 0.1, dtype=DT))
    rows, cols = torch.tensor([1, 0]), torch.tensor([1, 2])
    _assert_lu(total[rows][:, cols], total.to_dense()[rows][:, cols])


def test_lu_paths_refuse_a_right_hand_side_of_another_dtype():
    A = _pd_operator()[torch.tensor([1, 0]), :][:, torch.tensor([1, 2])]
    with pytest.raises(TypeError, match="dtype"):
        A.solve(torch.ones(2, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        A.inv_quad_logdet(torch.ones(2, dtype=torch.float32), logdet=True)


def test_predictive_covariance_times_a_root():
    # its root was a transposed view, and linear_operator's product of roots views it: "view size is not compatible"
    import gpytorch
    from linear_operator.operators import RootLinearOperator

    from bma_gp import GroupKernel

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (14, 1), generator=gen).to(DT)
    y = torch.randn(14, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.3
    model = _exact_gp(x, y, likelihood, GroupKernel(5)).double().eval()
    x_new = torch.tensor([[3.0], [0.0], [4.0], [1.0], [2.0]], dtype=DT)  # level 4 unobserved
    pred = model(x_new).lazy_covariance_matrix
    R = torch.arange(15.0, dtype=DT).reshape(5, 3) / 15
    rhs = torch.ones(5, 2, dtype=DT)
    torch.testing.assert_close((pred * RootLinearOperator(R)) @ rhs, (pred.to_dense() * (R @ R.mT)) @ rhs)


# ------------------------------------------------------------------------------------------ second attack round


@pytest.mark.parametrize("scaled", [False, True])
def test_multitask_sgpr_predicts_without_iterative_solvers(scaled):
    # ChunkedInducingPointKernel * IndexKernel: the eval-mode training covariance plus noise was linear_operator's plain
    # AddedDiagLinearOperator, solved by CG past max_cholesky_size (variances 21% off), silently
    import gpytorch
    from gpytorch.kernels import IndexKernel, RBFKernel, ScaleKernel

    from bma_gp import ChunkedInducingPointKernel
    from closed_form_guard import closed_forms_only

    gen = torch.Generator().manual_seed(0)
    n = 120
    x = torch.cat([torch.rand(n, 1, generator=gen, dtype=DT) * 10, torch.randint(0, 3, (n, 1), generator=gen)], -1)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    inducing = torch.linspace(0, 10, 8, dtype=DT)[:, None]
    sgpr = ChunkedInducingPointKernel(ScaleKernel(RBFKernel()), inducing, likelihood, active_dims=[0])
    # (in a ScaleKernel the factor was not recognised: CG, variances 306x off with a small noise)
    covar = (ScaleKernel(sgpr) if scaled else sgpr) * IndexKernel(3, rank=1, active_dims=[1])

    model = _exact_gp(x, y, likelihood, covar).double().eval()
    x_new = x[:7] + torch.tensor([0.01, 0.0], dtype=DT)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), closed_forms_only(n):
        pred = model(x_new)
        mean, var = pred.mean, pred.variance
    with torch.no_grad():
        K = covar(x).to_dense() + likelihood.noise * torch.eye(n, dtype=DT)
        cross = covar(x_new, x).to_dense()
        torch.testing.assert_close(mean, cross @ torch.linalg.solve(K, y))
        expected = covar(x_new).diagonal() - (cross * torch.linalg.solve(K, cross.mT).mT).sum(-1)
        torch.testing.assert_close(var, expected)


def test_dense_times_a_non_symmetric_operator_in_either_order():
    from linear_operator.operators import DenseLinearOperator

    P = _product()
    X = DenseLinearOperator(torch.eye(8, dtype=DT) + 0.1)
    with pytest.warns(ClosedFormFallbackWarning):
        left = X * P
    _assert_lu(left, X.to_dense() * P.to_dense())
    A = _pd_operator()[torch.tensor([1, 0]), :][:, torch.tensor([1, 2])]
    with pytest.warns(ClosedFormFallbackWarning):
        indexed = A * DenseLinearOperator(torch.ones(2, 2, dtype=DT) + torch.eye(2, dtype=DT))
    _assert_lu(indexed, A.to_dense() * (torch.ones(2, 2, dtype=DT) + torch.eye(2, dtype=DT)))


def test_interpolated_operator_built_with_keywords_takes_the_hook():
    from linear_operator.operators import InterpolatedLinearOperator

    P = _product()
    idx = torch.tensor([[3], [0], [7]])
    ones = torch.ones(3, 1, dtype=DT)
    op = InterpolatedLinearOperator(
        base_linear_op=P,
        left_interp_indices=idx,
        left_interp_values=ones,
        right_interp_indices=idx,
        right_interp_values=ones,
    )
    _assert_lu(op, P.to_dense()[[3, 0, 7]][:, [3, 0, 7]])


def test_indexed_rows_and_columns_plus_a_root():
    # M[r][:, c] + RootLinearOperator(U) took roots of the non-symmetric submatrix while the sum was built
    from linear_operator.operators import RootLinearOperator

    A = _pd_operator()[torch.tensor([1, 0]), :][:, torch.tensor([1, 2])]
    U = torch.tensor([[1.0], [0.5]], dtype=DT)
    _assert_lu(A + RootLinearOperator(U), A.to_dense() + U @ U.mT)


# ------------------------------------------------------------------------------------------- third attack round


@pytest.mark.parametrize("scaled", [False, True])
def test_gpytorchs_inducing_point_kernel_plus_a_constant(scaled):
    # with bma_gp imported, InducingPointKernel + ConstantKernel raised "'BlockMeanSumLinearOperator' object has no
    # attribute '_linear_op'" (a regression of this session): the evaluated sum became closed form while the likelihood
    # still wrapped the lazy sum in linear_operator's AddedDiagLinearOperator
    import gpytorch
    from gpytorch.kernels import ConstantKernel, InducingPointKernel, RBFKernel, ScaleKernel

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, generator=gen, dtype=DT) * 5
    y = torch.sin(x[:, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    covar = (InducingPointKernel(ScaleKernel(RBFKernel()), x[:6].clone(), likelihood) + ConstantKernel()).double()
    if scaled:
        covar = ScaleKernel(covar).double()

    model = _exact_gp(x, y, likelihood, covar).double().train()
    value = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    torch.testing.assert_close(value, _expected_mll(model, likelihood, covar, x, y), rtol=1e-7, atol=1e-8)
    model.eval()
    x_new = torch.linspace(0, 5, 4, dtype=DT)[:, None]
    with torch.no_grad():
        mean = model(x_new).mean
        K = covar(x).to_dense() + likelihood.noise * torch.eye(50, dtype=DT)
        torch.testing.assert_close(mean, covar(x_new, x).to_dense() @ torch.linalg.solve(K, y), rtol=1e-6, atol=1e-7)


def test_constant_plus_root_in_either_order():
    from linear_operator.operators import DenseLinearOperator, LowRankRootLinearOperator

    U = torch.tensor([[1.0], [0.5], [0.2]], dtype=DT)
    C = DenseLinearOperator(torch.tensor(0.3, dtype=DT).expand(3, 3))
    for total in (LowRankRootLinearOperator(U) + C, C + LowRankRootLinearOperator(U)):
        assert isinstance(total, BlockMeanSumLinearOperator)
        torch.testing.assert_close(total.to_dense(), U @ U.mT + 0.3)


def test_non_symmetric_fallback_plus_a_number_or_a_vector():
    # F + tensor(0.5), F + vector were linear_operator's dense sums, solved by Cholesky of one triangle (6.6% off)
    from linear_operator.operators import DenseLinearOperator

    P = _product()
    with pytest.warns(ClosedFormFallbackWarning):
        F = DenseLinearOperator(torch.eye(8, dtype=DT) + 0.1) * P
    _assert_lu(F + torch.tensor(0.5, dtype=DT), F.to_dense() + 0.5)
    v = torch.linspace(0.0, 1.0, 8, dtype=DT)
    _assert_lu(F + v, F.to_dense() + v)
    # a symmetric fallback plus a vector (added to every row) is not symmetric either
    K = DenseLinearOperator(torch.eye(3, dtype=DT) + 0.2)
    S = _pd_operator() + K
    _assert_lu(S + torch.tensor([0.1, 0.2, 0.3], dtype=DT), S.to_dense() + torch.tensor([0.1, 0.2, 0.3], dtype=DT))


def test_two_gpytorch_inducing_point_kernels_sum_in_closed_form():
    # GPyTorch's InducingPointKernel + InducingPointKernel: linear_operator's add_low_rank factorised the first root's
    # n x n matrix while the kernel was evaluated, and the sum plus noise took the generic path
    import gpytorch
    from gpytorch.kernels import InducingPointKernel, RBFKernel, ScaleKernel

    from closed_form_guard import closed_forms_only

    x, y, likelihood, Z = _sgpr_data(60)
    covar = (
        InducingPointKernel(ScaleKernel(RBFKernel()), Z, likelihood)
        + InducingPointKernel(RBFKernel(), Z[::2].clone(), likelihood)
    ).double()
    model = _exact_gp(x, y, likelihood, covar).double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(60):
            value = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    torch.testing.assert_close(value, _expected_mll(model, likelihood, covar, x, y), rtol=1e-7, atol=1e-8)


def test_fallback_sum_with_noise_has_linear_operators_preconditioner():
    # a fallback sum past min_preconditioning_size ran CG unpreconditioned, where linear_operator's
    # AddedDiagLinearOperator builds a pivoted-Cholesky preconditioner (variances 350x less accurate at n = 3000)
    import linear_operator
    from linear_operator.operators import DenseLinearOperator

    from bma_gp._composition import FallbackSumLinearOperator

    gen = torch.Generator().manual_seed(0)
    n = 300
    t = torch.rand(n, generator=gen, dtype=DT)
    K = DenseLinearOperator(torch.exp(-((t[:, None] - t[None, :]) ** 2) / 0.02))
    M = BlockMeanLinearOperator(
        torch.full((3,), 0.5, dtype=DT), torch.eye(3, dtype=DT), Partition.from_labels(torch.arange(n) % 3)
    )
    total = M + K + DiagLinearOperator(torch.full((n,), 1e-2, dtype=DT))
    assert isinstance(total, FallbackSumLinearOperator)
    with linear_operator.settings.min_preconditioning_size(100):
        precondition, _, _ = total._preconditioner()
        assert precondition is not None
        rhs = torch.randn(n, 1, generator=gen, dtype=DT)
        with (
            warnings.catch_warnings(),
            linear_operator.settings.max_cholesky_size(0),
            linear_operator.settings.cg_tolerance(1e-8),
        ):
            warnings.simplefilter("ignore", ClosedFormFallbackWarning)
            solved = total.solve(rhs)
    torch.testing.assert_close(solved, torch.linalg.solve(total.to_dense(), rhs), rtol=1e-4, atol=1e-6)


def test_gpytorchs_inducing_point_kernel_plus_an_exact_kernel_stays_gpytorchs():
    # with an exact summand the sum is GPyTorch's, as without bma_gp: no warning about block means at small n, and
    # linear_operator's preconditioned CG past max_cholesky_size
    import gpytorch
    from gpytorch.kernels import InducingPointKernel, RBFKernel, ScaleKernel

    x, y, likelihood, Z = _sgpr_data(80)
    covar = (InducingPointKernel(ScaleKernel(RBFKernel()), Z, likelihood) + RBFKernel()).double()
    model = _exact_gp(x, y, likelihood, covar).double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
