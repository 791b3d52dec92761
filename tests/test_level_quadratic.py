"""The predictive variance over crossed groupings, level by level (``_Structured._one_hot_rest_quadratic``).

At new inputs the variance's quadratic form is ``diag(U C U^T)`` with ``U = [V, F_r]``. Where every other term's
block of ``F_r`` is one-hot (crossed random intercepts and slopes), row ``a`` of ``V`` is a combination of the
eliminated level's rows of ``A_Er``, so the products with the core are taken once per level and the rows read
gathers of them, instead of forming every row's ``2R`` columns. These tests check it against GPyTorch's dense
posterior (both weight forms, one and many level chunks, the GEMM and the CSR product, unseen levels), against the
row chunks it replaces (values and gradients, float32), and that the row chunks still serve the cases it leaves.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import bma_gp.kernels.sum_prediction_strategy as sps
from test_mixed_posterior import reference
from test_mixed_prediction import build, closed_form, new_inputs, random_new_inputs

pytestmark = pytest.mark.filterwarnings("ignore:The input matches the stored training data")

CROSSED = [
    "crossed",
    "crossed_per_group",
    "crossed_fixed_noise",
    "crossed_group_noise",
    "slopes",
    "slopes_uncorrelated",
    "slope_only",
    "slopes_group_noise",
]


def _paths(monkeypatch) -> list[bool]:
    """Per diagonal of a structured form: whether it went level by level."""
    taken: list[bool] = []
    original = sps._Structured._one_hot_rest_quadratic

    def spy(self):
        res = original(self)
        taken.append(res is not None)
        return res

    monkeypatch.setattr(sps._Structured, "_one_hot_rest_quadratic", spy)
    return taken


def _spy_nonzeros(monkeypatch) -> dict[str, list]:
    """What :class:`sps._LevelRows` did: ``"pairs"``, per diagonal whether the cross term took the pairs;
    ``"csr"``, per level chunk whether its product was the CSR one; ``"cells"`` (``"joint"``), per structured form
    of one eliminated grouping (of a joint elimination) whether the nonzeros came from the tables' cells."""
    seen: dict[str, list] = {"pairs": [], "csr": [], "cells": [], "joint": []}
    pays, product, from_cells = sps._LevelRows.pairs_pay, sps._LevelRows.product, sps._LevelRows.from_cells
    from_joint = sps._LevelRows.from_joint_cells

    def spy_pays(self, *args):
        seen["pairs"].append(pays(self, *args))
        return seen["pairs"][-1]

    def spy_product(self, *args):
        res = product(self, *args)
        seen["csr"].append(res[1] is None)
        return res

    def spy_cells(*args):
        res = from_cells(*args)
        seen["cells"].append(res is not None)
        return res

    monkeypatch.setattr(sps._LevelRows, "pairs_pay", spy_pays)
    monkeypatch.setattr(sps._LevelRows, "product", spy_product)

    def spy_joint(*args):
        res = from_joint(*args)
        seen["joint"].append(res is not None)
        return res

    monkeypatch.setattr(sps._LevelRows, "from_cells", staticmethod(spy_cells))
    monkeypatch.setattr(sps._LevelRows, "from_joint_cells", staticmethod(spy_joint))
    return seen


def _inputs():
    return torch.cat([new_inputs(), random_new_inputs(40)])  # unseen levels of both groupings, then seen ones


# (case, weight form): the stable form (G - Sigma) is structured only while R^2 <= q, which the slope models here
# (R = 7 other levels, q = 19) are not; their G - Sigma is formed and no row or level is read
CASE_WEIGHTS = [(case, "stable") for case in CROSSED if case.startswith("crossed")] + [
    (case, "products") for case in CROSSED
]


@pytest.mark.parametrize("table", ["dense", "cells"])
@pytest.mark.parametrize("product", ["gemm", "csr", "pairs"])
@pytest.mark.parametrize("chunks", ["one", "per_level"])
@pytest.mark.parametrize(("case", "weight"), CASE_WEIGHTS)
def test_levels_match_gpytorch(case, weight, chunks, product, table, monkeypatch):
    import bma_gp.block_mean_sum_linear_operator as sums

    if weight == "products":  # the weight applied as products (many eliminated levels), not G - Sigma
        monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
        monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    # the grouping tables with the eliminated grouping held as their cells (a crossed random intercept's, read
    # level by level without forming A_Er), or as dense blocks
    monkeypatch.setattr(sums, "SPARSE_CELLS_DENSITY", 1e9 if table == "cells" else 0.0)
    if chunks == "per_level":  # a level chunk per level; with the pairs, a chunk per nonzero or row
        monkeypatch.setattr(sps, "_DIAG_CHUNK", 1)
        monkeypatch.setattr(sps, "_LEVEL_PAIRS_CHUNK", 1)
    monkeypatch.setattr(sps, "SPARSE_ROWS_DENSITY", 1.0 if product == "csr" else 0.0)  # pairs: A_l C_VV by GEMM
    monkeypatch.setattr(sps, "LEVEL_PAIR_COST", 0 if product == "pairs" else float("inf"))
    seen = _spy_nonzeros(monkeypatch)
    taken = _paths(monkeypatch)
    model, _, _ = build(case)
    model.eval()
    xt = _inputs()
    _, (mean, dense, diag, variance), noisy = closed_form(model, xt, False)
    assert taken and all(taken)
    assert seen["csr"] and all(c == (product == "csr") for c in seen["csr"])
    assert seen["pairs"] and all(p == (product == "pairs") for p in seen["pairs"])
    # with the tables as cells, the crossed intercepts' nonzeros come from them (a slope's joint elimination has none)
    assert not any(seen["cells"]) if table == "dense" else (not case.startswith("crossed") or all(seen["cells"]))
    assert seen["cells"] or not case.startswith("crossed")
    # a correlated slope's joint elimination reads its tables' cells where the training side kept them
    assert (
        not any(seen["joint"])
        if table == "dense"
        else (case not in ("slopes", "slopes_group_noise") or all(seen["joint"]))
    )
    assert seen["joint"] or case not in ("slopes", "slopes_group_noise") or table == "dense"
    ref_mean, ref_cov = reference(model, xt)
    torch.testing.assert_close(diag, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, torch.diagonal(ref_cov), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense, ref_cov, rtol=1e-8, atol=1e-10)  # the entries: the rows, as before
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["sgpr_gpytorch", "sgpr_chunked_group_noise"])
def test_a_dense_block_keeps_the_row_chunks(case, monkeypatch):
    """An inducing-point root's block of ``F_r`` is dense: its rows are formed, as before."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)  # the structured form (else W is formed here)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    taken = _paths(monkeypatch)
    model, _, _ = build(case)
    model.eval()
    xt = _inputs()
    _, (_, _, diag, _), _ = closed_form(model, xt, False)
    assert taken and not any(taken)
    torch.testing.assert_close(diag, torch.diagonal(reference(model, xt)[1]), rtol=1e-8, atol=1e-10)


def _variance_and_grads(model, xt):
    model.train()
    model.eval()  # a fresh prediction strategy
    params = [p for p in model.parameters() if p.requires_grad]
    with gpytorch.settings.detach_test_caches(False), gpytorch.settings.max_cholesky_size(0):
        variance = model(xt).variance
        weights = torch.linspace(1, 2, variance.shape[-1], dtype=variance.dtype)
        grads = torch.autograd.grad((variance * weights).sum(), params, allow_unused=True)
    return variance.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize(
    ("case", "weight"),
    [("crossed", "stable"), ("crossed", "products"), ("crossed_group_noise", "products"), ("slopes", "products")],
)
def test_gradients_equal_the_row_chunks(case, weight, monkeypatch):
    if weight == "products":
        monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
        monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    monkeypatch.setattr(sps, "LEVEL_PAIR_COST", 0)  # not under a gradient: the products
    model, _, _ = build(case)
    xt = _inputs()
    taken = _paths(monkeypatch)
    levels, levels_grads = _variance_and_grads(model, xt)
    assert taken and all(taken)
    monkeypatch.setattr(sps._Structured, "_one_hot_rest_quadratic", lambda self: None)
    rows, rows_grads = _variance_and_grads(model, xt)
    torch.testing.assert_close(levels, rows, rtol=1e-10, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in rows_grads)
    for a, b in zip(levels_grads, rows_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["crossed", "slopes"])
def test_float32_equals_the_row_chunks(case, monkeypatch):
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    model, _, _ = build(case)
    model = model.float().eval()
    xt = _inputs().float()
    taken = _paths(monkeypatch)
    with torch.no_grad():
        levels = model(xt).variance
    assert taken and all(taken) and levels.dtype == torch.float32
    monkeypatch.setattr(sps._Structured, "_one_hot_rest_quadratic", lambda self: None)
    model.train()
    model.eval()
    with torch.no_grad():
        rows = model(xt).variance
    torch.testing.assert_close(levels, rows, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["products", "pairs"])
@pytest.mark.parametrize("slope", [False, True], ids=["intercepts", "slope"])
def test_three_crossed_groupings_match_gpytorch(slope, form, monkeypatch):
    """Two other groupings beside the eliminated one (lme4's InstEval has three): the pairs of ``F_r``'s blocks."""
    from bma_gp import GroupKernel
    from test_mixed_prediction import GP

    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)

    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    monkeypatch.setattr(sps, "LEVEL_PAIR_COST", 0 if form == "pairs" else float("inf"))
    monkeypatch.setattr(sps, "_LEVEL_PAIRS_CHUNK", 97)  # several chunks of pairs
    monkeypatch.setattr(sps, "_DIAG_CHUNK", 200)  # a few levels per chunk
    taken = _paths(monkeypatch)
    g = torch.Generator().manual_seed(5)
    n, levels = 150, (12, 6, 4)
    ids = [torch.randint(0, k - 1, (n,), generator=g) for k in levels]  # the last level of each: never in training
    covariate = torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.stack([*(i.double() for i in ids), covariate], -1)
    y = sum(torch.randn(k, generator=g, dtype=torch.float64)[i] for k, i in zip(levels, ids)) + covariate
    first = GroupKernel(levels[0], slope=True, active_dims=[0, 3]) if slope else GroupKernel(levels[0], active_dims=[0])
    kernels = [first, GroupKernel(levels[1], active_dims=[1]), GroupKernel(levels[2], active_dims=[2])]
    for kernel, variance in zip(kernels, (0.7, 0.4, 0.2)):
        kernel.var = torch.full_like(kernel.var, variance)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, kernels).double().eval()
    likelihood.noise = 0.1
    t = 60
    xt = torch.stack(
        [*(torch.randint(0, k, (t,), generator=g).double() for k in levels), 1.3 * torch.rand(t, generator=g)], -1
    ).double()
    _, (_, _, diag, variance), _ = closed_form(model, xt, False)
    assert taken and all(taken)
    ref = torch.diagonal(reference(model, xt)[1])
    torch.testing.assert_close(diag, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(variance, ref, rtol=1e-8, atol=1e-10)


def test_no_rows():
    """The pieces of a prediction cut to no test rows: an empty diagonal, not an error (no level chunk runs)."""
    import dataclasses

    captured = []
    original = sps._Structured._one_hot_rest_quadratic

    def keep(self):
        captured.append(self)
        return original(self)

    model, _, _ = build("crossed")
    model.eval()
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
        patch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
        patch.setattr(sps._Structured, "_one_hot_rest_quadratic", keep)
        _ = model(_inputs()).variance
    parts = captured[0]
    rest = tuple((block.narrow(0, 0) if block is not None else None, size) for block, size in parts.rest)
    empty = dataclasses.replace(
        parts,
        inverse=parts.inverse[:0],
        v=parts.v[:0],
        index=parts.index[:0],
        w=parts.w[:0],
        A_Er=parts.A_Er[:0],
        rest=rest,
    )
    out = empty._one_hot_rest_quadratic()
    assert out is not None and out.shape == (0,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["crossed", "slopes"])
def test_cuda_matches_cpu(case, monkeypatch):
    """The level-by-level variance on CUDA (the GEMM; the CSR product is CPU-only here) against CPU."""
    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)
    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    taken = _paths(monkeypatch)
    out = {}
    for device in ("cpu", "cuda"):
        model, _, _ = build(case)
        model = model.to(device).eval()
        with torch.no_grad():
            out[device] = model(_inputs().to(device)).variance.cpu()
    assert len(taken) == 2 and all(taken)
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-8, atol=1e-10)


def test_pairs_warn_nothing(monkeypatch):
    """The pairs' CSR rows are built from the nonzeros found (valid by construction): no warning reaches the user
    (torch warns about sparse invariant checks left implicit, and that CSR support is in beta)."""
    import warnings

    monkeypatch.setattr(sps, "_DENSE_WEIGHT_MAX_ELIMINATED", 0)

    monkeypatch.setattr(sps, "_stable_past_threshold", lambda M: False)  # W past it, not G - Sigma
    monkeypatch.setattr(sps, "LEVEL_PAIR_COST", 0)
    monkeypatch.setattr(sps, "SPARSE_ROWS_DENSITY", 1.0)
    seen = _spy_nonzeros(monkeypatch)
    model, _, _ = build("crossed")
    model.eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        variance = model(_inputs()).variance
    assert seen["pairs"] and all(seen["pairs"]) and seen["csr"] and all(seen["csr"])
    assert [str(w.message) for w in caught if "sum_prediction_strategy" in w.filename] == []
    torch.testing.assert_close(variance, torch.diagonal(reference(model, _inputs())[1]), rtol=1e-8, atol=1e-10)
