"""``_LevelRows``: the eliminated levels' rows of ``A_Er`` held by their nonzeros (session 36), read from the grouping
tables' cells or from a dense tensor, against the dense rows they stand for: the rows themselves, their products (CSR
and GEMM), the levels' own forms and the cross term's pairs."""

from __future__ import annotations

import pytest
import torch

import bma_gp.kernels.sum_prediction_strategy as sps
from bma_gp import Partition
from bma_gp.block_mean_sum_linear_operator import _Cells, _CrossBlocks


def _labels(gen, n: int, k: int) -> torch.Tensor:
    """``n`` random labels of ``k`` blocks, each used (unequal sizes, scattered)."""
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    return labels[torch.randperm(n, generator=gen)]


def _cross_blocks(gen, n: int, sizes: list[int], ke: int, dense: list[bool] | None = None):
    """A ``_CrossBlocks`` of random tables against an eliminated grouping of ``ke`` levels (crossed: some cells
    empty), its pieces as cells (or dense where ``dense`` says), and the dense ``r x k_e`` matrix it stands for."""
    elim = Partition.from_labels(_labels(gen, n, ke))
    pieces, blocks = [], []
    for i, size in enumerate(sizes):
        part = Partition.from_labels(_labels(gen, n, size))
        cells = _Cells.build(part, elim)
        values = torch.randn(cells.count, generator=gen, dtype=torch.float64)
        full = torch.zeros(size, ke, dtype=torch.float64)
        full[cells.row, cells.col] = values
        pieces.append(full if dense and dense[i] else (cells, values))
        blocks.append(full)
    return _CrossBlocks(pieces, sizes, ke), torch.cat(blocks), elim


@pytest.mark.parametrize("sizes", [[7], [5, 1, 9], [1]])
@pytest.mark.parametrize("used", ["all", "some", "one"])
def test_from_cells_holds_the_columns_of_the_table(sizes, used):
    gen = torch.Generator().manual_seed(len(sizes) * 10 + len(used))
    ke = 13
    A_re, full, elim = _cross_blocks(gen, 60, sizes, ke)
    levels = {"all": torch.arange(ke), "some": torch.tensor([0, 3, 4, 11]), "one": torch.tensor([5])}[used]
    rows = sps._LevelRows.from_cells(A_re, levels, torch.float64)
    assert rows is not None and rows.held is None
    expected = full[:, levels].mT.unsqueeze(-2)  # (L, 1, R)
    assert rows.shape == tuple(expected.shape)
    torch.testing.assert_close(rows.dense(), expected, rtol=0, atol=0)
    torch.testing.assert_close(rows.dense(), A_re.columns(levels).mT.unsqueeze(-2), rtol=0, atol=0)
    # by level, each level's columns in increasing order (CSR rows as torch builds them from a dense tensor)
    dense_rows = sps._LevelRows.from_dense(expected)
    keep = rows.a != 0  # a cell whose value happens to be 0 is kept; the scan drops it
    for name in ("c", "a", "e"):
        torch.testing.assert_close(getattr(rows, name)[keep], getattr(dense_rows, name), rtol=0, atol=0)


def test_from_cells_refuses_dense_pieces_and_graphs():
    gen = torch.Generator().manual_seed(3)
    A_re, _, _ = _cross_blocks(gen, 40, [4, 6], 9, dense=[False, True])
    assert sps._LevelRows.from_cells(A_re, torch.arange(9), torch.float64) is None
    A_re, _, _ = _cross_blocks(gen, 40, [4], 9)
    cells, values = A_re.pieces[0]
    A_re.pieces[0] = (cells, values.requires_grad_())
    assert sps._LevelRows.from_cells(A_re, torch.arange(9), torch.float64) is None  # grad mode: the dense path
    with torch.no_grad():
        assert sps._LevelRows.from_cells(A_re, torch.arange(9), torch.float64) is not None


@pytest.mark.parametrize("re", [1, 3])
@pytest.mark.parametrize("density", [0.0, 1.0])  # SPARSE_ROWS_DENSITY: the GEMM always, the CSR product always
def test_products_and_level_forms_equal_the_dense_formulas(re, density, monkeypatch):
    monkeypatch.setattr(sps, "SPARSE_ROWS_DENSITY", density)
    gen = torch.Generator().manual_seed(re)
    L, R = 11, 8
    A = torch.randn(L, re, R, generator=gen, dtype=torch.float64)
    A = A * (torch.rand(L, re, R, generator=gen) < 0.3)
    A[4] = 0  # a level without nonzeros
    rows = sps._LevelRows.from_dense(A)
    C = torch.randn(R, 2 * R, generator=gen, dtype=torch.float64)
    for start, stop in [(0, L), (2, 5), (4, 5), (10, 11)]:
        T, dense = rows.product(start, stop, C)
        assert (dense is None) == (density == 1.0 or not bool(A[start:stop].any()))
        expected = A[start:stop] @ C
        torch.testing.assert_close(T, expected, rtol=1e-13, atol=1e-13)
        Q = rows.level_forms(start, stop, T[..., :R])
        torch.testing.assert_close(Q, expected[..., :R] @ A[start:stop].mT, rtol=1e-13, atol=1e-13)


def _sparse_levels(gen, L: int, re: int, R: int):
    """Random ``(L, r_e, R)`` level rows with about 40 % nonzeros, and their :class:`sps._LevelRows`."""
    A = torch.randn(L, re, R, generator=gen, dtype=torch.float64) * (torch.rand(L, re, R, generator=gen) < 0.4)
    return A, sps._LevelRows.from_dense(A)


def test_cross_pairs_equal_the_product(monkeypatch):
    monkeypatch.setattr(sps, "_LEVEL_PAIRS_CHUNK", 5)  # several chunks of pairs
    gen = torch.Generator().manual_seed(7)
    L, re, R, t = 6, 2, 9, 23
    A, rows = _sparse_levels(gen, L, re, R)
    inverse = torch.randint(0, L, (t,), generator=gen)
    w = torch.randn(t, re, generator=gen, dtype=torch.float64)
    C_VF = torch.randn(R, R, generator=gen, dtype=torch.float64)
    columns = [torch.randint(0, R, (t,), generator=gen) for _ in range(2)]
    values = [torch.randn(t, generator=gen, dtype=torch.float64) for _ in range(2)]
    got = rows.cross(C_VF, w, inverse, columns, values)
    P = A @ C_VF  # (L, re, R)
    expected = sum(u * (w * P[inverse, :, c]).sum(-1) for c, u in zip(columns, values))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_combine_and_chunk_rows_equal_the_dense_rows():
    gen = torch.Generator().manual_seed(11)
    L, re, R, c = 9, 2, 7, 31
    A = torch.randn(L, re, R, generator=gen, dtype=torch.float64) * (torch.rand(L, re, R, generator=gen) < 0.35)
    A[3] = 0
    rows = sps._LevelRows.from_dense(A)
    levels = torch.randint(0, L, (c,), generator=gen)
    w = torch.randn(c, re, generator=gen, dtype=torch.float64)
    expected = (w.unsqueeze(-1) * A[levels]).sum(-2)
    torch.testing.assert_close(rows.combine(w, levels), expected, rtol=1e-14, atol=1e-14)
    for start, stop in [(0, L), (2, 6), (3, 4), (8, 9)]:
        lo, hi = int(rows.crow[start * re]), int(rows.crow[stop * re])
        torch.testing.assert_close(rows._dense_rows(start, stop, lo, hi), A[start:stop], rtol=0, atol=0)


@pytest.mark.parametrize("table", ["dense", "cells"])
def test_cells_lift_the_bound_on_the_levels_rows(table, monkeypatch):
    """Held as cells, ``A_Er`` is never formed, so the structured form no longer stops at
    ``_STRUCTURED_MAX_ELEMENTS`` (20,000 users x 2,000 items at 48,000 new users' levels fell to the products with
    ``W``: more than 10 minutes and 9 GB at n = 10^6); dense tables still do."""
    import bma_gp.block_mean_sum_linear_operator as sums
    from test_mixed_posterior import reference
    from test_mixed_prediction import build, closed_form, random_new_inputs

    monkeypatch.setattr(sums, "SPARSE_CELLS_DENSITY", 1e9 if table == "cells" else 0.0)
    monkeypatch.setattr(sps, "_STRUCTURED_MAX_ELEMENTS", 1)
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)  # the structured form, not a formed G - Sigma
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    built = []
    original = sps._Structured.build

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(sps._Structured, "build", staticmethod(spy))
    model, _, _ = build("crossed")
    model.eval()
    xt = random_new_inputs(40)
    _, (mean, dense, diag, variance), _ = closed_form(model, xt, False)
    assert built and all((b is not None) == (table == "cells") for b in built)
    if table == "cells":
        assert all(isinstance(b.A_Er, sps._LevelRows) for b in built)
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)  # entries: the rows of V from the nonzeros


def test_joint_cells_hold_the_levels_rows_of_every_eliminated_term():
    """A joint elimination (``r_e`` terms over one grouping: a correlated intercept and slope) keeps one value vector
    per term on each table's cells; the rows at the levels used are ``A_Er[l, e, c]``, by level, then term, then
    column."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(13)
    n, ke, sizes, re = 80, 11, [6, 3, 8], 2
    elim = Partition.from_labels(_labels(gen, n, ke))
    tables, values, blocks = [], [], []
    for size in sizes:
        cells = _Cells.build(Partition.from_labels(_labels(gen, n, size)), elim)
        vals = [torch.randn(cells.count, generator=gen, dtype=torch.float64) for _ in range(re)]
        full = torch.zeros(size, ke, re, dtype=torch.float64)
        for e, v in enumerate(vals):
            full[cells.row, cells.col, e] = v
        tables.append(cells)
        values.append(vals)
        blocks.append(full)
    cross = SimpleNamespace(tables=tables, values=values, sizes=sizes)
    A_rE = torch.cat(blocks)  # (R, k_e, r_e)
    levels = torch.tensor([0, 2, 3, 7, 10])
    rows = sps._LevelRows.from_joint_cells(cross, levels, torch.float64)
    assert rows is not None and rows.shape == (5, re, sum(sizes))
    expected = A_rE[:, levels].permute(1, 2, 0)  # (L, r_e, R)
    torch.testing.assert_close(rows.dense(), expected, rtol=0, atol=0)
    dense_rows = sps._LevelRows.from_dense(expected)
    keep = rows.a != 0
    for name in ("e", "c", "a"):
        torch.testing.assert_close(getattr(rows, name)[keep], getattr(dense_rows, name), rtol=0, atol=0)
    torch.testing.assert_close(rows.crow, dense_rows.crow)


def test_gathered_products_equal_the_dense_product(monkeypatch):
    monkeypatch.setattr(sps, "_LEVEL_PAIRS_CHUNK", 7)  # several chunks of pairs
    gen = torch.Generator().manual_seed(17)
    L, re, R, t = 7, 2, 9, 25
    A, rows = _sparse_levels(gen, L, re, R)
    X = torch.randn(R, R, generator=gen, dtype=torch.float64)
    levels, columns = torch.randint(0, L, (t,), generator=gen), torch.randint(0, R, (t,), generator=gen)
    expected = (A @ X)[levels, :, columns]  # (t, r_e)
    torch.testing.assert_close(rows.gathered_products(X, levels, columns), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case", ["slopes", "slopes_group_noise"])
def test_the_training_posterior_of_a_joint_elimination_from_cells(case, monkeypatch):
    """A correlated slope's posterior variance at the training inputs reads its tables' cells (no ``k x r_e x R``
    ``T`` or ``T Q``: 147 s and 12.5 GB at 60,000 users x 2,000 items, n = 10^6, before; 6.9 s and 1.8 GB after)
    and equals GPyTorch's dense posterior."""
    import gpytorch

    import bma_gp.block_mean_sum_linear_operator as sums
    from test_mixed_posterior import reference
    from test_mixed_prediction import build

    monkeypatch.setattr(sums, "SPARSE_CELLS_DENSITY", 1e9)
    calls = []
    original = sps._joint_cells_quadratic_diagonal
    monkeypatch.setattr(sps, "_joint_cells_quadratic_diagonal", lambda *a: calls.append(1) or original(*a))
    model, x, _ = build(case)
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), pytest.warns(UserWarning, match="training data"):
        variance = model(x).variance
    assert calls
    torch.testing.assert_close(variance, torch.diagonal(reference(model, x)[1]), rtol=1e-10, atol=1e-12)
