"""The Schur complement onto the non-eliminated groupings from the nonzero cells of sparse contingency tables.

``BlockMeanSumLinearOperator`` eliminates its largest diagonal grouping first and forms
``A_rr - A_re diag(g / delta) A_er``. When a grouping's contingency table with the eliminated grouping is
sparse (crossed groupings with many levels), its blocks of that product come from the cells that hold an
index (:class:`bma_gp.block_mean_sum_linear_operator._Cells`) instead of one GEMM over the dense table. These
tests force the cell path on small problems (``SPARSE_CELLS_DENSITY = inf``) and check every value and gradient
against dense linear algebra, then check that a genuinely sparse crossing takes it at the default threshold.
"""

from __future__ import annotations

import math

import pytest
import torch

from bma_gp import BlockMeanSumLinearOperator, Partition
from bma_gp import block_mean_sum_linear_operator as bms
from closed_form_guard import closed_forms_only
from test_block_mean_sum import (
    Case,
    _gradient_checks,
    _value_checks,
    assert_close,
    psd,
    random_labels,
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CrossedCase(Case):
    """Groupings of ``sizes`` on ``n`` scattered points; ``diagonal``: which B_j are diagonal (the largest of
    them is eliminated), ``m``: the root's rank, ``weighted``: which groupings have row weights."""

    def __init__(self, sizes, diagonal, m, weighted=(), dtype=torch.float64, batch=(), seed=0, n=60):
        super().__init__((sizes, diagonal, m, False, weighted), dtype=dtype, batch=batch, seed=seed, n=n)
        self.diagonal = tuple(diagonal)
        self._leaves = None

    def requires_grad_(self):
        """Leaves that need gradients; a diagonal ``B_j`` is ``diag_embed`` of a leaf vector, so that it is
        diagonal by construction and is eliminated (a free ``k x k`` leaf needs its off-diagonal gradient)."""
        super().requires_grad_()
        leaves = [self.d]
        for j, B in enumerate(self.blocks):
            if j in self.diagonal:
                v = torch.diagonal(B, dim1=-2, dim2=-1).detach().clone().requires_grad_(True)
                self.blocks[j] = torch.diag_embed(v)
                leaves.append(v)
            else:
                leaves.append(B)
        self._leaves = leaves + ([] if self.root is None else [self.root])
        return self

    def leaves(self):
        return self._leaves if self._leaves is not None else super().leaves()


# (sizes, diagonal, m, weighted): the eliminated grouping is the largest diagonal one
CASES = {
    "two": ((6, 15), (1,), 0, ()),
    "two_root": ((6, 15), (1,), 3, ()),
    "three_root": ((5, 7, 20), (2,), 2, ()),  # two cell tables joined with each other and with the root
    "three_weighted": ((5, 7, 20), (0, 2), 2, (1, 2)),  # random slopes on a kept and on the eliminated grouping
    "elim_first": ((20, 6, 4), (0,), 3, ()),
}


def _counting(monkeypatch):
    """Force the cell path and count how often it runs."""
    calls = []
    original = bms._cells_product

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    monkeypatch.setattr(bms, "_cells_product", counted)
    return calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["nobatch", "batch2"])
def test_values_through_cells(monkeypatch, name, dtype, batch):
    calls = _counting(monkeypatch)
    sizes, diagonal, m, weighted = CASES[name]
    case = CrossedCase(sizes, diagonal, m, weighted, dtype=dtype, batch=batch, seed=3)
    _value_checks(case.op(), case.dense(torch.float64), dtype, batch, seed=4)
    assert calls, "the cell path was not taken"
    calls.clear()
    rhs = torch.randn(*batch, case.n, 2, dtype=dtype)
    with closed_forms_only(case.n):  # the operator alone: no CG, no Lanczos, no n x n factorisation
        case.op().inv_quad_logdet(rhs, logdet=True)
        case.op().solve(rhs)
    assert calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch", [(), (2,)], ids=["nobatch", "batch2"])
def test_gradients_through_cells(monkeypatch, name, batch):
    calls = _counting(monkeypatch)
    sizes, diagonal, m, weighted = CASES[name]
    case = CrossedCase(sizes, diagonal, m, weighted, batch=batch, seed=7).requires_grad_()
    _gradient_checks(case, batch, seed=8, methods=["solve", "inv_quad_logdet", "logdet", "root_inv"])
    assert calls


@pytest.mark.parametrize("name", list(CASES))
def test_cells_equal_the_gemm(monkeypatch, name):
    """The Schur correction from cells equals the GEMM over the dense tables (float64, to rounding)."""
    sizes, diagonal, m, weighted = CASES[name]
    case = CrossedCase(sizes, diagonal, m, weighted, seed=11)
    op = case.op()
    cap = op._factorise()
    rest = [t for t in range(len(op._sizes())) if t != cap.elim]
    c = cap.g / cap.delta
    results = {}
    for density in (-1.0, math.inf):
        monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", density)
        results[density] = op._schur_correction(rest, cap.elim, cap.A_re, c)
    torch.testing.assert_close(results[math.inf], results[-1.0], rtol=1e-12, atol=1e-14)


def test_sparse_crossing_takes_the_cells_by_default(monkeypatch):
    """n = 400 points in 50 x 160 crossed levels: 400 of 8,000 cells (5%) at most, so the default threshold
    takes the cell path; the answers match dense linear algebra."""
    calls = []
    original = bms._cells_product
    monkeypatch.setattr(bms, "_cells_product", lambda *a, **k: calls.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    n, k1, k2 = 400, 50, 160
    p1 = Partition.from_labels(torch.randperm(n, generator=gen) % k1)
    p2 = Partition.from_labels(torch.randperm(n, generator=gen) % k2)
    B1 = psd(k1, (), gen)
    B2 = torch.diag_embed(torch.rand(k2, generator=gen, dtype=torch.float64) + 0.1)
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    U = torch.randn(n, 4, generator=gen, dtype=torch.float64) / 2
    op = BlockMeanSumLinearOperator(d, B1, B2, partitions=[p1, p2], root=U)
    Z1 = torch.nn.functional.one_hot(p1.labels, k1).double()
    Z2 = torch.nn.functional.one_hot(p2.labels, k2).double()
    A = torch.diag(d) + Z1 @ B1 @ Z1.T + Z2 @ B2 @ Z2.T + U @ U.T
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    with closed_forms_only(n):
        inv_quad, logdet = op.inv_quad_logdet(y, logdet=True)
    assert calls, "a 5%-dense crossing should take the cell path"
    assert_close(inv_quad, (y * torch.linalg.solve(A, y)).sum(), torch.float64)
    assert_close(logdet, torch.logdet(A), torch.float64)


def test_dense_crossing_keeps_the_gemm(monkeypatch):
    """Few levels (every cell filled): the GEMM, not the cells."""
    calls = []
    monkeypatch.setattr(bms, "_cells_product", lambda *a, **k: calls.append(1))
    case = CrossedCase((4, 6), (1,), 2, seed=1, n=200)
    case.op().logdet()
    assert not calls


def test_join_pairs_every_cell_of_a_level():
    """The join lists, for every level of the eliminated grouping, all pairs of cells in it, once each."""
    gen = torch.Generator().manual_seed(2)
    n = 80
    pa, pb, pe = (Partition.from_labels(random_labels(n, k, gen, singletons=1)) for k in (6, 9, 11))
    ca, cb = bms._Cells.build(pa, pe), bms._Cells.build(pb, pe)
    mine, theirs = ca.join(cb)
    assert bool((ca.col[mine] == cb.col[theirs]).all())
    got = sorted(zip(mine.tolist(), theirs.tolist()))
    want = sorted((x, y) for x in range(ca.count) for y in range(cb.count) if int(ca.col[x]) == int(cb.col[y]))
    assert got == want
    # the cells are exactly the nonzero pattern of the contingency table
    table = torch.zeros(6, 11)
    table.index_put_((pa.labels, pe.labels), torch.ones(n), accumulate=True)
    assert ca.count == int((table > 0).sum())
    torch.testing.assert_close(ca.values(torch.ones(n, dtype=torch.float64)), table[ca.row, ca.col].double())


def test_too_many_cell_pairs_take_the_gemm(monkeypatch):
    """Past MAX_CELL_PAIRS a block of the Schur product takes the GEMM where one CSR product would not cost less
    (CELL_PAIRS_GEMM_RATIO; tests/test_cells_product.py has the other side); the answer is the same."""
    monkeypatch.setattr(bms, "CELL_PAIRS_GEMM_RATIO", math.inf)
    case = CrossedCase((5, 7, 20), (2,), 2, seed=12)
    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    reference = case.op().logdet()
    calls = []
    original = bms._cells_product
    monkeypatch.setattr(bms, "_cells_product", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(bms, "MAX_CELL_PAIRS", 0)
    assert_close(case.op().logdet(), reference, torch.float64)
    assert not calls
    ca = bms._Cells.build(case.partitions[0], case.partitions[2])
    cb = bms._Cells.build(case.partitions[1], case.partitions[2])
    assert ca.pairs(cb) == ca.join(cb)[0].numel()


def test_a_sparse_crossing_never_forms_its_contingency_table(monkeypatch):
    """With the cells path, training (inv_quad_logdet and its backward) forms no ``k_t x k_e`` table of the
    grouping crossed with the eliminated one: the solves multiply by its cells."""
    gen = torch.Generator().manual_seed(5)
    n, k1, k2 = 2000, 200, 1000  # n <= 0.05 k1 k2: sparse
    p1 = Partition.from_labels(torch.randperm(n, generator=gen) % k1)
    p2 = Partition.from_labels(torch.randperm(n, generator=gen) % k2)
    W = torch.randn(k1, k1, generator=gen, dtype=torch.float64) / k1**0.5
    B1 = (W @ W.mT).requires_grad_(True)
    v2 = (torch.rand(k2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    U = torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    tables = []
    real = bms._contingency
    monkeypatch.setattr(
        bms, "_contingency", lambda a, b, v: tables.append((a.num_blocks, b.num_blocks)) or real(a, b, v)
    )

    def loss(M):
        quad, logdet = M.inv_quad_logdet(y, logdet=True)
        return quad + logdet + (M.solve(y) * y).sum()

    M = BlockMeanSumLinearOperator(d, B1, v2, partitions=[p1, p2], root=U, diagonal=[False, True])
    value = loss(M)
    grads = torch.autograd.grad(value, (d, B1, v2, U))
    assert tables == []
    dense = M.to_dense()
    solved = torch.linalg.solve(dense, y)
    loss_dense = 2 * (y * solved).sum() + torch.logdet(dense)
    want_grads = torch.autograd.grad(loss_dense, (d, B1, v2, U))
    torch.testing.assert_close(value, loss_dense, rtol=1e-10, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
