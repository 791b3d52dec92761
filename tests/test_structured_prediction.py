"""The posterior variances at new inputs without products with ``W`` (the structured diagonal).

With the noisy training covariance ``M = D + Z G Z^T`` and a test-by-training covariance ``F Z^T``, the diagonal
``diag(F W F^T)`` (``W = Z^T M^{-1} Z``) equals ``diag(F G^{-1} F^T) - diag(Z_* H Z_*^T)`` with ``Z_* = F G^{-1}``
and ``H = C^{-1} G`` (the posterior weight at the training inputs). Where every grouping's block of ``F`` has one
nonzero per row over a diagonal ``B_j`` (random intercepts and slopes at seen and unseen levels), ``Z_*`` has one
too, and the diagonal is read from the blocks of the capacitance factorisation as at the training inputs, with no
products with ``W``. The tests compare it with dense algebra on random structures (singleton and unequal blocks,
scattered labels, unseen levels, slopes' joint terms, a root, batches, float32, gradients), check where it must
step aside (a dense block, ``F`` nonzero where ``G`` is zero), and run GPyTorch models through it.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, BlockMeanSumLinearOperator, GroupKernel, Partition
from bma_gp.kernels import sum_prediction_strategy as sps
from closed_form_guard import closed_forms_only
from largest_tensor import LargestTensor
from test_block_mean_sum import random_labels
from test_mixed_posterior import reference
from test_mixed_prediction import CASES, build, closed_form, random_new_inputs

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

DTYPE = torch.float64
N, T = 70, 25
PRIOR = 1000.0  # K_** = PRIOR I: above every F W F^T here, so that no variance is clamped at 0


class Structure:
    """A random sum ``M`` (diagonal groupings, weights, optional root), a test factor ``F`` in blocks and the dense
    reference ``diag(F W F^T)``.

    ``terms``: per grouping ``(k, shares_partition_with, weighted[, dense])``, ``dense``: a dense, singular ``B``
    (rank ``k - 1``) and a dense block of ``F``; ``m``: the root's rank (0: none)."""

    def __init__(self, terms, m=0, batch=(), dtype=DTYPE, seed=0, zero_level=False, requires_grad=False):
        gen = torch.Generator().manual_seed(seed)
        self.partitions, self.labels, self.weights, self.bs = [], [], [], []
        self.dense = [bool(spec[3:] and spec[3]) for spec in terms]
        for (k, shared, weighted, *_), dense in zip(terms, self.dense):
            if shared is None:
                labels = random_labels(N, k, gen)
                partition = Partition.from_labels(labels)
            else:
                labels, partition = self.labels[shared], self.partitions[shared]
            self.labels.append(labels)
            self.partitions.append(partition)
            self.weights.append((torch.rand(N, generator=gen, dtype=DTYPE) * 2 - 1).to(dtype) if weighted else None)
            if dense:
                L = torch.randn(*batch, partition.num_blocks, partition.num_blocks - 1, generator=gen, dtype=DTYPE)
                b = (0.3 * L @ L.mT).to(dtype)
            else:
                b = (0.2 + torch.rand(*batch, partition.num_blocks, generator=gen, dtype=DTYPE)).to(dtype)
            self.bs.append(b)
        if zero_level:  # one level of the first grouping without variance
            self.bs[0][..., 1] = 0.0
        self.d = (0.1 + 0.5 * torch.rand(*batch, N, generator=gen, dtype=DTYPE)).to(dtype)
        self.root = (torch.randn(N, m, generator=gen, dtype=DTYPE) * 0.6).to(dtype) if m else None
        leaves = [*self.bs, self.d] + ([self.root] if m else [])
        for leaf in leaves:
            leaf.requires_grad_(requires_grad)
        self.leaves = leaves
        # the test factor: one nonzero per row (column -1: an unseen level), shared columns for shared partitions
        self.columns, self.values = [], []
        for j, (_, shared, *_) in enumerate(terms):
            k = self.partitions[j].num_blocks
            if shared is None:
                cols = torch.randint(-1, k, (T,), generator=gen)
            else:
                cols = self.columns[shared]
            self.columns.append(cols)
            shape = (*batch, T, k) if self.dense[j] else (*batch, T)
            self.values.append(torch.randn(*shape, generator=gen, dtype=DTYPE).to(dtype).requires_grad_(requires_grad))
        self.left = torch.randn(T, m, generator=gen, dtype=DTYPE).to(dtype).requires_grad_(requires_grad) if m else None
        self.batch, self.dtype = batch, dtype

    def operator(self) -> BlockMeanSumLinearOperator:
        return BlockMeanSumLinearOperator(
            self.d,
            *self.bs,
            partitions=self.partitions,
            weights=self.weights,
            root=self.root,
            diagonal=[not dense for dense in self.dense],
        )

    def blocks(self, one_hot=True):
        out = []
        for j, (cols, vals) in enumerate(zip(self.columns, self.values)):
            if self.dense[j]:
                out.append(vals)
                continue
            block = sps._OneHot(vals, cols, self.partitions[j].num_blocks)
            out.append(block if one_hot else block.dense())
        if self.left is not None:
            out.append(self.left)
        return out

    def dense_reference(self, full=False):
        """``diag(F W F^T)`` (with ``full``: ``F W F^T``) by dense algebra in float64."""
        f64 = torch.float64
        Z = []
        for labels, partition, w in zip(self.labels, self.partitions, self.weights):
            P = torch.nn.functional.one_hot(labels, partition.num_blocks).to(f64)
            Z.append(P if w is None else P * w.to(f64).unsqueeze(-1))
        G = [b.to(f64) if dense else torch.diag_embed(b.to(f64)) for b, dense in zip(self.bs, self.dense)]
        if self.root is not None:
            Z.append(self.root.to(f64))
            G.append(torch.eye(self.root.shape[-1], dtype=f64).expand(*self.batch, -1, -1))
        Z = torch.cat(Z, -1)
        G = torch.block_diag(*G) if not self.batch else torch.stack([torch.block_diag(*g) for g in zip(*G)])
        M = torch.diag_embed(self.d.to(f64)) + Z @ G @ Z.mT
        W = Z.mT @ torch.linalg.solve(M, Z)
        F = torch.cat([sps._dense_block(b).to(f64).expand(*self.batch, T, -1) for b in self.blocks()], -1)
        return F @ W @ F.mT if full else ((F @ W) * F).sum(-1)

    def predictive(self):
        M = self.operator()
        W = sps._ImplicitWeight(M)
        prior = PRIOR * torch.eye(T, dtype=self.dtype).expand(*self.batch, T, T)
        return sps.PredictiveCovarianceLinearOperator.from_blocks(prior, W, self.blocks(), M._sizes())


STRUCTURES = {
    "one_grouping": dict(terms=[(9, None, False)]),
    "one_grouping_root": dict(terms=[(9, None, False)], m=3),
    "crossed": dict(terms=[(9, None, False), (5, None, False)]),
    "crossed_root": dict(terms=[(9, None, False), (5, None, False)], m=2),
    "slope_joint": dict(terms=[(8, None, False), (8, 0, True), (8, 0, True)]),
    "slope_joint_crossed_root": dict(terms=[(8, None, False), (8, 0, True), (4, None, False)], m=2),
    "weighted_rest": dict(terms=[(12, None, False), (5, None, True)], m=1),
    "dense_singular_rest": dict(terms=[(12, None, False), (4, None, False, True)], m=2),
    "slope_joint_dense_rest": dict(terms=[(8, None, False), (8, 0, True), (5, None, True, True)]),
}


def spy_products(monkeypatch):
    """Products with ``W`` raise: the diagonal must not need them."""

    def refuse(*args, **kwargs):
        raise AssertionError("the diagonal applied W as products")

    monkeypatch.setattr(sps, "_weight_matmul", refuse)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_matches_dense_algebra(monkeypatch, name, batch):
    s = Structure(**STRUCTURES[name], batch=batch)
    op = s.predictive()
    spy_products(monkeypatch)
    structured = op._structured_quadratic_diagonal()
    assert structured is not None
    ref = s.dense_reference()
    torch.testing.assert_close(structured, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), PRIOR - ref, rtol=1e-10, atol=1e-12)
    # products and the dense matrix: F W F^T x from the same blocks
    full = s.dense_reference(full=True)
    x = torch.randn(*batch, T, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    product = op._structured_product(x)
    assert product is not None
    torch.testing.assert_close(product, full @ x, rtol=1e-10, atol=1e-12)
    dense = op.to_dense()
    torch.testing.assert_close(dense, PRIOR * torch.eye(T, dtype=DTYPE) - full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(dense, dim1=-2, dim2=-1), op.diagonal(), rtol=1e-10, atol=1e-12)
    rows, cols = torch.tensor([0, 3, 7, 7, 24]), torch.tensor([5, 3, 7, 11, 0])
    if not batch:  # entries (those of a batch member go through products, below)
        torch.testing.assert_close(op[rows, cols], dense[rows, cols], rtol=1e-10, atol=1e-12)
    monkeypatch.undo()
    # the product path and a dense F give the same numbers
    torch.testing.assert_close(op._implicit_quadratic_diagonal(), ref, rtol=1e-10, atol=1e-12)
    if batch:
        torch.testing.assert_close(op[1, rows, cols], dense[1, rows, cols], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["crossed_root", "slope_joint_crossed_root"])
def test_float32_agrees_with_float64(name):
    single = Structure(**STRUCTURES[name], dtype=torch.float32).predictive()
    double = Structure(**STRUCTURES[name]).predictive()
    got = single._structured_quadratic_diagonal()
    assert got is not None and got.dtype == torch.float64  # the working precision
    want = double._structured_quadratic_diagonal()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert single.diagonal().dtype == torch.float32


@pytest.mark.parametrize(
    "name", ["one_grouping_root", "slope_joint_crossed_root", "weighted_rest", "slope_joint_dense_rest"]
)
def test_gradients_match_dense_algebra(name):
    s = Structure(**STRUCTURES[name], requires_grad=True)
    inputs = [*s.leaves, *s.values] + ([s.left] if s.left is not None else [])
    weights = torch.linspace(0.5, 1.5, T, dtype=DTYPE)
    got = torch.autograd.grad((s.predictive()._structured_quadratic_diagonal() * weights).sum(), inputs)
    want = torch.autograd.grad((s.dense_reference() * weights).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    # the product: a quadratic form through it
    x = torch.randn(T, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    product = s.predictive()._structured_product(x)
    assert product is not None
    got = torch.autograd.grad((product * x).sum(), inputs)
    want = torch.autograd.grad(((s.dense_reference(full=True) @ x) * x).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_a_level_without_variance(monkeypatch):
    """``b_c = 0`` (a group variance fitted to 0): no inverse of ``G`` is taken, so the structured forms hold
    whether ``F`` is 0 there or not."""
    spy_products(monkeypatch)
    s = Structure(terms=[(9, None, False), (5, None, False)], m=2, zero_level=True)
    s.values[0] = torch.where(s.columns[0] == 1, 0.0, s.values[0].detach())
    for nonzero in (False, True):
        if nonzero:
            s.columns[0][0], s.values[0][0] = 1, 0.7  # F nonzero where b = 0
        op = s.predictive()
        assert op._structured() is not None
        torch.testing.assert_close(op.diagonal(), PRIOR - s.dense_reference(), rtol=1e-10, atol=1e-12)
        full = PRIOR * torch.eye(T, dtype=DTYPE) - s.dense_reference(full=True)
        torch.testing.assert_close(op.to_dense(), full, rtol=1e-10, atol=1e-12)


def test_steps_aside_for_a_dense_eliminated_block_and_split_columns():
    """Only the eliminated grouping's block must have one nonzero per row (the others may be dense)."""
    s = Structure(**STRUCTURES["crossed_root"])
    M = s.operator()
    elim = M._capacitance().elim
    for dense_terms in ([0, 1, 2], [elim], [t for t in range(3) if t != elim]):
        blocks = s.blocks()
        for i in dense_terms:
            blocks[i] = sps._dense_block(blocks[i])
        op = sps.PredictiveCovarianceLinearOperator.from_blocks(
            PRIOR * torch.eye(T, dtype=DTYPE), sps._ImplicitWeight(M), blocks, M._sizes()
        )
        assert (op._structured() is None) == (elim in dense_terms)
        torch.testing.assert_close(op.diagonal(), PRIOR - s.dense_reference(), rtol=1e-10, atol=1e-12)
    # joint terms whose blocks put a row in different columns
    s = Structure(**STRUCTURES["slope_joint"])
    s.columns[1] = (s.columns[0] + 1).clamp_max(s.partitions[0].num_blocks - 1)
    assert s.predictive()._structured_quadratic_diagonal() is None
    torch.testing.assert_close(s.predictive().diagonal(), PRIOR - s.dense_reference(), rtol=1e-10, atol=1e-12)


def test_size_limit_steps_aside(monkeypatch):
    monkeypatch.setattr(sps, "_STRUCTURED_MAX_ELEMENTS", 0)
    s = Structure(**STRUCTURES["crossed"])
    op = s.predictive()
    assert op._structured_quadratic_diagonal() is None
    torch.testing.assert_close(op.diagonal(), PRIOR - s.dense_reference(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- GPyTorch models
@pytest.mark.parametrize("case", CASES)
def test_models_take_it_and_match_gpytorch(monkeypatch, case):
    """Every mixed model of test_mixed_prediction with the weight applied as products: the variances, products
    and the full covariance come from the structured forms (no product with ``W``) and equal GPyTorch's dense
    computation."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    model, x, y = build(case)
    model.eval()
    xt = random_new_inputs(40)
    calls = []
    real = sps.PredictiveCovarianceLinearOperator._structured_quadratic_diagonal
    monkeypatch.setattr(
        sps.PredictiveCovarianceLinearOperator,
        "_structured_quadratic_diagonal",
        lambda self: calls.append(1) or real(self),
    )
    n = x.shape[0]
    with closed_forms_only(n), gpytorch.settings.max_cholesky_size(0), torch.no_grad():
        post = model(xt)
        covar = post.lazy_covariance_matrix
        assert isinstance(covar.W, sps._ImplicitWeight)
        with monkeypatch.context() as m:
            m.setattr(sps, "_weight_matmul", lambda *a: (_ for _ in ()).throw(AssertionError("products")))
            variance, mean, dense = post.variance, post.mean, post.covariance_matrix
            rhs = torch.randn(xt.shape[0], 2, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
            product = covar @ rhs
    assert calls
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(product, ref_cov @ rhs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dense", ["rank_group", "block_mean_kernel"])
def test_dense_kernels_beside_a_grouping(monkeypatch, dense):
    """A grouping with a dense ``B`` (``GroupKernel(rank=1)`` with few groups) or a ``BlockMeanKernel`` crosses the
    test points densely; beside an eliminated random intercept the structured forms still apply, and match
    GPyTorch."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    model, x, y = build("crossed")
    if dense == "rank_group":
        other = GroupKernel(7, rank=1, active_dims=[1]).to(DTYPE)
    else:
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(active_dims=[0])).to(DTYPE)
        base.base_kernel.lengthscale = 0.3
        other = BlockMeanKernel(base, x, Partition.from_labels((x[:, 0] * 6).long().clamp_max(5)))
    model.covar_module = other + model.covar_module.kernels[1]
    model.eval()
    xt = random_new_inputs(30)
    spy_products(monkeypatch)
    _, (mean, dense_cov, diag, _), _ = closed_form(model, xt, False)
    assert model(xt).lazy_covariance_matrix._structured() is not None
    monkeypatch.undo()
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense_cov, ref_cov, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["crossed", "slope"])
def test_many_levels_no_test_by_levels_matrix(kind):
    """5000 groups, 3000 new points (half at unseen groups): no tensor of ``t k / 4`` elements (the cross
    covariances of intercepts and slopes are held as one value per row), against dense algebra on a subset."""
    n, k, t = 20_000, 5000, 3000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, k - 10, (n,), generator=g)
    x = torch.stack([ids.to(DTYPE), torch.randint(0, 30, (n,), generator=g).to(DTYPE), torch.rand(n, dtype=DTYPE)], -1)
    y = torch.randn(k, generator=g, dtype=DTYPE)[ids] + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    if kind == "crossed":
        covar = GroupKernel(k, active_dims=[0]) + GroupKernel(30, active_dims=[1])
    else:
        covar = GroupKernel(k, slope=True, active_dims=[0, 2])
        covar.corr = 0.4
    likelihood = gpytorch.likelihoods.GaussianLikelihood()

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().to(DTYPE).eval()
    xt = x[torch.randint(0, n, (t,), generator=g)].clone()
    xt[: t // 2, 0] = torch.randint(k - 10, k, (t // 2,), generator=g).to(DTYPE)
    with torch.no_grad():
        _ = model(xt[:2]).mean  # the training factorisation, outside the watch
        mode = LargestTensor()
        with closed_forms_only(n), mode:
            post = model(xt)
            mean, variance = post.mean, post.variance
    assert isinstance(post.lazy_covariance_matrix.W, sps._ImplicitWeight)
    assert mode.largest < t * k // 4, f"{mode.where} returned a tensor of {mode.largest} elements"
    assert bool((variance > 0).all()) and bool(torch.isfinite(mean).all())
    # a subset against the dense product path
    with torch.no_grad():
        sub = post.lazy_covariance_matrix
        rows = torch.arange(0, t, 97)
        F = torch.cat(
            [
                sps._dense_block(b)[rows] if b is not None else torch.zeros(rows.numel(), size, dtype=DTYPE)
                for b, size in zip(sub.blocks, sub.sizes)
            ],
            -1,
        )
        want = (F * sub.W._matmul(F.mT).mT).sum(-1)
        got = sub._structured_quadratic_diagonal()[rows]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("name", ["crossed_root", "slope_joint_dense_rest"])
def test_row_chunks(monkeypatch, name, batch):
    """``[V, F_r]`` is formed a few rows at a time: the same diagonal, products and entries."""
    monkeypatch.setattr(sps, "_DIAG_CHUNK", 16)
    s = Structure(**STRUCTURES[name], batch=batch)
    op = s.predictive()
    parts = op._structured()
    assert parts is not None and len(parts._chunks()) >= 3
    spy_products(monkeypatch)
    full = s.dense_reference(full=True)
    torch.testing.assert_close(op.diagonal(), PRIOR - torch.diagonal(full, dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)
    dense = op.to_dense()
    torch.testing.assert_close(dense, PRIOR * torch.eye(T, dtype=DTYPE) - full, rtol=1e-10, atol=1e-12)
    if not batch:
        rows, cols = torch.tensor([[0, 3], [7, 24]]), torch.tensor([[5, 3], [11, 0]])
        torch.testing.assert_close(op[rows, cols], dense[rows, cols], rtol=1e-10, atol=1e-12)


def test_pieces_made_without_gradients_are_not_reused_with_them():
    """A diagonal asked for under ``no_grad`` first, then with gradients: the second carries the gradient."""
    s = Structure(**STRUCTURES["crossed_root"], requires_grad=True)
    op = s.predictive()
    with torch.no_grad():
        first = op.diagonal()
    second = op.diagonal()
    torch.testing.assert_close(first, second.detach(), rtol=0, atol=0)
    assert second.requires_grad
    (grad,) = torch.autograd.grad(second.sum(), [s.d])
    (want,) = torch.autograd.grad(-s.dense_reference().sum(), [s.d])
    torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-10)


def test_float32_posterior_draws_at_the_training_inputs_allow_float32_rounding():
    """A float32 BlockMeanKernel model with per-point noise: the posterior at the training inputs is positive
    semidefinite (float32 rounding puts its smallest dense eigenvalue at -5e-6), yet a draw raised 'not positive
    definite: the eigenvalue -0.000124 of I + F G F' (user trial): the test allowed float64 rounding only, where
    the blocks carry float32's. Draws now work and have the posterior's covariance up to float32 rounding."""
    from bma_gp import BlockMeanKernel

    n, k = 2000, 200
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, 2, generator=gen)
    Y = torch.sin(3 * X[:, 0]) + 0.1 * torch.randn(n, generator=gen)
    labels = (X[:, 0] * k).long().clamp_max(k - 1)
    noise = 0.05 + 0.1 * torch.rand(n, generator=gen)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
            self.covar_module = BlockMeanKernel(base, x, Partition.from_labels(labels))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = GP(X, Y, gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)).float().eval()
    with torch.no_grad():
        post = model(X)
        draws = post.rsample(torch.Size([2]))
        root = post.lazy_covariance_matrix.root_decomposition().root.to_dense()
    assert draws.shape == (2, n) and bool(torch.isfinite(draws).all())
    dense = post.covariance_matrix.double()
    torch.testing.assert_close((root.double() @ root.double().mT), dense, rtol=0, atol=2e-4)
