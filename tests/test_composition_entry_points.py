"""Entry points that reached linear_operator's generic operators without a word, and the words of two errors.

* ``add_diagonal``, ``add_jitter`` and ``W * c + D`` of a task layout (``BlockDiagLinearOperator`` /
  ``BlockInterleavedLinearOperator`` of a batch of block mean operators or sums) gave an ``AddedDiagLinearOperator``
  whose solve and log-determinant took a dense Cholesky of the whole ``t n x t n`` matrix, where ``W + D`` already gave
  the closed-form layout;
* ``cat_rows`` of a block mean operator or sum gave a ``CatLinearOperator`` whose solves and log-determinants factorise
  the dense ``(n + m) x (n + m)`` matrix, with no ``ClosedFormFallbackWarning``;
* ``prod(dim)`` of a batch of products over two partitions raised an error about ``root_decomposition``;
* a bad ``left_tensor`` in ``solve(rhs, left_tensor)`` gave torch's raw matmul error.
"""

import warnings

import pytest
import torch
from linear_operator.operators import (
    BlockDiagLinearOperator,
    BlockInterleavedLinearOperator,
    CatLinearOperator,
    ConstantMulLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
)

from bma_gp import (
    BlockMeanBlockDiagLinearOperator,
    BlockMeanInterleavedLinearOperator,
    BlockMeanLinearOperator,
    ClosedFormFallbackWarning,
    Partition,
)
from bma_gp._composition import FallbackSumLinearOperator
from closed_form_guard import closed_forms_only

torch.set_num_threads(1)
DT = torch.float64
N = 14  # points per task; the sums' capacitances are 4 + 3 = 7 < N, so closed_forms_only(N) allows them
T = 3
P1 = Partition.from_labels(torch.tensor([2, 0, 2, 1, 0, 2, 3] * 2))
P2 = Partition.from_labels(torch.tensor([0, 1, 1, 0, 2, 1, 1] * 2))


def _bm(partition, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    k = partition.num_blocks
    lam = torch.rand(*batch, k, dtype=DT, generator=g) + 0.5
    A = torch.randn(*batch, k, k, dtype=DT, generator=g)
    return BlockMeanLinearOperator(lam, A @ A.mT / k + 0.1 * torch.eye(k, dtype=DT), partition)


def _sum(batch=(), seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    noise = DiagLinearOperator(torch.rand(*batch, N, dtype=DT, generator=g) + 0.3)
    return _bm(P1, batch, seed) + _bm(P2, batch, seed + 1) + noise


def _base(kind, batch):
    return _bm(P1, batch) if kind == "block_mean" else _sum(batch)


def _assert_matches_dense(op, outer, rhs_cols=2):
    """solve, logdet and inv_quad_logdet of ``op`` against those of DenseLinearOperator(op.to_dense())."""
    g = torch.Generator().manual_seed(7)
    size = op.shape[-1]
    rhs = torch.randn(*outer, size, rhs_cols, dtype=DT, generator=g)
    dense = DenseLinearOperator(op.to_dense())
    return rhs, dense, (dense.solve(rhs), dense.logdet(), dense.inv_quad_logdet(rhs, logdet=True))


_LAYOUTS = [
    (BlockDiagLinearOperator, BlockMeanBlockDiagLinearOperator),
    (BlockInterleavedLinearOperator, BlockMeanInterleavedLinearOperator),
]


def _entry_points(outer):
    g = torch.Generator().manual_seed(3)
    d = torch.rand(*outer, T * N, dtype=DT, generator=g) + 0.5
    ways = {
        "add_diagonal(d)": lambda W: W.add_diagonal(d),
        "add_diagonal(scalar)": lambda W: W.add_diagonal(torch.tensor(0.5, dtype=DT)),
        "add_jitter": lambda W: W.add_jitter(0.5),
        "W * c + D": lambda W: W * 2 + DiagLinearOperator(d),
        "c * W + D": lambda W: 0.5 * W + DiagLinearOperator(d),
        "(W * c).add_diagonal": lambda W: (W * torch.tensor(3.0, dtype=DT)).add_diagonal(d),
        "(W + D) * c": lambda W: (W + DiagLinearOperator(d)) * 2.5,
    }
    if outer:  # one constant per batch entry of the layout (linear_operator's multiple broadcast it against the tasks)
        c = torch.tensor([2.0, 0.5], dtype=DT).view(2, 1, 1)
        ways["W * c (per batch entry) + D"] = lambda W: W * c + DiagLinearOperator(d)
    return ways


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
@pytest.mark.parametrize("outer", [(), (2,)], ids=["unbatched", "batched"])
@pytest.mark.parametrize("kind", ["block_mean", "sum"])
def test_task_layout_entry_points_reach_the_closed_form(layout, outer, kind):
    plain, closed = layout
    W = plain(_base(kind, outer + (T,)))
    for name, build in _entry_points(outer).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ClosedFormFallbackWarning on the way
            op = build(W)
        assert type(op) is closed, name
        rhs, _, (solved, logdet, (inv_quad, logdet2)) = _assert_matches_dense(op, outer)
        with closed_forms_only(N), warnings.catch_warnings():
            warnings.simplefilter("error")
            got_solve = op.solve(rhs)
            got_logdet = op.logdet()
            got_inv_quad, got_logdet2 = op.inv_quad_logdet(rhs, logdet=True)
        torch.testing.assert_close(got_solve, solved, msg=name)
        torch.testing.assert_close(got_logdet, logdet, msg=name)
        torch.testing.assert_close(got_inv_quad, inv_quad, msg=name)
        torch.testing.assert_close(got_logdet2, logdet2, msg=name)


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
def test_add_jitter_of_a_task_layout_matches_plus_constant_diagonal(layout):
    plain, closed = layout
    W = plain(_bm(P1, (T,)))
    op = W.add_jitter(0.25)
    assert type(op) is closed
    torch.testing.assert_close(op.to_dense(), W.to_dense() + 0.25 * torch.eye(T * N, dtype=DT))


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
def test_multiple_of_a_task_layout_keeps_the_layout_and_values(layout):
    plain, _ = layout
    W = plain(_bm(P1, (2, T)))
    for c in [2.0, torch.tensor(-1.5, dtype=DT), torch.tensor([2.0, 0.5], dtype=DT).view(2, 1, 1)]:
        scaled = W * c
        assert type(scaled) is plain and isinstance(scaled.base_linear_op, BlockMeanLinearOperator)
        torch.testing.assert_close(scaled.to_dense(), W.to_dense() * c)


def test_layout_around_a_constant_multiple_reaches_the_closed_form():
    """A layout built around linear_operator's ``ConstantMulLinearOperator`` of a batch: its diagonal sum is the
    batch's own multiple plus the diagonal."""
    d = torch.rand(T * N, dtype=DT) + 0.5
    S = _sum((T,))
    W = BlockDiagLinearOperator(ConstantMulLinearOperator(S, torch.tensor(2.0, dtype=DT)))
    op = W.add_diagonal(d)
    assert type(op) is BlockMeanBlockDiagLinearOperator
    # since e582a24 ConstantMulLinearOperator(S, c) is routed to S's own multiple, so op.to_dense() (the reference
    # below) is the closed form's: check it against the multiple and the diagonal formed here
    torch.testing.assert_close(op.to_dense(), torch.block_diag(*(2.0 * S.to_dense()).unbind(0)) + torch.diag(d))
    _, dense, (_, logdet, _) = _assert_matches_dense(op, ())
    with closed_forms_only(N):
        got = op.logdet()
    torch.testing.assert_close(got, logdet)


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
def test_gradients_of_a_jittered_multiple_of_a_task_layout_match_dense(layout):
    plain, _ = layout
    lam = (torch.rand(T, 4, dtype=DT) + 0.5).requires_grad_()
    c = torch.tensor(1.5, dtype=DT, requires_grad=True)
    B = (0.7 * torch.eye(4, dtype=DT)).expand(T, 4, 4)
    d = torch.rand(T * N, dtype=DT) + 0.5
    op = (c * plain(BlockMeanLinearOperator(lam, B, P1))).add_jitter(0.3) + DiagLinearOperator(d)
    with closed_forms_only(N):
        grads = torch.autograd.grad(op.logdet(), (lam, c))
    lam2, c2 = lam.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    dense = c2 * plain(BlockMeanLinearOperator(lam2, B, P1)).to_dense() + 0.3 * torch.eye(T * N, dtype=DT)
    expected = torch.autograd.grad(torch.logdet(dense + torch.diag(d)), (lam2, c2))
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("layout", _LAYOUTS, ids=["blockdiag", "interleaved"])
@pytest.mark.parametrize("how", ["plus", "add_diagonal"])
def test_negative_multiple_of_a_batch_of_sums_plus_diagonal_warns(layout, how):
    """``-2 W`` of a batch of sums is the layout of ``FallbackScaledLinearOperator`` (a root ``U U^T`` takes no
    negative factor); plus a diagonal it has no closed form: a FallbackSumLinearOperator, which warns when solved, not
    linear_operator's silent AddedDiagLinearOperator."""
    plain, _ = layout
    W = plain(_sum((T,)))
    shift = 2 * torch.linalg.eigvalsh(W.to_dense()).max() + 1  # -2 W + D positive definite
    d = torch.rand(T * N, dtype=DT) + shift
    scaled = W * -2.0
    op = scaled + DiagLinearOperator(d) if how == "plus" else scaled.add_diagonal(d)
    # a FallbackSumLinearOperator, or the task layout over the tasks' FallbackSumLinearOperators (c M_t + D_t)
    assert isinstance(op, FallbackSumLinearOperator) or isinstance(op.base_linear_op, FallbackSumLinearOperator)
    rhs, _, (solved, logdet, _) = _assert_matches_dense(op, ())
    with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        got_solve = op.solve(rhs)
    with pytest.warns(ClosedFormFallbackWarning, match="no closed form"):
        got_logdet = op.logdet()
    torch.testing.assert_close(got_solve, solved)
    torch.testing.assert_close(got_logdet, logdet)


# ---------------------------------------------------------------------------- cat_rows
def _cat_inputs(n, m, batch=()):
    g = torch.Generator().manual_seed(11)
    cross = 0.05 * torch.randn(*batch, m, n, dtype=DT, generator=g)
    A = torch.randn(m, m, dtype=DT, generator=g)
    return cross, (A @ A.mT + 3 * torch.eye(m, dtype=DT)).expand(*batch, m, m)


@pytest.mark.parametrize("kind", ["block_mean", "sum"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batched"])
def test_cat_rows_warns_once_and_keeps_the_result(kind, batch):
    op = _bm(P1, batch)
    if kind == "sum":
        op = op + DiagLinearOperator(torch.full((N,), 0.1, dtype=DT))
    cross, new = _cat_inputs(N, 2, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C = op.cat_rows(cross, new)
    fallback = [w for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert f"cat_rows of a {type(op).__name__}" in message
    assert "leaves the closed forms" in message and f"{N + 2} x {N + 2}" in message
    assert fallback[0].filename == __file__  # names the caller's line
    assert isinstance(C, CatLinearOperator)
    expected = DenseLinearOperator(op.to_dense()).cat_rows(cross, new)
    torch.testing.assert_close(C.to_dense(), expected.to_dense())
    root = C.root_decomposition().root.to_dense()  # the bordered roots linear_operator builds from this operator's
    torch.testing.assert_close(root @ root.mT, C.to_dense())
    rhs = torch.ones(*batch, N + 2, 1, dtype=DT)
    dense = DenseLinearOperator(C.to_dense())
    torch.testing.assert_close(C.solve(rhs), dense.solve(rhs))
    for got, exp in zip(C.inv_quad_logdet(rhs, logdet=True), dense.inv_quad_logdet(rhs, logdet=True)):
        torch.testing.assert_close(got, exp)


def test_cat_rows_matches_pytest_warns():
    cross, new = _cat_inputs(N, 3)
    with pytest.warns(ClosedFormFallbackWarning, match=r"cat_rows of a BlockMeanLinearOperator \(n = 14\) with 3 new"):
        _bm(P1).cat_rows(cross, new)
    S = _sum()
    with pytest.warns(ClosedFormFallbackWarning, match=r"cat_rows of a BlockMeanSumLinearOperator.*17 x 17"):
        S.cat_rows(cross, new)


def test_cat_rows_with_a_bad_block_raises_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        with pytest.raises(RuntimeError):
            _bm(P1).cat_rows(torch.ones(2, N - 1, dtype=DT), torch.eye(2, dtype=DT))


# ---------------------------------------------------------------------------- prod over a batch of products
def _product(batch):
    return _bm(P1, batch) @ _bm(P2, batch, seed=4)


def test_prod_over_a_batch_of_products_names_the_elementwise_product():
    P = _product((2,))
    with pytest.raises(ValueError, match=r"^elementwise product of a BlockMeanProductLinearOperator") as info:
        P.prod(0)
    message = str(info.value)
    assert "prod(0)" in message and "root_decomposition" not in message
    assert "P.to_dense().prod(0)" in message
    with pytest.raises(ValueError, match=r"prod\(-3\)|prod\(0\)"):
        P.prod(-3)


def test_prod_over_a_batch_of_one_product_is_the_product():
    P = _product((1,))
    res = P.prod(0)
    assert res.shape == (N, N)
    torch.testing.assert_close(res.to_dense(), P.to_dense()[0])


# ---------------------------------------------------------------------------- solve(rhs, left_tensor)
def _operators():
    M = _bm(P1)
    return {"block_mean": M, "sum": _sum(), "product": _product(())}


@pytest.mark.parametrize("which", ["block_mean", "sum", "product"])
def test_solve_checks_left_tensor(which):
    op = _operators()[which]
    rhs = torch.ones(N, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"left_tensor of shape \(3, 4\) does not match .* expected size 14"):
        op.solve(rhs, torch.ones(3, 4, dtype=DT))
    with pytest.raises(TypeError, match="left_tensor has dtype torch.float32 but the operator has dtype torch.float64"):
        op.solve(rhs, torch.ones(3, N))
    with pytest.raises(TypeError, match="left_tensor must be a tensor"):
        op.solve(rhs, [[1.0] * N])
    with pytest.raises(ValueError, match="left_tensor is a 0-d tensor"):
        op.solve(rhs, torch.tensor(1.0, dtype=DT))
    with pytest.raises(TypeError, match="left_tensor has dtype torch.complex128"):
        op.solve(rhs, torch.ones(3, N, dtype=torch.complex128))


def test_solve_checks_left_tensor_batch():
    S = _sum((2,))
    with pytest.raises(ValueError, match=r"left_tensor of shape \(3, 5, 14\): its batch dimensions \(3,\) do not"):
        S.solve(torch.ones(N, 1, dtype=DT), torch.ones(3, 5, N, dtype=DT))


@pytest.mark.parametrize("which", ["block_mean", "sum", "product"])
@pytest.mark.parametrize("vector", [False, True])
def test_solve_with_a_good_left_tensor_matches_dense(which, vector):
    op = _operators()[which]
    g = torch.Generator().manual_seed(2)
    rhs = torch.randn(N, dtype=DT, generator=g) if vector else torch.randn(N, 2, dtype=DT, generator=g)
    left = torch.randn(3, N, dtype=DT, generator=g)
    column = rhs.unsqueeze(-1) if vector else rhs
    expected = left @ torch.linalg.solve(op.to_dense(), column)  # the product is not symmetric: no Cholesky
    if vector:
        expected = expected.squeeze(-1)
    if which != "product":
        torch.testing.assert_close(DenseLinearOperator(op.to_dense()).solve(rhs, left), expected)
    with closed_forms_only(N):
        got = op.solve(rhs, left)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------- a negative multiple of one sum
@pytest.mark.parametrize("how", ["plus", "radd", "add_diagonal", "add_jitter"])
def test_negative_multiple_of_a_sum_plus_diagonal_warns_once(how):
    """``S * -2 + D`` (and ``D + S * -2``, ``add_diagonal``, ``add_jitter``) of one sum: no closed form (the sum's
    closed forms need a nonnegative factor), so a FallbackSumLinearOperator whose solves and log-determinant warn once
    each; it was linear_operator's AddedDiagLinearOperator, whose dense Cholesky ran without a word."""
    S = _sum()
    scaled = S * -2.0
    shift = 2 * torch.linalg.eigvalsh(S.to_dense()).max() + 1
    d = torch.full((N,), float(shift), dtype=DT)
    op = {
        "plus": lambda: scaled + DiagLinearOperator(d),
        "radd": lambda: DiagLinearOperator(d) + scaled,
        "add_diagonal": lambda: scaled.add_diagonal(d),
        "add_jitter": lambda: scaled.add_jitter(float(shift)),
    }[how]()
    assert isinstance(op, FallbackSumLinearOperator)
    dense = -2.0 * S.to_dense() + torch.diag(d)
    rhs = torch.randn(N, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    for call, expected in (
        (lambda: op.solve(rhs), torch.linalg.solve(dense, rhs)),
        (lambda: op.logdet(), torch.logdet(dense)),
        (lambda: op.inv_quad_logdet(rhs, logdet=True)[1], torch.logdet(dense)),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = call()
        said = [w for w in caught if issubclass(w.category, ClosedFormFallbackWarning)]
        assert len(said) == 1, [str(w.message) for w in said]
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["root_decomposition", "root_inv_decomposition"])
def test_roots_of_a_negative_multiple_of_a_sum_are_refused(method):
    """``(S * -2).root_decomposition()`` returned a zero matrix after a warning (linear_operator's generic root
    clamps the negative eigenvalues of a negative definite matrix); it is refused in words."""
    scaled = _sum() * -2.0
    with pytest.raises(ValueError, match=rf"{method} of a negative multiple c S \(c < 0\).*no real root"):
        getattr(scaled, method)()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: BlockDiagLinearOperator(s.expand(2, *s.shape)).root_decomposition().root.to_dense(),
        lambda s: s.sqrt_inv_matmul(torch.ones(s.shape[-1], 1, dtype=DT)),
        lambda s: s.cholesky(),
        lambda s: (_sum((2,)) * torch.tensor([2.0, -3.0], dtype=DT).view(2, 1, 1)).root_decomposition(),
    ],
    ids=["block_diag_wrapper", "sqrt_inv_matmul", "cholesky", "mixed_sign_batch"],
)
def test_other_roots_of_a_negative_multiple_are_refused(call):
    """The wrappers' private hooks (a BlockDiagLinearOperator roots its batch through Cholesky factors),
    sqrt_inv_matmul and a batch with some negative factors gave zero roots or meaningless products after a warning."""
    with pytest.raises(ValueError, match="negative multiple c S.*no real root"):
        call(_sum() * -2.0)


def test_negative_multiple_solve_of_a_vector_with_left_tensor_is_a_vector():
    S = _sum()
    left = torch.randn(4, N, dtype=DT, generator=torch.Generator().manual_seed(2))
    rhs = torch.randn(N, dtype=DT, generator=torch.Generator().manual_seed(3))
    got = (S * -2.0).solve(rhs, left)
    assert got.shape == (4,)  # was (1, 4)
    torch.testing.assert_close(got, left @ torch.linalg.solve(-2.0 * S.to_dense(), rhs))
