r"""numba kernels of the fused step's two passes on CPU (imported only by :mod:`bma_gp.optim._jit`).

Each pass is one loop over a parameter's entries, split into tasks of at most ``chunk`` entries
that never cross a block (a row of the ``(rows, cols)`` matrix), run in parallel with ``prange``.
The formulas are those of :func:`bma_gp.optim._fused.block_sums` and
:func:`~bma_gp.optim._fused.apply_update`, in the same order of operations:
``h' = h + g g``, ``r = 1 / sqrt(sqrt(h') + eps)`` (0 where ``h' = 0``), ``v = g r``, ``n = v r``.

``fastmath`` allows only reassociation (so that the sums vectorise) and ignoring the sign of zero;
square roots and divisions stay exact IEEE operations, and no ``a * b + c`` is contracted. Every
constant is derived from the ``one`` argument, so a float32 kernel computes in float32 throughout
(a Python float literal would promote it to float64). The loops index sliced arrays from 0: a loop
over ``range(a, b)`` on the whole array does not vectorise (numba must allow negative indices).
``cache=True`` keeps the machine code on disk beside this file (or in numba's cache directory), so the
compilation is paid once per machine and dtype, not once per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FASTMATH = {"reassoc", "nsz"}


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def _chunk_sums(g, h, eps, one):  # pragma: no cover - compiled
    zero = one - one
    s_v = zero
    s_n = zero
    s_nn = zero
    bad = zero  # g * 0 is nan exactly where g is inf or nan
    for j in range(g.shape[0]):
        gj = g[j]
        hj = h[j] + gj * gj
        r = one / np.sqrt(np.sqrt(hj) + eps)
        r = r if hj != zero else zero
        v = gj * r
        n = v * r
        s_v += v
        s_n += n
        s_nn += n * n
        bad += gj * zero
    return s_v, s_n, s_nn, bad


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def block_sums(g, h, cols, eps, one, chunk):  # pragma: no cover - compiled
    """Per row of the ``(rows, cols)`` layout of the flat ``g`` and ``h``: ``sum v``, ``sum n``, ``sum n^2`` and
    ``sum g * 0`` (0, or nan when some ``g`` is not finite), accumulated in float64 across tasks."""
    rows = h.shape[0] // cols
    per_row = (cols + chunk - 1) // chunk
    tasks = rows * per_row
    part = np.empty((tasks, 4), dtype=np.float64)
    for t in prange(tasks):
        row = t // per_row
        a = row * cols + (t - row * per_row) * chunk
        b = min(a + chunk, (row + 1) * cols)
        s_v, s_n, s_nn, bad = _chunk_sums(g[a:b], h[a:b], eps, one)
        part[t, 0] = s_v
        part[t, 1] = s_n
        part[t, 2] = s_nn
        part[t, 3] = bad
    if per_row == 1:
        return part
    out = np.zeros((rows, 4), dtype=np.float64)
    for t in range(tasks):  # scalar loops: a row slice ``out[i] += part[t]`` allocates a temporary per task
        for c in range(4):
            out[t // per_row, c] += part[t, c]
    return out


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def _chunk_update(g, h, p, eps, one, c0, c1, c2):  # pragma: no cover - compiled
    zero = one - one
    for j in range(g.shape[0]):
        gj = g[j]
        hj = h[j] + gj * gj
        h[j] = hj
        r = one / np.sqrt(np.sqrt(hj) + eps)
        r = r if hj != zero else zero
        p[j] = p[j] * c2 + (c0 * (gj * r) + c1) * r


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def apply_update(g, h, p, coef, cols, eps, one, chunk):  # pragma: no cover - compiled
    """``h += g^2`` and ``p = c2 p + c0 n + c1 r`` in place, with the coefficients ``coef[row]`` of each row."""
    rows = h.shape[0] // cols
    per_row = (cols + chunk - 1) // chunk
    for t in prange(rows * per_row):
        row = t // per_row
        a = row * cols + (t - row * per_row) * chunk
        b = min(a + chunk, (row + 1) * cols)
        _chunk_update(g[a:b], h[a:b], p[a:b], eps, one, coef[row, 0], coef[row, 1], coef[row, 2])


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def block_sums_serial(g, h, cols, eps, one):  # pragma: no cover - compiled
    """:func:`block_sums` on the calling thread, one row at a time (small tensors: no parallel launch)."""
    rows = h.shape[0] // cols
    out = np.empty((rows, 4), dtype=np.float64)
    for row in range(rows):
        a = row * cols
        s_v, s_n, s_nn, bad = _chunk_sums(g[a : a + cols], h[a : a + cols], eps, one)
        out[row, 0] = s_v
        out[row, 1] = s_n
        out[row, 2] = s_nn
        out[row, 3] = bad
    return out


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def apply_update_serial(g, h, p, coef, cols, eps, one):  # pragma: no cover - compiled
    """:func:`apply_update` on the calling thread, one row at a time."""
    rows = h.shape[0] // cols
    for row in range(rows):
        a = row * cols
        _chunk_update(
            g[a : a + cols], h[a : a + cols], p[a : a + cols], eps, one, coef[row, 0], coef[row, 1], coef[row, 2]
        )
