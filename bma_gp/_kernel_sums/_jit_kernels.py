r"""numba kernel of one tile's block sums on CPU (imported only by :mod:`bma_gp._kernel_sums.jit`).

:func:`tile_sums` reads a tile of kernel values :math:`v_{pj}` (and of derivative weights
:math:`w_{pj}`) once and returns, per (row block :math:`b`, column block :math:`c`),

.. math::
    S_{bc} = \sum_{p \in b,\, j \in c} v_{pj},
    \qquad
    D_{bca} = \sum_{p \in b,\, j \in c} w_{pj} (z_{pa} - z_{ja})^2 .

The columns are split into tasks run in parallel with ``prange``. A task walks the row blocks;
for each it accumulates the block's rows into a few column vectors (four rows at a time, so that
each accumulator is loaded and stored once per four rows; the vectors fit in L1; the values' vector
in float64), then reduces the vectors over the column blocks in float64. The work per entry is the
same whatever the number of blocks, and nothing of size ``rows x blocks`` is formed. With small blocks
the reduction is a walk over many short column segments per row block, which costs more per entry than the
accumulation: the derivative features are walked three at a time, one loop per segment for three sums
(measured at ``k = 2000``, ``n = 20,000``, ``d = 3``: 0.45 against 0.51 ms per ``512 x 4096`` tile), the first
three together with the values' sums (0.46-0.47 against 0.48-0.49 ms, the two alternating in one process; two
row blocks per walk lost 7%). A column
block cut by a task's edge is shared with the neighbouring task: its sums go to a per-task buffer added
serially at the end, so no two threads write the same output.

``fastmath`` allows reassociation (the sums vectorise), contraction and ignoring the sign of zero;
the inputs are finite kernel values. The loops index sliced arrays from 0 (a loop over
``range(a, b)`` of a whole array does not vectorise: numba must allow negative indices), and
slices are taken of rows (``values[p][j0:j1]``), which numba knows are contiguous.
``cache=True`` keeps the machine code on disk, so it is compiled once per machine and dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FASTMATH = {"reassoc", "nsz", "contract"}


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def _accumulate(values, weights, derivs, zr, zct, a0, a1, j0, j1, h0, h):  # pragma: no cover - compiled
    """``h0[j] = sum_p v[p, j0 + j]`` (float64) and ``h[a, j] = sum_p w[p, j0 + j] (zr[p, a] - zct[a, j0 + j])^2``
    over the rows ``a0 < a1`` (at least one): the first group of rows writes the vectors, the others add to them
    (no zeroing pass: at ten-point blocks that pass and the first group's loads were a tenth of the work)."""
    d = zr.shape[1]
    width = j1 - j0
    p = a0
    init = True
    while p + 4 <= a1:
        v0 = values[p][j0:j1]
        v1 = values[p + 1][j0:j1]
        v2 = values[p + 2][j0:j1]
        v3 = values[p + 3][j0:j1]
        if init:
            for j in range(width):
                h0[j] = (v0[j] + v1[j]) + (v2[j] + v3[j])
        else:
            for j in range(width):
                h0[j] += (v0[j] + v1[j]) + (v2[j] + v3[j])
        if derivs:
            w0 = weights[p][j0:j1]
            w1 = weights[p + 1][j0:j1]
            w2 = weights[p + 2][j0:j1]
            w3 = weights[p + 3][j0:j1]
            for a in range(d):
                z0 = zr[p, a]
                z1 = zr[p + 1, a]
                z2 = zr[p + 2, a]
                z3 = zr[p + 3, a]
                zc = zct[a][j0:j1]
                ha = h[a]
                if init:
                    for j in range(width):
                        c = zc[j]
                        e0 = z0 - c
                        e1 = z1 - c
                        e2 = z2 - c
                        e3 = z3 - c
                        ha[j] = (w0[j] * e0 * e0 + w1[j] * e1 * e1) + (w2[j] * e2 * e2 + w3[j] * e3 * e3)
                else:
                    for j in range(width):
                        c = zc[j]
                        e0 = z0 - c
                        e1 = z1 - c
                        e2 = z2 - c
                        e3 = z3 - c
                        ha[j] += (w0[j] * e0 * e0 + w1[j] * e1 * e1) + (w2[j] * e2 * e2 + w3[j] * e3 * e3)
        init = False
        p += 4
    if p + 2 <= a1:
        v0 = values[p][j0:j1]
        v1 = values[p + 1][j0:j1]
        if init:
            for j in range(width):
                h0[j] = v0[j] + v1[j]
        else:
            for j in range(width):
                h0[j] += v0[j] + v1[j]
        if derivs:
            w0 = weights[p][j0:j1]
            w1 = weights[p + 1][j0:j1]
            for a in range(d):
                z0 = zr[p, a]
                z1 = zr[p + 1, a]
                zc = zct[a][j0:j1]
                ha = h[a]
                if init:
                    for j in range(width):
                        c = zc[j]
                        e0 = z0 - c
                        e1 = z1 - c
                        ha[j] = w0[j] * e0 * e0 + w1[j] * e1 * e1
                else:
                    for j in range(width):
                        c = zc[j]
                        e0 = z0 - c
                        e1 = z1 - c
                        ha[j] += w0[j] * e0 * e0 + w1[j] * e1 * e1
        init = False
        p += 2
    if p < a1:
        v0 = values[p][j0:j1]
        if init:
            for j in range(width):
                h0[j] = v0[j]
        else:
            for j in range(width):
                h0[j] += v0[j]
        if derivs:
            w0 = weights[p][j0:j1]
            for a in range(d):
                z0 = zr[p, a]
                zc = zct[a][j0:j1]
                ha = h[a]
                if init:
                    for j in range(width):
                        e0 = z0 - zc[j]
                        ha[j] = w0[j] * e0 * e0
                else:
                    for j in range(width):
                        e0 = z0 - zc[j]
                        ha[j] += w0[j] * e0 * e0


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def _task_blocks(col_bounds, j0, j1):  # pragma: no cover - compiled
    """The first and last column block holding a column in ``j0:j1``."""
    first = np.searchsorted(col_bounds, j0, side="right") - 1
    last = np.searchsorted(col_bounds, j1 - 1, side="right") - 1
    return first, last


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True, inline="always")
def _put(edge, kept, t, b, bi, f, c, first, last, s, factor):  # pragma: no cover - compiled
    """Derivative sum ``s`` of feature ``f`` (row block ``b``, column block ``c``): into the task's edge buffer for
    its first and last column block (shared with the neighbouring tasks), else into ``kept`` (its only write)."""
    if c == first:
        edge[t, b, 0, f] += s
    elif c == last:
        edge[t, b, 1, f] += s
    else:
        kept[bi, b, f - 1, c] = factor * s


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True, inline="always")
def _put_value(edge, acc, t, b, bi, c, first, last, s, row_block, col_block, mirror):  # pragma: no cover - compiled
    """Value sum ``s`` (row block ``b``, column block ``c``): into the task's edge buffer for its first and last
    column block, else added to ``acc`` (and transposed with ``mirror``): no other thread writes those entries."""
    if c == first:
        edge[t, b, 0, 0] += s
    elif c == last:
        edge[t, b, 1, 0] += s
    else:
        acc[bi, row_block + b, col_block + c] += s
        if mirror:
            acc[bi, col_block + c, row_block + b] += s


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def tile_sums(
    values, weights, derivs, row_bounds, col_bounds, zr, zct, chunk, acc, row_block, col_block, mirror, kept, factor
):  # pragma: no cover - compiled
    """Add the tile's value sums to ``acc`` and ``factor`` times its derivative sums to ``kept``.

    Args:
        values, weights: ``(B, R, C)`` C-contiguous, one dtype (``weights`` may be ``values``).
        derivs: whether to compute the derivative sums ``D`` (into ``kept``).
        row_bounds: ``(m + 1,)`` where each row block starts, and ``R``.
        col_bounds: ``(q + 1,)`` where each column block starts, and ``C``.
        zr: ``(B, R, d)`` the rows' scaled inputs; zct: ``(B, d, C)`` the columns' (same origin).
        chunk: columns per task.
        acc: ``(B, k, k)`` float64: ``S[b, c]`` is added at ``(row_block + b, col_block + c)``, and with
            ``mirror`` also at ``(col_block + c, row_block + b)``.
        kept: ``(B, m, d, q)``, any values on entry: ``factor * D[b, c, a]`` is written at ``[b, a, c]``, every
            entry (unused without ``derivs``).
    """
    nbatch, _, ncols = values.shape
    m = row_bounds.shape[0] - 1
    feats = 1 + zr.shape[2] if derivs else 1
    per_batch = (ncols + chunk - 1) // chunk
    tasks = nbatch * per_batch
    edge = np.zeros((tasks, m, 2, feats))  # the sums of the task's first and last column block
    for t in prange(tasks):
        bi = t // per_batch
        j0 = (t - bi * per_batch) * chunk
        j1 = min(ncols, j0 + chunk)
        first, last = _task_blocks(col_bounds, j0, j1)
        # the values' sums in float64: float32 running sums of nearly equal values (a long lengthscale) drift all the
        # same way, which lam = d / s - B_ii magnifies; the derivative sums do not cancel and stay in values' dtype
        h0 = np.empty(j1 - j0, dtype=np.float64)
        h = np.empty((feats - 1, j1 - j0), dtype=values.dtype)
        bounds = np.empty(last - first + 2, dtype=np.int64)  # the task's column blocks, in its own columns
        for c in range(first, last + 1):
            bounds[c - first] = max(col_bounds[c], j0) - j0
        bounds[last - first + 1] = j1 - j0
        for b in range(m):
            _accumulate(
                values[bi], weights[bi], derivs, zr[bi], zct[bi], row_bounds[b], row_bounds[b + 1], j0, j1, h0, h
            )
            if feats >= 4:  # the values' sums with the first three derivative features, in one walk (see above)
                for c in range(first, last + 1):
                    lo = bounds[c - first]
                    hi = bounds[c - first + 1]
                    g0 = h0[lo:hi]
                    ga = h[0][lo:hi]
                    gb = h[1][lo:hi]
                    gc = h[2][lo:hi]
                    s = 0.0
                    sa = 0.0
                    sb = 0.0
                    sc = 0.0
                    for j in range(hi - lo):
                        s += g0[j]
                        sa += ga[j]
                        sb += gb[j]
                        sc += gc[j]
                    _put_value(edge, acc, t, b, bi, c, first, last, s, row_block, col_block, mirror)
                    _put(edge, kept, t, b, bi, 1, c, first, last, sa, factor)
                    _put(edge, kept, t, b, bi, 2, c, first, last, sb, factor)
                    _put(edge, kept, t, b, bi, 3, c, first, last, sc, factor)
                f = 4
            else:
                for c in range(first, last + 1):
                    seg = h0[bounds[c - first] : bounds[c - first + 1]]
                    s = 0.0
                    for j in range(seg.shape[0]):
                        s += seg[j]
                    _put_value(edge, acc, t, b, bi, c, first, last, s, row_block, col_block, mirror)
                f = 1
            while f + 3 <= feats:  # three derivative features per walk over the column blocks (see above)
                for c in range(first, last + 1):
                    lo = bounds[c - first]
                    hi = bounds[c - first + 1]
                    ga = h[f - 1][lo:hi]
                    gb = h[f][lo:hi]
                    gc = h[f + 1][lo:hi]
                    sa = 0.0
                    sb = 0.0
                    sc = 0.0
                    for j in range(hi - lo):
                        sa += ga[j]
                        sb += gb[j]
                        sc += gc[j]
                    _put(edge, kept, t, b, bi, f, c, first, last, sa, factor)
                    _put(edge, kept, t, b, bi, f + 1, c, first, last, sb, factor)
                    _put(edge, kept, t, b, bi, f + 2, c, first, last, sc, factor)
                f += 3
            while f < feats:
                hf = h[f - 1]
                for c in range(first, last + 1):
                    seg = hf[bounds[c - first] : bounds[c - first + 1]]
                    s = 0.0
                    for j in range(seg.shape[0]):
                        s += seg[j]
                    _put(edge, kept, t, b, bi, f, c, first, last, s, factor)
                f += 1
    if feats > 1:  # the shared column blocks of kept start from zero (kept is not zeroed on entry)
        for t in range(tasks):
            bi = t // per_batch
            j0 = (t - bi * per_batch) * chunk
            first, last = _task_blocks(col_bounds, j0, min(ncols, j0 + chunk))
            for b in range(m):
                for f in range(1, feats):
                    kept[bi, b, f - 1, first] = 0.0
                    kept[bi, b, f - 1, last] = 0.0
    for t in range(tasks):  # the column blocks tasks may share, serially
        bi = t // per_batch
        j0 = (t - bi * per_batch) * chunk
        first, last = _task_blocks(col_bounds, j0, min(ncols, j0 + chunk))
        for b in range(m):
            for side in range(2 if last != first else 1):
                c = first if side == 0 else last
                s = edge[t, b, side, 0]
                acc[bi, row_block + b, col_block + c] += s
                if mirror:
                    acc[bi, col_block + c, row_block + b] += s
                for f in range(1, feats):
                    kept[bi, b, f - 1, c] += factor * edge[t, b, side, f]


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True, inline="always")
def _contract_row(grad, flat, start, bi, gi, col_block, q, d, mirror, col, scale, diag, part, item):  # pragma: no cover
    """``part[item, bi, a] = sum_c G[gi, col_block + c] D[a, c]`` for one row block ``gi`` of a tile, with its
    derivative sums ``D`` at ``flat[start + a q + c]`` (see :func:`contract_tiles`): the row's weights
    ``col[c] (grad[gi, c] + grad[c, gi])`` are formed once in float64, then one dot per feature."""
    g = grad[bi, gi][col_block : col_block + q]
    cs = col[col_block : col_block + q]
    w = np.empty(q)
    for c in range(q):
        w[c] = np.float64(g[c]) * cs[c]
    if mirror:  # G^T: the column of grad below the diagonal, one entry per column block
        for c in range(q):
            w[c] += np.float64(grad[bi, col_block + c, gi]) * cs[c]
    star = gi - col_block  # the tile's column of the diagonal pair (gi, gi), if it has one
    own = diag.shape[1] > 0 and 0 <= star < q
    if own:  # that pair takes diag[gi] (twice when mirrored), not scale col[gi] col[gi] grad[gi, gi]
        w[star] = 0.0
    f = scale[bi] * col[gi]
    for a in range(d):
        dv = flat[start + a * q : start + (a + 1) * q]
        s = 0.0
        for c in range(q):
            s += w[c] * np.float64(dv[c])
        t = f * s
        if own:
            t += (2.0 if mirror else 1.0) * diag[bi, gi] * np.float64(dv[star])
        part[item, bi, a] = t


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)
def contract_tiles(grad, flat, meta, items, d, col, scale, diag, out):  # pragma: no cover - compiled
    """``out[b, a] += sum_{tiles} sum_{i, c} G[b, I, J] D[b, i, a, c]`` in float64 for every kept tile at once, with
    ``G = scale[b] col[I] col[J] grad[b, I, J]`` (rows ``I = row_block + i``, columns ``J = col_block + c``; plus
    the mirrored pair ``(J, I)`` for a mirrored tile), where a pair ``I == J`` takes ``diag[b, I]`` instead (when
    ``diag`` has columns), read in place: no ``(m, d, q)`` float64 product and no scaled ``k x k`` copy of ``grad``
    is formed. The (tile, row block) items run in parallel, in one launch (one per tile cost about 3 ms of
    thread starts and calls at ``k = 2000``), each into its own row of partial sums, added in order at the end.

    Args:
        grad: ``(B, k, k)`` C-contiguous; flat: every tile's derivative sums ``D`` ``(B, m, d, q)``, C-contiguous,
            one after the other; meta: ``(tiles, 6)`` int64: ``row_block, col_block, mirror, m, q, offset into
            flat``; items: ``(n, 2)`` int64: ``(tile, i)``, each row block of each tile once; d: the features;
            col: ``(k,)`` float64; scale: ``(B,)`` float64; diag: ``(B, k)`` or ``(B, 0)`` float64;
            out: ``(B, d)`` float64.
    """
    nbatch = grad.shape[0]
    nitems = items.shape[0]
    part = np.zeros((nitems, nbatch, d))
    for item in prange(nitems):
        t = items[item, 0]
        i = items[item, 1]
        row_block, col_block, mirror, m, q, offset = (
            meta[t, 0],
            meta[t, 1],
            meta[t, 2] != 0,
            meta[t, 3],
            meta[t, 4],
            meta[t, 5],
        )
        for bi in range(nbatch):
            start = offset + ((bi * m + i) * d) * q
            _contract_row(grad, flat, start, bi, row_block + i, col_block, q, d, mirror, col, scale, diag, part, item)
    for item in range(nitems):
        for bi in range(nbatch):
            for a in range(d):
                out[bi, a] += part[item, bi, a]


@njit(parallel=True, error_model="numpy", cache=True, nogil=True)
def block_means(acc, inv, sizes, scale, B, B0, lam0):  # pragma: no cover - compiled
    r"""The block means of the float64 block sums ``acc``, rounded to ``B``'s dtype and scaled, in one pass.

    ``B0[b, i, j] = acc[b, i, j] inv[i] inv[j]`` off the diagonal and :math:`(T_{ii} - s_i) / (s_i (s_i - 1))`
    on it (0 for a singleton), rounded to ``B``'s dtype; ``B = B0 * scale[b]`` in that dtype (``scale`` has
    ``B``'s dtype; length 0: no scale, ``B = B0``); ``lam0[b, i] = 1 - B0_ii`` before rounding. The operations
    and their order are those of the torch path (``_unscaled_means`` and ``_scaled`` in
    :mod:`bma_gp._kernel_sums.stationary`), so the two agree to the bit; no ``fastmath``. ``B0`` may have no
    rows (not wanted) or be ``B`` itself only when there is no scale.

    Args:
        acc: ``(N, k, k)`` float64, not changed; inv: ``(k,)`` float64, ``1 / sizes``; sizes: ``(k,)`` float64;
        scale: ``(N,)`` or ``(0,)``; B: ``(N, k, k)``; B0: ``(N, k, k)`` or ``(0, 0, 0)``, ``B``'s dtype;
        lam0: ``(N, k)`` float64.
    """
    nbatch, k, _ = acc.shape
    keep = B0.shape[0] > 0
    scaled = scale.shape[0] > 0
    for b in range(nbatch):
        for i in prange(k):
            t = acc[b, i]
            out = B[b, i]
            inv_i = inv[i]
            for j in range(k):
                out[j] = (t[j] * inv_i) * inv[j]  # rounded on the store
            s = sizes[i]
            within = s * (s - 1.0)
            b_ii = (t[i] - s) / within if within > 0 else 0.0
            out[i] = b_ii
            lam0[b, i] = 1.0 - b_ii
            if keep:
                out0 = B0[b, i]
                for j in range(k):
                    out0[j] = out[j]
            if scaled:
                sc = scale[b]
                for j in range(k):
                    out[j] = out[j] * sc
