"""The numba reduction of one tile of kernel values (bma_gp._kernel_sums.jit) against dense sums.

``tile_sums`` is called directly on random tiles: row and column blocks of very different sizes
(singletons, one block spanning the tile, blocks cut by the tasks' column ranges), tasks of a few
columns, batches, both dtypes, with and without derivative sums, plain and mirrored tiles placed
anywhere in a larger accumulator. Engine-level agreement with the dense block mean, for both tile
backends, is in test_kernel_block_mean.py (the ``tile_backend`` fixture).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

jit = importlib.import_module("bma_gp._kernel_sums.jit")

if not jit.AVAILABLE:  # an optional dependency, like CUDA: this module tests only the numba kernel
    pytest.skip("numba is not installed (pip install bma-gp[jit])", allow_module_level=True)

LAYOUTS = {
    "one_block_each": ([37], [61]),
    "singletons": ([1] * 9, [1] * 23),
    "mixed": ([1, 5, 2, 20, 1, 7], [3, 1, 40, 1, 1, 9, 2, 30]),
    "column_block_over_many_tasks": ([4, 4], [2, 150, 3]),
}


def _bounds(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _indicator(sizes, dtype=torch.float64):
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.nn.functional.one_hot(labels, len(sizes)).to(dtype)


def _tile(layout, dtype, bsz, seed):
    rows, cols = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    shape = (bsz, sum(rows), sum(cols))
    values = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    zr = torch.randn(bsz, sum(rows), 3, generator=gen, dtype=torch.float64).to(dtype)
    zc = torch.randn(bsz, sum(cols), 3, generator=gen, dtype=torch.float64).to(dtype)
    return rows, cols, values, weights, zr, zc


def _dense(rows, cols, values, weights, zr, zc):
    """Sums and derivative sums by dense float64 algebra. # shapes: (B, m, q), (B, m, d, q)"""
    pr, pc = _indicator(rows), _indicator(cols)
    v, w, zr, zc = (t.double() for t in (values, weights, zr, zc))
    sums = pr.T @ v @ pc
    diff2 = (zr.unsqueeze(2) - zc.unsqueeze(1)).square()  # (B, R, C, d)
    derivs = torch.einsum("rm,brc,brca,cq->bmaq", pr, w, diff2, pc)
    return sums, derivs


@pytest.fixture(params=["wide_tasks", "narrow_tasks"])
def tasks(request, monkeypatch):
    """Default task widths, or tasks of 8 columns so that column blocks are cut by, and span, several tasks."""
    if request.param == "narrow_tasks":
        monkeypatch.setattr(jit, "MIN_CHUNK", 1)
        monkeypatch.setattr(jit, "ACCUMULATOR_BYTES", 8 * 4 * 8)  # 8 columns of 4 float64 features
    return request.param


@pytest.fixture
def poisoned_kept(monkeypatch):
    """The derivative sums' buffer, which the kernel writes without zeroing it first, full of NaN: an entry
    the kernel missed shows (fresh pages from the system are zeros and would hide it)."""
    real = torch.empty
    monkeypatch.setattr(jit.torch, "empty", lambda *a, **kw: real(*a, **kw).fill_(float("nan")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bsz", [1, 2])
@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.usefixtures("poisoned_kept")
def test_tile_sums_match_dense(layout, dtype, bsz, mirror, tasks):
    rows, cols, values, weights, zr, zc = _tile(layout, dtype, bsz, seed=len(layout) + bsz)
    k, r0, c0 = 70, 3, 20  # the tile's blocks sit inside a larger accumulator
    acc = torch.randn(bsz, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    before = acc.clone()
    kept = jit.tile_sums(values, weights, _bounds(rows), _bounds(cols), zr, zc, acc, (r0, c0, mirror), -0.5)
    sums, derivs = _dense(rows, cols, values, weights, zr, zc)
    expected = before.clone()
    m, q = len(rows), len(cols)
    expected[:, r0 : r0 + m, c0 : c0 + q] += sums
    if mirror:
        expected[:, c0 : c0 + q, r0 : r0 + m] += sums.transpose(1, 2)
    tol = dict(rtol=1e-12, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(acc, expected, **tol)  # and nothing outside the tile's blocks changed
    assert kept.dtype == dtype and kept.shape == (bsz, m, 3, q)
    torch.testing.assert_close(kept.double(), -0.5 * derivs, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_sums_alone_and_weights_equal_to_values(dtype, tasks):
    rows, cols, values, _, zr, zc = _tile("mixed", dtype, 1, seed=3)
    sums, derivs = _dense(rows, cols, values, values, zr, zc)
    acc = torch.zeros(1, len(rows), len(cols), dtype=torch.float64)
    assert jit.tile_sums(values, None, _bounds(rows), _bounds(cols), zr, zc, acc, (0, 0, False)) is None
    tol = dict(rtol=1e-12, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(acc, sums, **tol)
    acc.zero_()
    kept = jit.tile_sums(values, values, _bounds(rows), _bounds(cols), zr, zc, acc, (0, 0, False))
    torch.testing.assert_close(acc, sums, **tol)
    torch.testing.assert_close(kept.double(), derivs, **tol)


def test_inputs_that_are_views_are_read_as_their_values():
    rows, cols, values, weights, zr, zc = _tile("mixed", torch.float64, 1, seed=5)
    acc_a = torch.zeros(1, len(rows), len(cols), dtype=torch.float64)
    acc_b = torch.zeros_like(acc_a)
    kept_a = jit.tile_sums(values, weights, _bounds(rows), _bounds(cols), zr, zc, acc_a, (0, 0, False))
    # zc as the transpose of a (B, d, C) tensor, zr with a stride: both are made contiguous first
    zc_view = zc.transpose(1, 2).contiguous().transpose(1, 2)
    zr_view = torch.cat([zr, zr], -1)[..., :3]
    kept_b = jit.tile_sums(values, weights, _bounds(rows), _bounds(cols), zr_view, zc_view, acc_b, (0, 0, False))
    assert torch.equal(acc_a, acc_b) and torch.equal(kept_a, kept_b)


def test_accumulator_must_be_contiguous_float64():
    rows, cols, values, weights, zr, zc = _tile("mixed", torch.float64, 1, seed=6)
    acc = torch.zeros(1, len(rows), len(cols), dtype=torch.float32)
    with pytest.raises(ValueError, match="acc must be a contiguous float64"):
        jit.tile_sums(values, weights, _bounds(rows), _bounds(cols), zr, zc, acc, (0, 0, False))


def test_usable_only_on_cpu_in_float32_and_float64(monkeypatch):
    assert jit.usable(torch.device("cpu"), torch.float32) and jit.usable("cpu", torch.float64)
    assert not jit.usable("cpu", torch.float16) and not jit.usable("cpu", torch.bfloat16)
    assert not jit.usable(torch.device("cuda", 0), torch.float32)  # a device object, nothing allocated there
    assert not jit.usable("cpu", torch.float64, jit.MIN_ENTRIES - 1)  # small passes: numba is not even imported
    monkeypatch.setattr(jit, "BACKEND", "torch")
    assert not jit.usable("cpu", torch.float64)


def test_a_numba_that_fails_to_import_warns_once_and_the_torch_reduction_runs(monkeypatch):
    import builtins

    from gpytorch.kernels import RBFKernel, ScaleKernel

    from bma_gp import Partition
    from bma_gp.kernel_block_mean import kernel_block_mean

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("Numba needs NumPy 2.3 or less")
        return real_import(name, *args, **kwargs)

    stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
    kernel = ScaleKernel(RBFKernel(ard_num_dims=2)).double()
    x = torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    partition = Partition.from_labels(torch.arange(60) % 7)
    expected = kernel_block_mean(kernel, x, partition)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(jit, "_IMPORT", [])
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    ran = []
    real = stationary._tile_block_sums
    monkeypatch.setattr(stationary, "_tile_block_sums", lambda *a: ran.append(1) or real(*a))
    with pytest.warns(RuntimeWarning, match="numba is installed but could not be imported.*NumPy 2.3"):
        op = kernel_block_mean(kernel, x, partition)
    assert ran and not jit.usable("cpu", torch.float64)
    torch.testing.assert_close(op.B, expected.B, rtol=1e-12, atol=1e-12)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        kernel_block_mean(kernel, x, partition)


@pytest.mark.parametrize("d", [1, 2, 4, 7])  # derivative features walked singly, three at a time, and both
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.usefixtures("poisoned_kept")
def test_derivative_sums_for_any_number_of_features(d, dtype, tasks):
    rows, cols = LAYOUTS["mixed"]
    gen = torch.Generator().manual_seed(d)
    shape = (1, sum(rows), sum(cols))
    values, weights = (torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    zr = torch.randn(1, sum(rows), d, generator=gen, dtype=torch.float64).to(dtype)
    zc = torch.randn(1, sum(cols), d, generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.zeros(1, len(rows), len(cols), dtype=torch.float64)
    kept = jit.tile_sums(values, weights, _bounds(rows), _bounds(cols), zr, zc, acc, (0, 0, False), 2.0)
    sums, derivs = _dense(rows, cols, values, weights, zr, zc)
    tol = dict(rtol=1e-12, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(acc, sums, **tol)
    assert kept.shape == (1, len(rows), d, len(cols))
    torch.testing.assert_close(kept.double(), 2.0 * derivs, **tol)


class _Tile:
    def __init__(self, row_block, col_block, mirror):
        self.row_block, self.col_block, self.mirror = row_block, col_block, mirror


def _kept(shapes, bsz, d, dtype, gen, layout):
    """Random derivative sums per tile: views of one buffer one after the other (as the engine makes them), or
    separate tensors (copied into one buffer by contract_kept)."""
    sums = [torch.randn(bsz, m, d, q, generator=gen, dtype=torch.float64).to(dtype) for m, q in shapes]
    if layout == "separate":
        return dict(enumerate(sums))
    flat = torch.cat([v.reshape(-1) for v in sums])
    kept, offset = {}, 0
    for i, v in enumerate(sums):
        kept[i] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    return kept


@pytest.mark.parametrize("layout", ["one_buffer", "separate"])
@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_contract_kept_matches_dense(monkeypatch, layout, mirror, dtype):
    """Every tile in one launch, against the dense contraction of the tiles' derivative sums with the gradient's
    block pairs; the engine's buffer is read in place, separate tensors are copied into one."""
    kernels = importlib.import_module("bma_gp._kernel_sums._jit_kernels")
    seen = []
    real = kernels.contract_tiles
    monkeypatch.setattr(kernels, "contract_tiles", lambda *a: seen.append(a[1]) or real(*a))
    gen = torch.Generator().manual_seed(3)
    k, bsz, d = 40, 2, 3
    grad = torch.randn(bsz, k, k, generator=gen, dtype=torch.float64).to(dtype)
    tiles = [_Tile(2, 9, mirror), _Tile(20, 5, mirror)]
    kept = _kept([(7, 11), (13, 30)], bsz, d, dtype, gen, layout)
    out = torch.full((bsz, d), 0.25, dtype=torch.float64)
    jit.contract_kept(grad, kept, tiles, out)
    expected = torch.full((bsz, d), 0.25, dtype=torch.float64)
    g = grad.double()
    for index, derivs in kept.items():
        t, (m, q) = tiles[index], (derivs.shape[1], derivs.shape[3])
        block = g[:, t.row_block : t.row_block + m, t.col_block : t.col_block + q]
        if t.mirror:
            block = block + g[:, t.col_block : t.col_block + q, t.row_block : t.row_block + m].transpose(1, 2)
        expected += torch.einsum("bic,biac->ba", block, derivs.double())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(seen) == 1  # one launch for both tiles
    shares = np.shares_memory(seen[0], next(iter(kept.values())).numpy())
    assert shares == (layout == "one_buffer")


@pytest.mark.parametrize("layout", ["one_buffer", "separate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_contraction_matches_dense(layout, dtype):
    """``G = scale col col^T * grad`` off the diagonal and ``diag`` on it, applied while the kernel reads ``grad``:
    against the dense contraction with ``G`` formed, for tiles that hold diagonal pairs (plain and mirrored, where
    the pair counts twice) and tiles that do not."""
    gen = torch.Generator().manual_seed(5)
    k, bsz, d = 30, 2, 3
    grad = torch.randn(bsz, k, k, generator=gen, dtype=torch.float64).to(dtype)
    scaling = jit.GradientScaling(
        torch.rand(k, generator=gen, dtype=torch.float64) + 0.5,
        torch.rand(bsz, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(bsz, k, generator=gen, dtype=torch.float64) * 10,
    )

    tiles = [_Tile(5, 3, True), _Tile(0, 0, False), _Tile(2, 20, True), _Tile(12, 10, False)]
    shapes = [(7, 9), (6, 6), (4, 10), (5, 3)]
    kept = _kept(shapes, bsz, d, dtype, gen, layout)
    out = torch.zeros(bsz, d, dtype=torch.float64)
    jit.contract_kept(grad, kept, tiles, out, scaling)
    G = scaling.scale.view(-1, 1, 1) * scaling.col.unsqueeze(-1) * scaling.col * grad.double()
    G.diagonal(dim1=-2, dim2=-1).copy_(scaling.diag)
    expected = torch.zeros(bsz, d, dtype=torch.float64)
    for index, derivs in kept.items():
        t, (m, q) = tiles[index], shapes[index]
        block = G[:, t.row_block : t.row_block + m, t.col_block : t.col_block + q]
        if t.mirror:
            block = block + G[:, t.col_block : t.col_block + q, t.row_block : t.row_block + m].transpose(1, 2)
        expected += torch.einsum("bic,biac->ba", block, derivs.double())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["none", "one", "per_batch"])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.usefixtures("poisoned_kept")
def test_block_means_equal_the_torch_steps_to_the_bit(scale, keep, dtype):
    """The compiled means pass against ``_unscaled_means`` and ``_scaled`` (the torch path): every entry of ``B``,
    ``B0`` and ``lam0`` the same, singleton blocks included, and ``acc`` left as it was."""
    stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
    gen = torch.Generator().manual_seed(7)
    k, bsz = 37, 2
    sizes = torch.randint(1, 9, (k,), generator=gen)
    sizes[[0, 5, 36]] = 1
    acc = torch.rand(bsz, k, k, generator=gen, dtype=torch.float64) * sizes * sizes.unsqueeze(-1)
    acc.diagonal(dim1=-2, dim2=-1).add_(sizes)  # f(0) = 1 on the diagonal pairs of a point with itself
    sc = {"none": None, "one": torch.tensor(0.7, dtype=dtype), "per_batch": torch.tensor([0.7, 1.3], dtype=dtype)}
    sc = sc[scale]
    before = acc.clone()
    flat = sc.reshape(-1).expand(bsz) if sc is not None else None
    B, B0, lam0 = jit.block_means(acc, sizes, flat, dtype, keep)
    assert torch.equal(acc, before)
    ref = acc.clone()
    ref_lam0, _ = stationary._unscaled_means(ref, sizes)
    ref_B0 = ref.to(dtype) if keep and sc is not None else None
    sc_b = sc.reshape(-1, 1, 1) if sc is not None else None
    if sc_b is not None and sc_b.shape[0] > 1:
        ref_B = (ref_B0 if ref_B0 is not None else ref.to(dtype)) * sc_b
    else:
        _, ref_B = stationary._scaled(ref, ref_lam0, sc, dtype, rounded=ref_B0)
    assert torch.equal(lam0, ref_lam0)
    assert B.dtype == dtype and torch.equal(B, ref_B)
    if keep:
        assert torch.equal(B0, ref.to(dtype))
    else:
        assert B0 is None
