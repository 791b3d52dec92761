"""One tile's block sums on CPU as a numba kernel (:mod:`bma_gp._kernel_sums._jit_kernels`).

The tiled engine (:mod:`bma_gp._kernel_sums.stationary`) evaluates a tile of kernel values with
torch (one GEMM, one elementwise pass); this module reduces it to per-block sums, and to the
lengthscale derivative sums, in one read of the tile, whatever the number of blocks. Without numba
(an optional dependency, ``pip install bma-gp[jit]``), or with :data:`BACKEND` set to ``"torch"``,
the engine reduces tiles with ``index_add`` and one small GEMM per row block instead; that path
costs more when blocks are small (many row blocks per tile), see docs/benchmarks.md. It is also taken, with one
``RuntimeWarning``, in a process forked from one that ran numba's kernels under its GNU OpenMP threading layer, which
is not fork-safe (:func:`bma_gp._numba.forked_unsafe`), and the parallel kernels are launched one thread at a time
under numba's ``workqueue`` layer (:func:`bma_gp._numba.launch`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bma_gp._numba import AVAILABLE, forked_unsafe, import_kernels, launch, match_torch_threads

__all__ = [
    "ACCUMULATOR_BYTES",
    "BACKEND",
    "MIN_CHUNK",
    "MEANS_MIN_ENTRIES",
    "MIN_ENTRIES",
    "GradientScaling",
    "block_means",
    "contract_kept",
    "tile_sums",
    "usable",
]

#: ``"numba"``: reduce tiles with the numba kernel where it applies (CPU, float32/float64, numba importable);
#: ``"torch"``: always with torch's ops (for comparisons and tests)
BACKEND = "numba"

#: smallest kernel matrix (batch x n x n entries) reduced by numba: below it the whole pass takes milliseconds,
#: less than importing numba and loading its cached kernel (about 1 s, once per process; the first compilation
#: on a machine takes about 10 s per dtype), so torch's reduction runs and numba is never imported
MIN_ENTRIES = 2**24

#: bytes of column accumulators per task, so that they stay in L1 (sets the columns per task)
ACCUMULATOR_BYTES = 24 * 1024
#: fewest columns per task (a task's fixed cost is a few row-block loops)
MIN_CHUNK = 64

#: block pairs (batch x k x k) from which the means are formed by :func:`block_means` (where the tiles were reduced
#: by numba): below it torch's five passes take microseconds
MEANS_MIN_ENTRIES = 2**14

_DTYPES = (torch.float32, torch.float64)
_IMPORT: list[bool] = []  # [whether numba and the kernel imported], once tried


def usable(device: torch.device, dtype: torch.dtype, entries: int = MIN_ENTRIES) -> bool:
    """Whether tiles of this device and dtype, in a pass over ``entries`` kernel entries, are reduced by numba (not in
    a process forked from one that ran numba's threads under a layer that is not fork-safe, where it warns once)."""
    return (
        BACKEND == "numba"
        and AVAILABLE
        and entries >= MIN_ENTRIES
        and torch.device(device).type == "cpu"
        and dtype in _DTYPES
        and not forked_unsafe("kernel block sums", "tiles are reduced with torch's ops (the same sums to rounding)")
        and _importable()
    )


def _importable() -> bool:
    """Import numba and the kernel once (:func:`bma_gp._numba.import_kernels`): where that fails, warn once and
    report ``False``, so that the block sums take torch's path."""
    return import_kernels(
        "bma_gp._kernel_sums._jit_kernels",
        _IMPORT,
        "kernel block sums",
        "tiles are reduced with torch's ops instead (slower with small blocks)",
    )


def _array(t: Tensor) -> np.ndarray:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def tile_sums(
    values: Tensor,
    weights: Tensor | None,
    row_bounds: np.ndarray,
    col_bounds: np.ndarray,
    zr: Tensor,
    zc: Tensor,
    acc: Tensor,
    at: tuple[int, int, bool],
    factor: float = 1.0,
    out: Tensor | None = None,
) -> Tensor | None:
    r"""Add a tile's per-block value sums to ``acc``; with ``weights``, also return its derivative sums.

    Args:
        values: kernel values of the tile. # shape: (B, R, C)
        weights: derivative weights :math:`w` (may be ``values``), or ``None`` for the value sums only.
        row_bounds: where each row block starts in the tile, then ``R``. # shape: (m + 1,)
        col_bounds: where each column block starts, then ``C``. # shape: (q + 1,)
        zr: the rows' scaled inputs. # shape: (B, R, d)
        zc: the columns' scaled inputs, same origin. # shape: (B, C, d)
        acc: float64 block sums, added to in place. # shape: (B, k, k)
        at: ``(row_block, col_block, mirror)``: the tile's first row and column block, and whether its
            sums are also added transposed.
        factor: multiplies the derivative sums.
        out: where to write the derivative sums (C-contiguous, ``values``' dtype), or ``None`` for a new tensor.

    Returns:
        ``factor`` times :math:`D_{bca} = \sum w (z_{pa} - z_{ja})^2` in ``values``' dtype, or ``None``
        without ``weights``. # shape: (B, m, d, q)
    """
    from bma_gp._kernel_sums import _jit_kernels

    match_torch_threads()
    bsz, _, cols = values.shape
    d = zr.shape[-1]
    feats = 1 + d if weights is not None else 1
    widest = max(MIN_CHUNK, ACCUMULATOR_BYTES // (feats * values.element_size()))
    threads = torch.get_num_threads()
    tasks = threads * -(-cols // (threads * widest))  # a multiple of the threads: no thread idles in a last round
    chunk = max(MIN_CHUNK, -(-cols // tasks))
    shape = (bsz, len(row_bounds) - 1, d, len(col_bounds) - 1) if weights is not None else (bsz, 0, 0, 0)
    if out is None:
        # every entry is written by the kernel; on the CPU whatever the global default device (numba's arrays)
        kept = torch.empty(shape, dtype=values.dtype, device="cpu")
    elif out.shape != shape or out.dtype != values.dtype or not out.is_contiguous():
        raise ValueError(f"tile_sums: out must be a contiguous {values.dtype} tensor of shape {tuple(shape)}")
    else:
        kept = out
    if acc.dtype != torch.float64 or not acc.is_contiguous():
        raise ValueError("tile_sums: acc must be a contiguous float64 tensor")
    v = _array(values)
    w = v if weights is None or weights is values else _array(weights)
    zct = _array(zc.transpose(-1, -2))
    row_block, col_block, mirror = at
    launch(
        _jit_kernels.tile_sums, v, w, weights is not None, row_bounds, col_bounds, _array(zr), zct, chunk,
        acc.numpy(), row_block, col_block, mirror, kept.numpy(), factor,
    )  # fmt: skip
    return kept if weights is not None else None


def contract_kept(
    grad: Tensor, kept: dict[int, Tensor], tiles: list, out: Tensor, scaling: GradientScaling | None = None
) -> None:
    r"""Add :math:`\sum G_{IJ} D_{IJa}` over the kept tiles' derivative sums to ``out``, in float64, reading the
    incoming gradient in place, every tile in one parallel launch (:func:`_jit_kernels.contract_tiles`).

    Args:
        grad: the gradient on the block sums, or with ``scaling`` the ``grad`` it is made of; the kept sums'
            dtype. # shape: (B, k, k)
        kept: ``{tile index: derivative sums}``, best views of one buffer one after the other (as
            :func:`bma_gp._kernel_sums.stationary.block_sums` makes them; others are copied into one). # shapes:
            (B, m, d, q)
        tiles: the tiles, indexed as in ``kept`` (``row_block``, ``col_block``, ``mirror``).
        out: float64, added to in place. # shape: (B, d)
        scaling: ``G = scale col col^T * grad`` off the diagonal and ``diag`` on it (:class:`GradientScaling`),
            applied as the entries are read; ``None``: ``G = grad``.
    """
    from bma_gp._kernel_sums import _jit_kernels

    match_torch_threads()
    if out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError("contract_kept: out must be a contiguous float64 tensor")
    if not kept:
        return
    bsz, k = grad.shape[0], grad.shape[-1]
    if scaling is None:
        scaling = GradientScaling(out.new_ones(k), out.new_ones(bsz), out.new_empty(bsz, 0))
    sums = list(kept.values())
    flat, offsets = _one_buffer(sums)
    meta = np.array(
        [
            [tiles[i].row_block, tiles[i].col_block, tiles[i].mirror, v.shape[1], v.shape[3], offset]
            for (i, v), offset in zip(kept.items(), offsets)
        ],
        dtype=np.int64,
    )
    rows = meta[:, 3]
    first = np.repeat(np.cumsum(rows) - rows, rows)  # each tile's first item, for each of its items
    items = np.stack([np.repeat(np.arange(len(rows)), rows), np.arange(int(rows.sum())) - first], 1)
    col, scale, diag = (_array(t) for t in scaling)
    d = sums[0].shape[2]
    launch(_jit_kernels.contract_tiles, _array(grad), flat.numpy(), meta, items, d, col, scale, diag, out.numpy())


def _one_buffer(sums: list[Tensor]) -> tuple[Tensor, list[int]]:
    """``(flat, offsets)``: one 1-d buffer holding every tensor of ``sums`` (C-contiguous) at its offset: the buffer
    they are views of, or a copy where they are not views of one."""
    base = sums[0]._base
    if base is not None and base.dim() == 1 and base.is_contiguous():
        size = base.element_size()
        offsets = [(v.data_ptr() - base.data_ptr()) // size for v in sums]
        if all(v._base is base and v.is_contiguous() for v in sums):
            return base.detach(), offsets
    flat = torch.cat([v.detach().reshape(-1) for v in sums])
    ends = np.cumsum([v.numel() for v in sums])
    return flat, [int(e) - v.numel() for e, v in zip(ends, sums)]


class GradientScaling(NamedTuple):
    r"""The gradient on the block sums as the kernel reads it from the gradient on the means (float64):
    :math:`G_{IJ} = \text{scale}_b\, \text{col}_I\, \text{col}_J\, \text{grad}_{bIJ}` for :math:`I \ne J` (symmetric
    in its factors, so a mirrored pair reads the same way), and :math:`G_{II} = \text{diag}_{bI}` (``diag`` with no
    columns: the diagonal like the rest)."""

    col: Tensor  # (k,)
    scale: Tensor  # (B,)
    diag: Tensor  # (B, k) or (B, 0)


def block_means(
    acc: Tensor, sizes: Tensor, scale: Tensor | None, dtype: torch.dtype, keep_unscaled: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    r"""The block means of the float64 block sums ``acc`` in ``dtype``, in one parallel pass (the same values, to
    the bit, as ``_unscaled_means`` and ``_scaled`` in :mod:`bma_gp._kernel_sums.stationary`, which make five
    passes over ``k x k`` float64).

    Args:
        acc: float64 block sums :math:`T_0`, not changed. # shape: (B, k, k)
        sizes: block sizes. # shape: (k,)
        scale: one outputscale per batch entry, or ``None``. # shape: (B,)
        dtype: the means' dtype.
        keep_unscaled: also return :math:`B_0` in ``dtype`` (the unscaled means, rounded).

    Returns:
        ``(B, B0 or None, lam0)``: ``scale * B0``, ``B0``, and :math:`\lambda_0 = 1 - B_{0,ii}` in float64 before
        rounding. # shapes: (B, k, k), (B, k, k), (B, k)
    """
    from bma_gp._kernel_sums import _jit_kernels

    match_torch_threads()
    if acc.dtype != torch.float64 or not acc.is_contiguous() or acc.dim() != 3:
        raise ValueError("block_means: acc must be a contiguous (B, k, k) float64 tensor")
    bsz, k, _ = acc.shape
    s = sizes.to(torch.float64)
    cpu = torch.device("cpu")  # numba's arrays: on the CPU whatever the global default device
    B = torch.empty(bsz, k, k, dtype=dtype, device=cpu)
    B0 = torch.empty(bsz, k, k, dtype=dtype, device=cpu) if keep_unscaled and scale is not None else None
    lam0 = torch.empty(bsz, k, dtype=torch.float64, device=cpu)
    sc = scale.to(dtype).expand(bsz).contiguous() if scale is not None else torch.empty(0, dtype=dtype, device=cpu)
    unscaled = B0 if B0 is not None else torch.empty(0, 0, 0, dtype=dtype, device=cpu)
    arrays = (_array(acc), _array(s.reciprocal()), _array(s), _array(sc), B.numpy(), unscaled.numpy(), lam0.numpy())
    launch(_jit_kernels.block_means, *arrays)
    if keep_unscaled and B0 is None:  # no scale: B is B0
        B0 = B
    return B, B0, lam0
