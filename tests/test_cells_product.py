"""The Schur complement's product of two sparse contingency tables, ``N_a diag(c) N_b^T``, as one CSR product.

:class:`bma_gp.block_mean_sum_linear_operator._CellsProduct` replaces the joined pairs of cells in the forward pass
with a sparse-by-sparse CSR product, and its backward pass reads the gradients off ``N_b^T G^T`` in column chunks
(or off the joined pairs where that costs less). These tests compare it, in values, first and second derivatives,
with the dense product of the two tables and with the pairs' form, on random partitions: both backward paths, chunked
and whole, one table with itself and two different tables, float32 and float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from bma_gp import BlockMeanSumLinearOperator, Partition
from bma_gp import block_mean_sum_linear_operator as bms
from closed_form_guard import closed_forms_only


def _tables(seed: int, n: int, ka: int, kb: int, ke: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    pa, pb, pe = (Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in (ka, kb, ke))
    ca, cb = bms._Cells.build(pa, pe), bms._Cells.build(pb, pe)
    va = torch.randn(ca.count, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    vb = torch.randn(cb.count, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    c = torch.randn(ke, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return ca, cb, va, vb, c


def _labels(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Scattered labels of ``n`` points that use every one of the ``k`` blocks."""
    labels = torch.cat([torch.arange(k), torch.randint(k, (n - k,), generator=g)])
    return labels[torch.randperm(n, generator=g)]


def _dense(cells: bms._Cells, values: torch.Tensor, k: int, ke: int) -> torch.Tensor:
    out = values.new_zeros(k, ke)
    return out.index_put((cells.row, cells.col), values, accumulate=True)


@pytest.mark.parametrize("ratio", [0, 64, math.inf], ids=["pairs_backward", "default", "csr_backward"])
@pytest.mark.parametrize("chunk", [2**22, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_product_and_gradients_match_dense(monkeypatch, ratio, chunk, dtype, seed):
    monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", ratio)
    monkeypatch.setattr(bms, "CELL_PRODUCT_ELEMENTS", chunk)
    ka, kb, ke = 7, 4, 13
    ca, cb, va, vb, c = _tables(seed, 90, ka, kb, ke, dtype)
    W1 = torch.randn(ka, kb, dtype=dtype)
    W2 = torch.randn(ka, ka, dtype=dtype)

    def loss(product, Na, Nb):
        cross = product(ca, va, cb, vb, c, kb, ka) if product else (Na * c) @ Nb.mT
        own = product(ca, va, ca, va, c, ka, ka) if product else (Na * c) @ Na.mT
        return (cross * W1).sum() + (own * W2).sum() ** 2 / 100

    Na, Nb = _dense(ca, va, ka, ke), _dense(cb, vb, kb, ke)
    ref = loss(None, Na, Nb)
    got = loss(bms._cells_product, None, None)
    pairs = loss(bms._cells_product_pairs, None, None)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(pairs, ref, **tol)
    grads = torch.autograd.grad(got, (va, vb, c), create_graph=True)
    ref_grads = torch.autograd.grad(ref, (va, vb, c), create_graph=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)
    # second derivatives (a Hessian-vector product) through the backward pass's own operations
    probe = [torch.randn_like(t) for t in (va, vb, c)]
    hv = torch.autograd.grad(sum((gr * p).sum() for gr, p in zip(grads, probe)), (va, vb, c))
    ref_hv = torch.autograd.grad(sum((gr * p).sum() for gr, p in zip(ref_grads, probe)), (va, vb, c))
    for a, b in zip(hv, ref_hv):
        torch.testing.assert_close(a, b, **tol)


def test_forward_joins_no_pairs_and_backward_picks_by_cost(monkeypatch):
    """The forward pass is the CSR product (no joined pairs); the backward pass joins pairs only where the CSR
    products would cost more than CELL_PRODUCT_DENSE_RATIO multiply-adds per pair."""
    joins = []
    original = bms._Cells.join
    monkeypatch.setattr(bms._Cells, "join", lambda self, other: joins.append(1) or original(self, other))
    ca, cb, va, vb, c = _tables(3, 200, 6, 5, 40, torch.float64)
    out = bms._cells_product(ca, va, cb, vb, c, 5, 6)
    assert joins == []
    monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", math.inf)
    out.sum().backward(retain_graph=True)
    assert joins == []
    monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", 0)
    out.sum().backward()
    assert len(joins) == 2  # h^B for va and c, h^A for vb


def test_batched_and_forward_mode_take_the_pairs(monkeypatch):
    """A batch of values, or a forward-mode tangent, goes through the pairs' form (the CSR product is 2-D)."""
    calls = []
    original = bms._cells_product_pairs
    monkeypatch.setattr(bms, "_cells_product_pairs", lambda *a: calls.append(1) or original(*a))
    ca, cb, va, vb, c = _tables(4, 80, 5, 4, 9, torch.float64)
    batched = bms._cells_product(ca, va.detach().expand(2, -1), cb, vb, c, 4, 5)
    assert calls == [1]
    torch.testing.assert_close(batched[0], bms._cells_product(ca, va, cb, vb, c, 4, 5))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(va.detach(), torch.ones_like(va))
        out = bms._cells_product(ca, dual, cb, vb.detach(), c.detach(), 4, 5)
        tangent = fwAD.unpack_dual(out).tangent
    assert calls == [1, 1]
    expected = bms._cells_product_pairs(ca, torch.ones_like(va), cb, vb.detach(), c.detach(), 4, 5)
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_crossed_sum_loss_and_gradients_match_dense(monkeypatch, dtype):
    """Three crossed groupings, the largest eliminated, the others' tables with it sparse: the operator's
    log-determinant and quadratic form, and their gradients in the noise and the variances, equal the dense ones
    with the CSR backward, chunked, and with the pairs' backward."""
    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    g = torch.Generator().manual_seed(5)
    n, ks = 150, (40, 12, 3)
    parts = [Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks]
    y = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    log_var = torch.tensor([-0.3, 0.2, -1.0], dtype=dtype, requires_grad=True)
    log_noise = torch.tensor(-0.5, dtype=dtype, requires_grad=True)

    def terms(dense: bool):
        var = log_var.exp()
        blocks = [v * torch.eye(k, dtype=dtype) for v, k in zip(var, ks)]
        d = log_noise.exp().expand(n)
        if dense:
            P = [torch.nn.functional.one_hot(p.labels, k).to(dtype) for p, k in zip(parts, ks)]
            M = torch.diag(d) + sum(Pj @ B @ Pj.mT for Pj, B in zip(P, blocks))
            return torch.logdet(M), y @ torch.linalg.solve(M, y)
        op = BlockMeanSumLinearOperator(d, *blocks, partitions=parts)
        with closed_forms_only(n):
            quad, logdet = op.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        return logdet, quad

    ref = terms(True)
    ref_grads = torch.autograd.grad(ref[0] + ref[1], (log_var, log_noise))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for ratio, chunk in ((math.inf, 2**22), (math.inf, 7), (0, 2**22)):
        monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", ratio)
        monkeypatch.setattr(bms, "CELL_PRODUCT_ELEMENTS", chunk)
        got = terms(False)
        torch.testing.assert_close(torch.stack(got), torch.stack(ref), **tol)
        grads = torch.autograd.grad(got[0] + got[1], (log_var, log_noise))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ratio", [0, math.inf], ids=["pairs_backward", "csr_backward"])
def test_cuda_matches_cpu(monkeypatch, ratio):
    """On CUDA the product is cuSPARSE's CSR-by-CSR product; values and gradients equal the CPU ones."""
    monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", ratio)
    ca, cb, va, vb, c = _tables(6, 300, 9, 6, 50, torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        cells_a = bms._Cells(*(t.to(device) for t in (ca.row, ca.col, ca.of_index, ca.starts)))
        cells_b = bms._Cells(*(t.to(device) for t in (cb.row, cb.col, cb.of_index, cb.starts)))
        leaves = [t.detach().to(device).requires_grad_(True) for t in (va, vb, c)]
        a, b, cc = leaves
        out = bms._cells_product(cells_a, a, cells_b, b, cc, 6, 9).square().sum()
        out = out + bms._cells_product(cells_a, a, cells_a, a, cc, 9, 9).sum()
        results.append([out.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(out, leaves))])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_past_max_cell_pairs_one_csr_product_joins_no_pairs(monkeypatch, dtype):
    """Past MAX_CELL_PAIRS, where the CSR product costs less than the GEMM (CELL_PAIRS_GEMM_RATIO), the Schur
    blocks come from the cells without joining a single pair, forward or backward (the backward's pairs path is
    capped by MAX_CELL_PAIRS too); the log-determinant, the quadratic form and their gradients equal dense linear
    algebra. A batch (no CSR product) takes the GEMM there."""
    monkeypatch.setattr(bms, "MAX_CELL_PAIRS", 0)
    monkeypatch.setattr(bms, "CELL_PAIRS_GEMM_RATIO", 1)
    monkeypatch.setattr(bms, "CELL_PRODUCT_DENSE_RATIO", 0)  # the backward would take the pairs were it not capped
    joins, products = [], []
    original_join, original_product = bms._Cells.join, bms._cells_product
    monkeypatch.setattr(bms._Cells, "join", lambda self, other: joins.append(1) or original_join(self, other))
    monkeypatch.setattr(bms, "_cells_product", lambda *a: products.append(1) or original_product(*a))
    test_crossed_sum_loss_and_gradients_match_dense(monkeypatch, dtype)
    assert products and not joins
    products.clear()
    g = torch.Generator().manual_seed(8)
    n, ks = 120, (30, 9, 4)
    parts = [Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks]
    blocks = [
        torch.rand(2, 1, 1, dtype=dtype) * torch.eye(k, dtype=dtype) + 0.1 * torch.eye(k, dtype=dtype) for k in ks
    ]
    d = torch.rand(2, n, dtype=dtype) + 0.5
    op = BlockMeanSumLinearOperator(d, *blocks, partitions=parts)
    dense = op.to_dense()
    torch.testing.assert_close(op.logdet(), torch.logdet(dense.double()).to(dtype), rtol=1e-4, atol=1e-4)
    assert not products


def test_mixed_dtypes_take_the_pairs(monkeypatch):
    """Values and ``c`` of different dtypes (promoted by the pairs' products) do not enter the CSR product."""
    calls = []
    original = bms._cells_product_pairs
    monkeypatch.setattr(bms, "_cells_product_pairs", lambda *a: calls.append(1) or original(*a))
    ca, cb, va, vb, c = _tables(9, 60, 5, 4, 8, torch.float32)
    out = bms._cells_product(ca, va, cb, vb, c.detach().double(), 4, 5)
    assert calls == [1] and out.dtype == torch.float64
    Na, Nb = _dense(ca, va.detach().double(), 5, 8), _dense(cb, vb.detach().double(), 4, 8)
    torch.testing.assert_close(out.detach(), (Na * c.detach().double()) @ Nb.mT)


def _slopes_sum(dtype, log_var, log_noise, parts, x, dense: bool):
    """``(1 + x | user)`` as two diagonal terms over the users (the second weighted by ``x``), plus items and
    departments crossed with them; the operator, or its dense matrix."""
    n = x.shape[0]
    var = log_var.exp()
    ks = [p.num_blocks for p in parts]
    vectors = [v * torch.ones(k, dtype=dtype) for v, k in zip(var, ks)]
    d = log_noise.exp().expand(n)
    weights = [None, x, None, None]
    if dense:
        P = [torch.nn.functional.one_hot(p.labels, k).to(dtype) for p, k in zip(parts, ks)]
        P = [Pj if w is None else Pj * w.unsqueeze(-1) for Pj, w in zip(P, weights)]
        return torch.diag(d) + sum((Pj * v) @ Pj.mT for Pj, v in zip(P, vectors))
    return BlockMeanSumLinearOperator(d, *vectors, partitions=parts, weights=weights, diagonal=[True] * 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunk", [2**22, 7], ids=["whole", "chunked"])
def test_joint_elimination_on_cells_matches_dense(monkeypatch, dtype, chunk):
    """Random slopes on the eliminated grouping (its intercept and slope eliminated jointly) beside two groupings
    crossed with it and held as cells: the Schur correction is the cells' products and the solves multiply by the
    cells, with no ``(r, k, r_e)`` tensor formed; log-determinant, quadratic form, a solve and the gradients in the
    variances and the noise equal dense linear algebra, and the formed ``A_rE`` (the posterior's) equals the
    formed path's."""
    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    monkeypatch.setattr(bms, "CELL_PRODUCT_ELEMENTS", chunk)
    crosses, dense_forms = [], []
    original_cross, original_formed = bms.BlockMeanSumLinearOperator._joint_cross, bms._formed_cross
    monkeypatch.setattr(
        bms.BlockMeanSumLinearOperator, "_joint_cross", lambda self, *a: crosses.append(1) or original_cross(self, *a)
    )
    monkeypatch.setattr(bms, "_formed_cross", lambda *a: dense_forms.append(1) or original_formed(*a))
    g = torch.Generator().manual_seed(11)
    n, ks = 160, (30, 9, 3)
    users, items, depts = (Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks)
    parts = [users, users, items, depts]
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5).to(dtype)
    y = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    log_var = torch.tensor([-0.2, -1.0, 0.3, -0.7], dtype=dtype, requires_grad=True)
    log_noise = torch.tensor(-0.4, dtype=dtype, requires_grad=True)
    M = _slopes_sum(dtype, log_var, log_noise, parts, x, dense=True)
    ref = (torch.logdet(M), y @ torch.linalg.solve(M, y))
    ref_grads = torch.autograd.grad(ref[0] + ref[1], (log_var, log_noise))
    op = _slopes_sum(dtype, log_var, log_noise, parts, x, dense=False)
    with closed_forms_only(n):
        quad, logdet = op.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
        solved = op.solve(y.unsqueeze(-1)).squeeze(-1)
    assert crosses and not dense_forms
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.stack([logdet, quad]), torch.stack(ref), **tol)
    torch.testing.assert_close(solved, torch.linalg.solve(M, y), **tol)
    grads = torch.autograd.grad(logdet + quad, (log_var, log_noise))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)
    joint = op._capacitance().joint
    assert joint is not None and joint.cross is not None and joint.formed is None and not dense_forms
    formed = joint.A_rE  # the posterior at new inputs forms it on first use
    assert len(dense_forms) == 1
    with torch.no_grad():
        rest = [t for t in range(4) if t not in joint.terms]
        expected = op._joint_dense_cross(rest, list(joint.terms), joint.g)
    torch.testing.assert_close(formed.detach(), expected)


def test_joint_elimination_keeps_the_gemm_where_a_table_is_dense(monkeypatch):
    """With the default density threshold a small crossing's tables are dense: A_rE is formed, as before."""
    g = torch.Generator().manual_seed(12)
    n, ks = 160, (30, 9, 3)
    users, items, depts = (Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks)
    x = torch.rand(n, generator=g, dtype=torch.float64)
    log_var = torch.tensor([-0.2, -1.0, 0.3, -0.7], dtype=torch.float64)
    op = _slopes_sum(
        torch.float64, log_var, torch.tensor(-0.4, dtype=torch.float64), [users, users, items, depts], x, False
    )
    op.logdet()
    joint = op._capacitance().joint
    assert joint is not None and joint.cross is None and joint.formed is not None
    M = _slopes_sum(
        torch.float64, log_var, torch.tensor(-0.4, dtype=torch.float64), [users, users, items, depts], x, True
    )
    torch.testing.assert_close(op.logdet(), torch.logdet(M))


@pytest.mark.filterwarnings("ignore:The input matches the stored training data")
@pytest.mark.parametrize("case", ["slopes", "slopes_group_noise", "slopes_fixed_noise"])
def test_posterior_after_a_joint_elimination_on_cells_matches_gpytorch(monkeypatch, case):
    """The posterior at new inputs of slope models whose joint elimination kept the crossed tables as cells (the
    strategy forms A_rE on first use) equals GPyTorch's dense computation."""
    from test_mixed_posterior import reference
    from test_mixed_prediction import build, closed_form, random_new_inputs

    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    used = []
    original = bms.BlockMeanSumLinearOperator._joint_cross

    def spy(self, *args):
        cross = original(self, *args)
        used.append(cross is not None)
        return cross

    monkeypatch.setattr(bms.BlockMeanSumLinearOperator, "_joint_cross", spy)
    model, _, _ = build(case)
    model.eval()
    xt = random_new_inputs(50)
    _, (mean, dense, diag, _), _ = closed_form(model, xt, False)
    assert any(used)
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)


def test_a_joint_elimination_on_cells_keeps_no_reference_to_its_operator(monkeypatch):
    """The cells' form of A_rE forms the dense tensor from the tables alone: the operator (and its memoized
    capacitance) is freed when the last reference goes, without waiting for the cycle collector."""
    import gc
    import weakref

    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    g = torch.Generator().manual_seed(13)
    n, ks = 120, (25, 8, 3)
    users, items, depts = (Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks)
    x = torch.rand(n, generator=g, dtype=torch.float64)
    log_var = torch.tensor([-0.2, -1.0, 0.3, -0.7], dtype=torch.float64)
    noise = torch.tensor(-0.4, dtype=torch.float64)
    op = _slopes_sum(torch.float64, log_var, noise, [users, users, items, depts], x, False)
    op.logdet()
    assert op._capacitance().joint.cross is not None
    ref = weakref.ref(op)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del op
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("slopes", [False, True], ids=["single", "joint"])
def test_meta_operators_with_sparse_tables_evaluate_shapes(monkeypatch, slopes):
    """A meta copy of a sum whose crossed tables would be held as cells (single or joint elimination) evaluates its
    log-determinant's shape: it has no labels to find the cells in, so it takes the formed tables (it raised
    torch's "no Meta kernel" for ``unique``)."""
    monkeypatch.setattr(bms, "SPARSE_CELLS_DENSITY", math.inf)
    g = torch.Generator().manual_seed(14)
    n, ks = 120, (25, 8, 3)
    users, items, depts = (Partition.from_labels(_labels(k, n, g), num_blocks=k) for k in ks)
    if slopes:
        x = torch.rand(n, generator=g, dtype=torch.float64)
        log_var = torch.tensor([-0.2, -1.0, 0.3, -0.7], dtype=torch.float64)
        parts = [users, users, items, depts]
        op = _slopes_sum(torch.float64, log_var, torch.tensor(-0.4, dtype=torch.float64), parts, x, False)
    else:
        vectors = [torch.full((k,), 0.5, dtype=torch.float64) for k in ks]
        op = BlockMeanSumLinearOperator(
            torch.ones(n, dtype=torch.float64), *vectors, partitions=[users, items, depts], diagonal=[True] * 3
        )
    shape_only = op.to("meta").logdet()
    assert shape_only.device.type == "meta" and shape_only.shape == op.logdet().shape
