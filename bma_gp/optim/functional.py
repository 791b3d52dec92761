r"""The math of block-mean AdaGrad's step, as functions of tensors (the optimizer class is bookkeeping).

Laid out like ``torch.optim.adagrad``: :func:`block_mean_adagrad` is the one entry point,
with one signature, and dispatches to one implementation per path:

* :func:`_single_tensor_block_mean_adagrad`: eager, tensor by tensor, for partitions whose
  blocks are the rows of every tensor (``"tensor"``, ``"row"``). The gradients are read where
  they are; block sums and broadcasts are :class:`bma_gp.Partition` row operations on each
  tensor's own partition (:attr:`~bma_gp.optim.param_blocks.ParamBlocks.segments`);
* :func:`_fused_block_mean_adagrad`: the same step as two ``torch.compile``'d passes
  (:mod:`bma_gp.optim._fused`);
* :func:`_scattered_block_mean_adagrad`: any partition, on the flat gradient, applying the
  preconditioner as the operator it is (``root @ v``).

All three compute, with :math:`r = z^{-1/2}` (:func:`~bma_gp.optim._scaling.z_inv_sqrt`),
:math:`v = r g` and :math:`n = r v = g / z`,

.. math::

    h \mathrel{+}= g^2, \quad U \mathrel{+}= (P^\top n)(P^\top n)^\top, \quad
    w \mathrel{+}= P^\top n^2, \quad
    \theta \leftarrow (1 - \mathrm{lr}\,\mathrm{wd})\,\theta - \mathrm{lr}\; r \odot R v,

where :math:`R = (F + \delta I)^{-1/2} = \operatorname{diag}(\lambda_R[c]) + P B_R P^\top` is
the block mean root of :func:`preconditioner`. The product :math:`R v` is the operator's
matrix-vector product, written per tensor as
:math:`r \odot R v = \lambda_R[c]\, n + (B_R P^\top v)[c]\, r`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from bma_gp import BlockMeanLinearOperator, Partition, block_mean_from_sums
from bma_gp._autograd import functorch_active
from bma_gp._blas_threads import single_blas_thread
from bma_gp._precision import core_dtype
from bma_gp.optim import _cpu_kernels, _fused
from bma_gp.optim._scaling import z_inv_sqrt, zero_entries
from bma_gp.optim.flat_optimizer import (
    _all_finite,
    _non_finite_message,
    check_bool,
    check_hyperparameter,
    check_step_count,
)
from bma_gp.optim.flat_params import SparseGradientError, check_params, materialised_grad, state_dtype
from bma_gp.optim.param_blocks import ParamBlocks

__all__ = ["Workspace", "block_mean_adagrad", "inverse_root", "normalised_correlation", "preconditioner"]

Correlation = Callable[[Tensor, Tensor, Partition], BlockMeanLinearOperator]


def normalised_correlation(U: Tensor, w: Tensor, partition: Partition) -> BlockMeanLinearOperator:
    r"""The block mean correlation matrix :math:`F` of the normalised gradients.

    :math:`\tilde F` is the Frobenius-nearest block mean matrix of
    :math:`N = \sum_\tau n_\tau n_\tau^\top` (see docs/math.md), computed from its
    block sums :math:`U = P^\top N P` and :math:`w = P^\top \operatorname{diag}(N)`.
    It is rescaled to unit mean diagonal in every block,

    .. math::

        F = D^{-1/2} \tilde F D^{-1/2}, \quad D = \operatorname{diag}(w / s), \qquad
        \lambda^F_i = \tilde\lambda_i / d_i, \quad B^F_{ij} = \tilde B_{ij} / \sqrt{d_i d_j},

    which keeps the block mean structure and positive semidefiniteness. A block
    with :math:`w_i = 0` (no gradient yet) is the identity in :math:`F`
    (:math:`\lambda^F_i = 1`, row and column :math:`i` of :math:`B^F` zero).

    Args:
        U: block sums of :math:`N`. # shape: (k, k)
        w: block sums of its diagonal. # shape: (k,)
        partition: the partition of the ``d`` parameter entries into ``k`` blocks.

    Raises:
        TypeError: ``U`` and ``w`` are not floating-point tensors of one dtype.
    """
    _check_statistics_dtype(U, w)
    # rescaled per block by powers of two (F does not change, the same numbers where nothing under- or overflows):
    # a tiny w (subnormal) gave 1 / d an overflow and F non-finite entries
    U, w = _rescale_statistics(U, w)
    F_tilde = block_mean_from_sums(U, w, partition)
    d = w / partition.sizes.to(w.dtype)
    seen = d > 0
    d_safe = torch.where(seen, d, torch.ones_like(d))
    lam = torch.where(seen, F_tilde.lam / d_safe, torch.ones_like(d))
    scale = torch.where(seen, d_safe.rsqrt(), torch.zeros_like(d))
    B = F_tilde.B * scale.unsqueeze(-1) * scale.unsqueeze(-2)
    return BlockMeanLinearOperator(lam, B, partition)


def inverse_root(F: BlockMeanLinearOperator, damping: float) -> BlockMeanLinearOperator:
    r""":math:`(F + \delta I)^{-1/2}` as a block mean operator, without validation (no host sync).

    With ``damping`` :math:`\delta = 0` and a singular :math:`F` the result holds ``inf``/``nan``.
    """
    return F.add_diagonal(torch.tensor(damping, dtype=F.dtype, device=F.device)).matrix_inv_sqrt(check=False)


def _normalised_inverse_root(U: Tensor, w: Tensor, partition: Partition, damping: float) -> tuple[Tensor, Tensor]:
    r"""``(lam, B)`` of ``inverse_root(normalised_correlation(U, w, partition), damping)`` in plain tensor ops.

    The same mathematics, written straight into the core matrix of the operator's inverse square
    root and carried out in :func:`~bma_gp._precision.core_dtype` throughout: with
    :math:`d = w / s` and :math:`t_i = d_i^{-1/2} s_i^{-1/2}` (0 for a block without gradient),

    .. math::

        C_{ij} = U_{ij} t_i t_j \ (i \ne j), \qquad
        C_{ii} = \lambda^F_i + \delta + \frac{U_{ii} - w_i}{(s_i - 1) d_i}, \qquad
        \lambda^F_i = 1 - \frac{U_{ii} - w_i}{s_i (s_i - 1) d_i}

    (the fractions are 0 for singleton blocks, and :math:`C_{ii} = \lambda^F_i = 1 + \delta` for a
    block without gradient). One ``eigh`` of :math:`C` gives :math:`R`'s core; singleton blocks are
    folded as the operator folds them. :math:`\lambda^F_i + \delta` and the eigenvalues of :math:`C` are clamped at
    :math:`\delta` (both are at least that for the positive semidefinite :math:`F`; rounding of float32 statistics
    took them below, to nan roots at a small damping). No :class:`~bma_gp.BlockMeanLinearOperator` objects and no
    autograd function on the way: at a few blocks that bookkeeping cost more than the step's
    arithmetic on two million parameters. Equal to the operator path to rounding
    (tests/test_optim_functional.py). No validation, no host sync.
    """
    dtype, device = w.dtype, w.device
    cd = core_dtype(dtype)
    if device.type == "cpu" and cd == torch.float64 and w.shape[-1] <= NUMPY_ROOT_MAX_BLOCKS:
        # the same formulas on numpy arrays: about 1 us per operation where torch's dispatch costs 2-10 us,
        # and at a few blocks the step's root is nothing but such operations
        consts = _root_constants(partition, cd, device, numpy=True)
        U_np, w_np = U.detach().numpy().astype(np.float64), w.detach().numpy().astype(np.float64)
        try:
            lam, B = _inverse_root_numpy(U_np, w_np, consts, damping)
        except np.linalg.LinAlgError:  # non-finite statistics (check_finite=False): torch's eigh gives NaN instead
            return _normalised_inverse_root_torch(U, w, partition, damping)
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None:  # the cast back in numpy too: no torch dispatch
            return torch.from_numpy(lam.astype(np_dtype)), torch.from_numpy(B.astype(np_dtype))
        return torch.from_numpy(lam).to(dtype), torch.from_numpy(B).to(dtype)
    return _normalised_inverse_root_torch(U, w, partition, damping)


def _normalised_inverse_root_torch(U: Tensor, w: Tensor, partition: Partition, damping: float) -> tuple[Tensor, Tensor]:
    dtype, cd = w.dtype, core_dtype(w.dtype)
    consts = _root_constants(partition, cd, w.device)
    lam, B = _inverse_root_formulas(U.to(cd), w.to(cd), consts, damping)
    return lam.to(dtype), B.to(dtype)


#: Up to this many blocks a CPU root is computed with numpy (its ``eigh`` and elementwise operations carry less
#: fixed cost than torch's at small sizes); above it with torch, whose ``eigh`` uses more threads.
NUMPY_ROOT_MAX_BLOCKS = 128
#: Up to this many blocks the CPU eager step for one block per tensor computes its root on Python floats
#: (:func:`_inverse_root_python`); above it with numpy
PYTHON_ROOT_MAX_BLOCKS = 8
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _inverse_root_formulas(U: Tensor, w: Tensor, consts, damping: float) -> tuple[Tensor, Tensor]:
    """The body of :func:`_normalised_inverse_root` in torch (2-D ``U``).

    The statistics are first rescaled per block by powers of two (:func:`_rescale_statistics`): :math:`F` does not
    change, every result is the same bit for bit where nothing under- or overflows, and a block whose ``w / s``
    is tiny (a subnormal ``w``, where ``1 / d`` overflowed to a non-finite root) gets its finite root. A few
    ``k``-sized operations, no host synchronisation."""
    inv_s, inv_within, single, outer_rsqrt = consts
    U, w = _rescale_statistics(U, w)
    d = w * inv_s
    seen = d > 0
    inv_d = torch.where(seen, 1 / torch.where(seen, d, 1.0), 0.0)
    diag_U = torch.diagonal(U)
    off = (diag_U - w) * inv_within * inv_d  # s_i B_ii / d_i (0 for singletons)
    # F + delta I >= delta I: lam^F >= 0 and the core's eigenvalues >= delta in exact arithmetic; rounding of the
    # statistics (float32 U, a block of equal entries with lam^F = 0) can take them below, to nan roots at a small
    # damping: both are clamped at delta
    lam = (torch.where(seen, 1 - off * inv_s, 1.0) + damping).clamp_min(damping)
    t = torch.sqrt(inv_d * inv_s)
    C = U * torch.outer(t, t)
    idx = torch.arange(C.shape[-1], device=C.device)  # the statistics' device, not the global default
    C[idx, idx] = lam + off
    # eigh reads one triangle: no symmetrisation needed
    lam = torch.where(single, torch.where(C[idx, idx] > 0, C[idx, idx], 1.0), lam)  # fold singletons as the operator
    e, V = torch.linalg.eigh(C)
    e = e.clamp_min(damping)
    f_lam = 1 / torch.sqrt(lam)
    D = (V * (1 / torch.sqrt(e))) @ V.T
    D[idx, idx] -= f_lam
    D = D * outer_rsqrt
    return f_lam, (D + D.T) * 0.5


@np.errstate(all="ignore")  # inf/nan where torch gives them silently (a singular F with damping 0, NaN statistics)
def _inverse_root_numpy(
    U: np.ndarray, w: np.ndarray, consts, damping: float, rescaled: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_inverse_root_formulas` on float64 numpy arrays, the same operations in the same order (tested equal
    to rounding), with one ``syevd`` through scipy's LAPACK wrapper (5 us at a few blocks, where
    ``numpy.linalg.eigh`` costs 14 us) and no ``where``/``outer`` calls (4 us each) where a block has had no
    gradient or no block is a singleton. Raises :class:`numpy.linalg.LinAlgError` on non-finite statistics (as
    ``numpy.linalg.eigh`` does) or when ``syevd`` fails. Where finite statistics give a non-finite core matrix (a
    tiny ``w``: ``1 / d`` overflowed), it starts again once from statistics rescaled per block by powers of two
    (:func:`_rescale_statistics_numpy`; ``rescaled``), which leave :math:`F` as it is: only that rare case pays."""
    inv_s, inv_within, single, outer_rsqrt, any_single = consts
    k = w.shape[0]
    d = w * inv_s
    seen = d > 0
    all_seen = bool(seen.all())
    inv_d = 1 / d if all_seen else np.divide(1.0, d, out=np.zeros_like(d), where=seen)
    off = (U.diagonal() - w) * inv_within * inv_d  # s_i B_ii / d_i (0 for singletons)
    lam = 1 - off * inv_s
    if not all_seen:
        lam[~seen] = 1.0
    lam += damping
    np.maximum(lam, damping, out=lam)  # rounding below delta: clamped as in _inverse_root_formulas
    t = np.sqrt(inv_d * inv_s)
    C = U * (t[:, None] * t)
    C_diag = lam + off
    C.ravel()[:: k + 1] = C_diag
    if any_single:  # fold singletons as the operator does
        lam = np.where(single, np.where(C_diag > 0, C_diag, 1.0), lam)
    if not np.isfinite(C).all():
        if not rescaled and np.isfinite(U).all() and np.isfinite(w).all():  # tiny w: 1 / d overflowed
            return _inverse_root_numpy(*_rescale_statistics_numpy(U, w), consts, damping, rescaled=True)
        raise np.linalg.LinAlgError("non-finite statistics")  # as numpy's eigh does: the caller then asks torch
    lapack = _lapack()
    with single_blas_thread():  # OpenBLAS's own threads, beside other work, made k = 128 100x slower
        e, V, info = lapack.dsyevd(C, compute_v=1, lower=1)  # the lower triangle, as numpy's eigh reads it
        if info != 0:
            raise np.linalg.LinAlgError(f"syevd failed (info = {info})")
        np.maximum(e, damping, out=e)
        f_lam = 1 / np.sqrt(lam)
        D = (V * (1 / np.sqrt(e))) @ V.T
    D.ravel()[:: k + 1] -= f_lam
    D *= outer_rsqrt
    B = D + D.T
    B *= 0.5
    return f_lam, B


def _inverse_root_python(U: list, w: list, consts, damping: float, rescaled: bool = False) -> tuple[list, list] | None:
    """:func:`_inverse_root_numpy` on Python floats, for the few blocks of :data:`PYTHON_ROOT_MAX_BLOCKS`: the same
    formulas (equal to rounding, tested) with one ``syevd``, at about a third of the cost right after a step's passes
    over megabytes, where each numpy call costs about 10 us (its code and tables are out of the caches). ``U`` is a
    list of rows, ``w`` a list, ``consts`` :func:`_root_constants`'s arrays as lists. Returns ``(lam, B)`` as lists,
    or ``None`` where some quantity is not finite or not positive (the numpy path then gives the result, with its
    inf/nan semantics). Where finite statistics give a non-finite core matrix (a tiny ``w``: ``1 / d`` overflowed),
    it starts again once from statistics rescaled per block by powers of two (:func:`_rescale_statistics_numpy`;
    ``rescaled``), which leave :math:`F` as it is."""
    inv_s, inv_within, single, outer_rsqrt = consts
    k = len(w)
    lam, t, C = [0.0] * k, [0.0] * k, []
    for i in range(k):
        d = w[i] * inv_s[i]
        inv_d = 1 / d if d > 0 else 0.0
        off = (U[i][i] - w[i]) * inv_within[i] * inv_d  # s_i B_ii / d_i (0 for singletons)
        lam[i] = max((1 - off * inv_s[i] if d > 0 else 1.0) + damping, damping)  # clamped as in the torch form
        t[i] = math.sqrt(inv_d * inv_s[i])
        C.append(off)
    diag = [lam[i] + C[i] for i in range(k)]
    C = [[U[i][j] * (t[i] * t[j]) for j in range(k)] for i in range(k)]
    for i in range(k):
        C[i][i] = diag[i]
        if single[i]:  # fold singletons as the operator does
            lam[i] = diag[i] if diag[i] > 0 else 1.0
    if not all(math.isfinite(x) for row in C for x in row) or not all(x > 0 for x in lam):
        if not rescaled and all(math.isfinite(x) for x in w) and all(math.isfinite(x) for row in U for x in row):
            U_s, w_s = _rescale_statistics_numpy(np.array(U, dtype=np.float64), np.array(w, dtype=np.float64))
            return _inverse_root_python(U_s.tolist(), w_s.tolist(), consts, damping, rescaled=True)
        return None
    e, V, info = _lapack().dsyevd(np.array(C), compute_v=1, lower=1)
    if info != 0:
        return None
    e, V = [max(x, damping) for x in e.tolist()], V.tolist()
    if not all(x > 0 for x in e):
        return None
    f_lam = [1 / math.sqrt(x) for x in lam]
    scaled = [[x / math.sqrt(y) for x, y in zip(row, e)] for row in V]  # V diag(e^{-1/2}), row by row
    B = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            x = sum(map(operator.mul, scaled[i], V[j]))
            if i == j:
                x -= f_lam[i]
            B[i][j] = B[j][i] = x * outer_rsqrt[i][j]
    return f_lam, B


def _block_scales_numpy(w: np.ndarray) -> np.ndarray:
    """Per block a power of two ``c`` with ``w c^2`` in ``[1/2, 2)`` (1 where ``w`` is 0 or not finite)."""
    with np.errstate(all="ignore"):
        e = np.frexp(np.where(np.isfinite(w), w, 0.0))[1]
    return np.ldexp(1.0, -(e // 2))


def _rescale_statistics_numpy(U: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""``(U c c^T, w c^2)`` with :func:`_block_scales_numpy`'s powers of two ``c``: the statistics of the
    normalised gradients with block ``i`` scaled by ``c_i``, exactly. :math:`F` is scale-free per block (a
    correlation normalised by each block's mean diagonal ``w / s``), so it does not change; but ``w / s`` is then
    about 1, where a tiny ``w`` (subnormal, or nearly) made ``1 / d`` overflow and the root non-finite."""
    c = _block_scales_numpy(w)
    return (U * c[:, None]) * c, (w * c) * c  # c_i c_j may overflow alone; U_ij c_i c_j does not


def _rescale_statistics(U: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_rescale_statistics_numpy` in torch, without a host synchronisation: the powers of two are built from
    ``w``'s exponents (``torch.frexp``) bit by bit (exact), and taken from ``w`` outside autograd (:math:`F` does not
    depend on them)."""
    with torch.no_grad():
        _, e = torch.frexp(torch.where(torch.isfinite(w), w, 0.0))
        k = torch.div(e, 2, rounding_mode="floor")
        if w.dtype == torch.float64:
            c = ((1023 - k).to(torch.int64) << 52).view(torch.float64)
        elif w.dtype == torch.float32:
            c = ((127 - k).to(torch.int32) << 23).view(torch.float32)
        else:  # 16-bit statistics: 2^-k in float32, cast (exact where it fits)
            c = torch.exp2(-k.to(torch.float32)).to(w.dtype)
    return (U * c.unsqueeze(-1)) * c, (w * c) * c


@functools.cache
def _lapack():
    """scipy's LAPACK wrappers, imported on first use (a dependency of gpytorch and linear_operator too)."""
    from scipy.linalg import lapack

    return lapack


def _root_constants(
    partition: Partition, dtype: torch.dtype, device: torch.device, numpy: bool = False, lists: bool = False
) -> tuple:
    """What :func:`_normalised_inverse_root` needs of the block sizes, made once per partition, dtype, device and form
    (kept on the partition): ``1 / s``, ``1 / (s - 1)`` (0 for singletons), the singleton mask and
    ``s_i^{-1/2} s_j^{-1/2}``; with ``numpy``, as numpy arrays (CPU only) followed by whether some block is a
    singleton; with ``lists``, as (nested) Python lists (:func:`_inverse_root_python`)."""
    key = (dtype, device, numpy, lists)
    cache = getattr(partition, "_inverse_root_constants", None)
    if not isinstance(cache, dict):
        cache = partition._inverse_root_constants = {}  # type: ignore[attr-defined]
    consts = cache.get(key)
    if consts is None:
        s = partition.sizes.to(device=device, dtype=dtype)
        single = s == 1
        inv_within = torch.where(single, 0.0, (s - 1).clamp_min(1).reciprocal())
        r = s.rsqrt()
        consts = (s.reciprocal(), inv_within, single, torch.outer(r, r))
        if lists:
            consts = tuple(c.tolist() for c in consts)
        elif numpy:
            consts = (*(c.numpy() for c in consts), bool(single.any()))
        cache[key] = consts
    return consts


@dataclass(eq=False)
class Workspace:
    """Work buffers of the eager paths, reused every step, for one layout and one ``h`` buffer.

    ``n`` and ``r`` are the two rows of one ``(2, d)`` buffer. Every numpy array on the state's memory (``h``, ``U``,
    ``w``, the stored root) is kept with the address it was made on, and made again where the tensor's memory moved
    with the tensor object kept (``share_memory_()``, ``set_()``, ``.data =``, ``resize_()``; the old block is freed):
    one ``data_ptr()`` per tensor and step.

    Attributes:
        h: the flat ``h`` the views below belong to. # shape: (d,)
        nr: ``n`` and ``r``. # shape: (2, d)
        sums: per block, ``P^T v``, ``P^T n`` and ``P^T n^2``. # shape: (k, 3)
        scratch: ``sqrt(h)`` while masking, one tensor long. # shape: (max numel,)
        grad: the gathered flat gradient (scattered path only, allocated there). # shape: (d,)
        root: the preconditioner operator of the last root step (scattered path), and that step.
        zeros: on CPU, per tensor (``-1``: the flat vector), the entries where ``h == 0``
            (:func:`~bma_gp.optim._scaling.zero_entries`); rebuilt from ``h`` when missing.
        host_zeros: per tensor that took the host form of :func:`_tensor_blocks_cpu_step`, whether some entry of
            its ``h`` was 0 after that step.
        views: per set of tensors with a gradient (up to 16 sets), the flat views of ``h``, ``n`` and ``r``
            per tensor, those of ``n`` and ``r`` shaped like the parameters, and the parameters
            (:func:`_tensor_blocks_cpu_step`); with numpy arrays on ``h``'s memory, kept while ``h.data_ptr()`` is
            ``h_ptr``.
        h_ptr: ``h.data_ptr()`` when :attr:`views` and :attr:`chunk_views` were made. ``h.share_memory_()`` (also
            through a view, ``state[p]["sum"]``: torch.multiprocessing's pickler calls it) and a ``resize_()`` that
            grows the storage keep the tensor and its views but move the memory and free the old block, where numpy
            arrays still point: they are made again.
        h_max: per tensor, an upper bound of its ``h`` (:func:`_tensor_blocks_cpu_step`'s ratio form), valid while
            ``h``'s version counter is ``h_version`` (else checked against ``h``, :func:`_ratio_scales`).
        stepped_version: ``h``'s version counter after the last step of the functional :func:`block_mean_adagrad` with
            this workspace (``-1`` before one): where it moved since (``h.zero_()``, a warm restart), the lists in
            :attr:`zeros` are rebuilt from ``h``. The class keeps its own record and does not use this.
        chain_until: per tensor, the step until which it takes the chain form (a gradient entry was exactly 0, or
            no scale of the ratio form was safe).
        one: a 0-d tensor holding 1 (the step count handed to torch's fused AdaGrad kernel).
        dots: per tensor, the reductions of :func:`_tensor_blocks_cpu_step` (written with ``out=``, read back in one
            call). # shape: (number of tensors, 4)
        chunk_dots: the three reductions per chunk of a tensor whose ratio form runs in chunks
            (:func:`_chunked_ratio_pass`). # shape: (number of chunks, 3)
        chunk_views: per tensor and chunk length, the chunks' bounds and views of ``h``, ``n`` and ``r`` (kept
            with the ``h`` they belong to).
        root_store: the tensors the host computes the root into (:meth:`root_buffers`), and numpy arrays on them;
            the tensors become the state's ``root_lam`` and ``root_B``.
        root_ptrs: the ``data_ptr()`` of those tensors when the arrays were made.
        host_root: the stored root in float64 (lists up to :data:`PYTHON_ROOT_MAX_BLOCKS` blocks, else numpy), with
            the tensors, version counters and memory it was read from (:meth:`root_key`).
        stats_arrays: the statistics ``U`` and ``w``, numpy arrays on their memory and its addresses
            (:meth:`state_arrays`).
        bounds: the tensors' bounds in the flat layout of the blocks it was built for (``ParamBlocks.bounds``).
    """

    h: Tensor
    nr: Tensor
    sums: Tensor
    scratch: Tensor
    grad: Tensor | None = None
    root: tuple[int, BlockMeanLinearOperator] | None = field(default=None)
    zeros: dict[int, Tensor] = field(default_factory=dict)
    views: dict[tuple[int, ...], tuple[list[Any], ...]] = field(default_factory=dict)
    h_ptr: int = 0
    h_max: dict[int, float] = field(default_factory=dict)
    h_version: int = -1
    stepped_version: int = -1
    chain_until: dict[int, int] = field(default_factory=dict)
    one: Tensor | None = None
    dots: Tensor | None = None
    chunk_dots: Tensor | None = None
    chunk_views: dict[tuple[int, int], tuple[Tensor, list, list]] = field(default_factory=dict)
    host_zeros: dict[int, bool] = field(default_factory=dict)
    root_store: tuple[Tensor, Tensor, np.ndarray, np.ndarray] | None = None
    root_ptrs: tuple[int, int] = (0, 0)
    host_root: tuple[tuple, Any, Any] | None = None
    stats_arrays: tuple[Tensor, Tensor, np.ndarray, np.ndarray, int, int] | None = None
    bounds: tuple[int, ...] = ()

    def has_zeros(self) -> bool:
        """Whether some entry of ``h`` was 0 after the last step (CPU; ``True`` before the first)."""
        if not self.zeros and not self.host_zeros:
            return True
        return any(idx.numel() for idx in self.zeros.values()) or any(self.host_zeros.values())

    def forget_zeros(self) -> None:
        """Drop the lists of entries where ``h == 0`` (they assume that ``h`` only grows): rebuilt from ``h`` on the
        next step, after ``h`` was changed outside the steps."""
        self.zeros.clear()
        self.host_zeros.clear()

    def forget_other_params(self, params: list[Tensor]) -> None:
        """Drop the cached :attr:`views` whose parameters are not the tensors ``params`` (by identity): the functional
        step may be called with other tensors of the same shapes (``load_state_dict(..., assign=True)``, a rebuilt
        list), and the step bumps the version counters of the parameters cached there, which must be the ones it
        writes. The class steps one list of the same parameters (its layout's) and does not call this."""
        stale = [
            key
            for key, cached in self.views.items()
            if any(old is not params[i] for old, i in zip(cached[-1], key[1:]))
        ]
        for key in stale:
            del self.views[key]

    def mask_zeros(self, key: int, h: Tensor, r: Tensor, n: Tensor | None = None) -> None:
        """``r = 0`` where ``h = 0``, by the list of such entries (CPU); and ``n = 0`` there too where ``n`` is
        given: ``n = r^2 g`` (the update is ``r R (r g)``), so an entry whose ``g^2`` underflowed to 0 (``h`` stays
        0) has ``n = 0``, not ``g / eps``, as in the fused passes. Nothing more where the list is empty."""
        idx = self.zeros[key] = zero_entries(h, self.zeros.get(key))
        if idx.numel():
            zero = r.new_zeros(())
            r.index_put_((idx,), zero)  # measured faster than index_fill_ (46 against 55 us per 10^4)
            if n is not None:
                n.index_put_((idx,), zero)

    def tensor_views(self, blocks: ParamBlocks, params: list[Tensor], present: list[int]) -> tuple[list, ...]:
        """``(h, n, r, n_shaped, r_shaped, host, stepped)`` of the tensors ``present``: flat views, then ``n`` and ``r``
        shaped like those parameters, then per tensor numpy arrays on ``(h, n, r)`` where it takes the host form of
        :func:`_tensor_blocks_cpu_step` (up to :data:`HOST_MAX_NUMEL` entries of float32/float64), else ``None``,
        then the list of those parameters (built once per set, and again after ``h``'s memory moved)."""
        ptr = self.h.data_ptr()
        if ptr != self.h_ptr:  # share_memory_(), resize_(): the numpy arrays would point at the freed block
            self.views.clear()
            self.chunk_views.clear()
            self.h_ptr = ptr
        key = (HOST_MAX_NUMEL, *present)
        cached = self.views.get(key)
        if cached is None:
            if len(self.views) >= 16:  # gradients present on many different sets of tensors: keep the cache small
                self.views.clear()
            n_all, r_all = self.nr.unbind(0)
            spans = [(blocks.bounds[i], blocks.bounds[i + 1], params[i].shape) for i in present]
            flat = [[x[a:b] for a, b, _ in spans] for x in (self.h, n_all, r_all)]
            shaped = [[x.view(shape) for x, (_, _, shape) in zip(xs, spans)] for xs in flat[1:]]
            on_host = self.h.dtype in (torch.float32, torch.float64)
            host = [
                tuple(x.numpy() for x in xs) if on_host and xs[0].numel() <= HOST_MAX_NUMEL else None
                for xs in zip(*flat)
            ]
            cached = self.views[key] = (*flat, *shaped, host, [params[i] for i in present])
        return cached

    def root_buffers(self, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
        """The workspace's own ``(k,)`` and ``(k, k)`` tensors for the root computed on the host, and numpy arrays on
        their memory: CPU tensors whatever torch's global default device (the host path steps CPU statistics).

        The tensors are the state's ``root_lam`` and ``root_B`` once a root was stored: where their memory moved
        since (``share_memory_()`` of the global state, ``set_()``, ...) the arrays are made on the new memory, and
        where they no longer have the shape, dtype or device of a root (``.data =`` of another tensor) new tensors
        are allocated."""
        store, ptrs = self.root_store, self.root_ptrs
        if store is not None and (store[0].data_ptr() != ptrs[0] or store[1].data_ptr() != ptrs[1]):
            lam, B = store[:2]
            fits = lam.shape == (k,) and B.shape == (k, k) and lam.dtype == B.dtype == dtype
            store = self.root_store = (
                (lam, B, lam.numpy(), B.numpy()) if fits and lam.device.type == B.device.type == "cpu" else None
            )
            self.root_ptrs = (lam.data_ptr(), B.data_ptr())
        if store is None or store[0].shape[0] != k or store[0].dtype != dtype:
            lam, B = torch.empty(k, dtype=dtype, device="cpu"), torch.empty(k, k, dtype=dtype, device="cpu")
            store = self.root_store = (lam, B, lam.numpy(), B.numpy())
            self.root_ptrs = (lam.data_ptr(), B.data_ptr())
        return store

    def chunk_sums(self, count: int) -> Tensor:
        """:attr:`chunk_dots` with room for ``count`` chunks, in ``h``'s dtype and on its device (allocated when it
        has less)."""
        out = self.chunk_dots
        if out is None or out.shape[0] < count or out.dtype != self.h.dtype:
            out = self.chunk_dots = torch.empty(count, 3, dtype=self.h.dtype, device=self.h.device)
        return out

    def state_arrays(self, U: Tensor, w: Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Numpy arrays on the memory of the statistics ``U`` and ``w`` (CPU), made once per pair of tensors and
        again where their memory moved (``share_memory_()``, ``set_()``, ``.data =``, ``resize_()`` keep the
        tensor object and free the old block). With ``k``, new arrays are checked first: ``U`` and ``w`` must be
        ``(k, k)`` and ``(k,)`` CPU tensors of ``h``'s dtype (``ValueError`` otherwise)."""
        cached = self.stats_arrays
        if (
            cached is None
            or cached[0] is not U
            or cached[1] is not w
            or cached[4] != U.data_ptr()
            or cached[5] != w.data_ptr()
        ):
            if k is not None:
                _check_host_statistics(U, w, k, self.h.dtype)
            cached = self.stats_arrays = (U, w, U.numpy(), w.numpy(), U.data_ptr(), w.data_ptr())
        return cached[2], cached[3]

    @staticmethod
    def root_key(lam: Tensor, B: Tensor) -> tuple:
        """What :attr:`host_root` is checked against: the stored root's tensors, their version counters and memory
        (above :data:`PYTHON_ROOT_MAX_BLOCKS` blocks a float64 root is cached as numpy arrays on that memory)."""
        return (lam, B, lam._version, B._version, lam.data_ptr(), B.data_ptr())

    @classmethod
    def build(cls, blocks: ParamBlocks, h: Tensor) -> Workspace:
        numels = [b - a for a, b in zip(blocks.bounds, blocks.bounds[1:])]
        scratch = max(numels, default=0) if blocks.by_rows else h.numel()  # per tensor, or the flat vector
        # built under torch.inference_mode() the buffers would be inference tensors, which the step (run outside
        # inference mode, see block_mean_adagrad) could not write in place
        with torch.inference_mode(False):
            return cls(
                h=h,
                nr=torch.empty(2, h.numel(), dtype=h.dtype, device=h.device),
                sums=torch.zeros(blocks.num_blocks, 3, dtype=h.dtype, device=h.device),
                scratch=torch.empty(scratch, dtype=h.dtype, device=h.device),
                one=torch.ones((), dtype=h.dtype, device=h.device),
                dots=torch.zeros(len(numels), 4, dtype=h.dtype, device=h.device),
                bounds=blocks.bounds,
            )


def _check_host_statistics(U: Tensor, w: Tensor, k: int, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``U`` and ``w`` are CPU tensors of shapes ``(k, k)`` and ``(k,)`` in ``dtype``:
    the statistics of the step's ``k`` blocks, in its state's dtype (between steps they may have been replaced, or
    ``set_()``, ``resize_()`` or ``.data =`` moved them)."""
    got = [(tuple(t.shape), t.dtype, t.device.type) for t in (U, w)]
    if got != [((k, k), dtype, "cpu"), ((k,), dtype, "cpu")]:
        raise ValueError(
            f"the optimizer's statistics do not fit its blocks: U has shape {got[0][0]}, dtype {got[0][1]} on "
            f"{got[0][2]} and w {got[1][0]}, {got[1][1]} on {got[1][2]}, but the step has k = {k} blocks and its "
            f"state is {dtype}: U must be ({k}, {k}) and w ({k},), {dtype} on cpu. They were replaced, resized or "
            "moved (set_(), resize_(), .data =) since the last step; put back tensors of those shapes (the "
            "statistics of this run, or zeros to restart them). Nothing was changed."
        )


def preconditioner(
    stats: dict[str, Any],
    partition: Partition,
    *,
    damping: float,
    update_interval: int,
    correlation: Correlation = normalised_correlation,
    check_root: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""``(lam_R, B_R)`` of :math:`R = (F + \delta I)^{-1/2}` from the statistics ``U`` and ``w``.

    Recomputed when ``stats["step"] - stats["root_step"] >= update_interval`` (or when there is
    none yet: ``root_lam`` absent or ``None``) and cached in ``stats`` (``root_lam``, ``root_B``,
    ``root_step``); otherwise the stale root is returned.

    With ``check_root`` a root that is due raises ``ValueError`` before it is cached where :math:`F` is singular by
    its rank (with the default ``correlation``: fewer steps than blocks with statistics, see
    :func:`_check_rank`) or where it comes out inf or nan (a host synchronisation or two; the step of
    :func:`block_mean_adagrad` asks for it only with ``damping = 0`` and ``check_finite``).

    Raises:
        ValueError: ``U`` is not ``k x k`` or ``w`` not of length ``k``, ``k`` the partition's number of blocks; with
            ``check_root``, a singular :math:`F` (``stats`` unchanged then).
    """
    due = stats.get("root_lam") is None or (stats["step"] - stats["root_step"]) >= update_interval
    if due:
        _check_statistics(stats, partition.num_blocks)
        _check_statistics_dtype(stats["U"], stats["w"])
        if check_root and correlation is normalised_correlation:
            _check_rank(stats["step"], stats["w"], damping)
        if correlation is normalised_correlation:  # the default: the same math without operator objects
            lam, B = _normalised_inverse_root(stats["U"], stats["w"], partition, damping)
        else:
            root = inverse_root(correlation(stats["U"], stats["w"], partition), damping)
            lam, B = root.lam, root.B
        if check_root and not _root_is_finite(lam, B, lam.dtype):
            raise _SingularRoot(_non_finite_root_message(damping))
        stats.update(root_lam=lam, root_B=B, root_step=stats["step"])
    return stats["root_lam"], stats["root_B"]


class _SingularRoot(ValueError):
    r"""A step's root :math:`(F + \delta I)^{-1/2}` is refused: ``damping = 0`` and a singular :math:`F`. Raised
    inside a step, before the root is cached or any parameter is written; :func:`_block_mean_adagrad` then restores
    the statistics and ``h`` and raises a ``ValueError`` with its message."""


_DAMPING_ADVICE = (
    "Choose damping > 0 (the default is 0.1; opt.damping = 0.1 changes it between steps). No state or parameter was "
    "changed."
)


def _check_rank(step: int, w: Any, damping: float) -> None:
    """Raise :class:`_SingularRoot` where :math:`F` is singular by its rank: :math:`F` maps the vectors that are
    constant on each block with statistics (``w > 0``) among themselves by a matrix of the rank of those blocks' ``U``
    (the block mean keeps the block sums, and the rescaling by ``D`` is diagonal and positive there), and ``U`` is a
    sum of ``step`` rank-one terms; so :math:`F` is singular while ``step`` is below the number of such blocks,
    whatever the rounding (its root may come out finite but enormous there, moving the parameters by millions).
    ``w``: a tensor or a numpy array (one host synchronisation on an accelerator)."""
    seen = int((w > 0).sum())
    if step < seen:
        raise _SingularRoot(
            f"BlockMeanAdagrad.step() with damping={damping!r}: F is singular at this step, so (F + damping I)^(-1/2) "
            f"is infinite. After {step} step(s) its block means have rank at most {step}, below the {seen} blocks "
            "that have had a gradient: with damping=0 a partition of k blocks is singular for at least its first "
            f"k - 1 steps, and every model of two or more tensors at its first step. {_DAMPING_ADVICE}"
        )


def _non_finite_root_message(damping: float) -> str:
    return (
        f"BlockMeanAdagrad.step() with damping={damping!r}: the preconditioner (F + damping I)^(-1/2) came out inf or "
        f"nan: F is singular (to rounding). {_DAMPING_ADVICE}"
    )


def _root_is_finite(lam: Any, B: Any, dtype: torch.dtype) -> bool:
    """Whether a root ``(lam, B)`` (tensors, or numpy arrays or lists of float64 to be stored in ``dtype``) holds only
    finite numbers in ``dtype`` (for tensors, one host synchronisation)."""
    if isinstance(lam, Tensor):
        return bool(torch.isfinite(lam).all() & torch.isfinite(B).all())
    np_dtype = _NUMPY_DTYPES.get(dtype, np.float64)
    with np.errstate(over="ignore"):  # a number beyond the dtype's range becomes inf: not finite there
        return bool(np.isfinite(np.asarray(lam, dtype=np_dtype)).all() and np.isfinite(np.asarray(B, np_dtype)).all())


#: per state dtype below float64 (the state is float32 or wider), its smallest positive number as a Python float
_SMALLEST_SUBNORMAL = {torch.float32: float(np.nextafter(np.float32(0), np.float32(1)))}


def _check_statistics(stats: dict[str, Any], k: int) -> None:
    """Raise ``ValueError`` unless ``stats`` holds ``U`` of shape ``(k, k)`` and ``w`` of shape ``(k,)``."""
    U, w = stats.get("U"), stats.get("w")
    shapes = tuple(None if x is None else tuple(x.shape) for x in (U, w))
    if shapes != ((k, k), (k,)):
        raise ValueError(
            f"the statistics do not fit the partition: U has shape {shapes[0]} and w {shapes[1]}, but the partition "
            f"has k = {k} blocks, so U must be ({k}, {k}) and w ({k},). Start them as zeros of those shapes (or "
            "take them from an optimizer over the same parameters and partition)."
        )


def _check_statistics_dtype(U: Tensor, w: Tensor) -> None:
    """Raise ``TypeError`` unless ``U`` and ``w`` are real floating-point tensors of one dtype (integer statistics gave
    a root rounded to integers, mixed ones a root in whichever dtype came first)."""
    if not (U.is_floating_point() and w.is_floating_point()) or U.dtype != w.dtype:
        raise TypeError(
            f"the statistics must be real floating-point tensors of one dtype, got U {U.dtype} and w {w.dtype}; "
            "keep them in the optimizer state's dtype (float32 or wider), e.g. U.double() and w.double()."
        )


#: the key under which :func:`block_mean_adagrad` records in ``stats`` which blocks they belong to (the blocks'
#: :meth:`~bma_gp.optim.param_blocks.ParamBlocks.label_fingerprint`, as in the optimizer's state dict)
FINGERPRINT_KEY = "partition_fingerprint"


def _check_step_and_root(
    stats: dict[str, Any],
    k: int,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    *,
    where: str = "stats",
    fix: str | None = None,
) -> None:
    """Raise ``TypeError`` or ``ValueError`` unless ``stats`` holds a step count and statistics (and a cached root,
    where it holds one) that a step over ``k`` blocks can take: ``step`` a non-negative ``int``; ``U`` and ``w``
    (and ``root_lam``, ``root_B``, where either is not ``None``) tensors of shapes ``(k, k)``, ``(k,)``, ``(k,)`` and
    ``(k, k)``, of ``dtype`` on ``device`` (where given; else of a real floating-point dtype); a cached root's
    ``root_step`` an ``int`` not after ``step`` (a later one would keep the stale root until the step count reached
    it). Only types, shapes, dtypes and devices are read (no host synchronisation).

    Shared by :func:`block_mean_adagrad` (the caller's ``stats``) and :meth:`BlockMeanAdagrad.load_state_dict`
    (a saved global state, before anything is loaded: ``where`` names it in the message, and ``fix``, a sentence,
    replaces the fixes the messages give to a caller of the functional step)."""
    step = check_step_count(stats, "step", where, fix or "start it at 0.")
    tensors = {"U": (k, k), "w": (k,)}
    if stats.get("root_lam") is not None or stats.get("root_B") is not None:
        tensors.update(root_lam=(k,), root_B=(k, k))
        root_step = stats.get("root_step")
        if not isinstance(root_step, int) or isinstance(root_step, bool):
            raise TypeError(
                f"{where}['root_step'] must be the int step of the cached root, got {root_step!r}; "
                + (fix or "set root_lam, root_B and root_step to None to compute the root at this step.")
            )
        if root_step > step:
            raise ValueError(
                f"{where}['root_step'] = {root_step} is after {where}['step'] = {step}: the cached root cannot come "
                "from a later step, and the stale root would be kept until the step count reached it; "
                + (fix or "set root_lam, root_B and root_step to None to compute the root at this step.")
            )
    for name, shape in tensors.items():
        t = stats.get(name)
        if isinstance(t, Tensor) and tuple(t.shape) == shape:
            if t.is_floating_point() if dtype is None else (t.dtype == dtype and t.device == device):
                continue
        got = f"has shape {tuple(t.shape)}, dtype {t.dtype} on {t.device}" if isinstance(t, Tensor) else f"has {t!r}"
        if name not in stats:
            got = "is missing"
        if dtype is None:
            need = f"k = {k} blocks: it must be a real floating-point tensor of shape {shape}"
        else:
            need = (
                f"k = {k} blocks and state_sum is {dtype} on {device}: it must be a {dtype} tensor of shape {shape} on "
                f"{device}"
            )
        tail = (
            f"; {fix}"
            if fix
            else " (take the statistics, the root and state_sum from one run over these blocks, or set root_lam, "
            "root_B and root_step to None)."
        )
        raise ValueError(f"{where}[{name!r}] {got}, but the partition has {need}{tail}")


def _check_arguments(params, grads, state_sum, stats, blocks: ParamBlocks, workspace, lr, weight_decay, maximize):
    """Raise ``ValueError`` (``TypeError`` for an argument of the wrong type) unless the arguments of
    :func:`block_mean_adagrad` fit ``blocks`` and one another, before anything changes; return the blocks'
    fingerprint (recorded in ``stats`` after the step). Everything but the fingerprint reads only shapes, dtypes and
    devices (no host synchronisation); the fingerprint is computed once per :class:`ParamBlocks` (one host copy of the
    labels of scattered tensors) and kept there."""
    m, k = len(params), blocks.num_blocks
    for name, values in (("lr", lr), ("weight_decay", weight_decay), ("maximize", maximize)):
        if not isinstance(values, (list, tuple)) or len(values) != m:
            listed = isinstance(values, (list, tuple))
            got = f"{len(values)} values" if listed else f"a {type(values).__name__}"
            raise (ValueError if listed else TypeError)(
                f"block_mean_adagrad takes {name} per parameter, a list of {m} values, got {got}; "
                f"pass [{name}] * len(params) for one value for all."
            )
    if not isinstance(state_sum, Tensor) or not state_sum.is_floating_point():
        what = state_sum.dtype if isinstance(state_sum, Tensor) else type(state_sum).__name__
        raise TypeError(f"state_sum must be a real floating-point tensor, got {what}; start it as zeros of shape (d,).")
    check_params(params)  # real floating-point parameters with data, on one device
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        j = first.setdefault(id(p), i)
        if j != i:  # as BlockMeanAdagrad refuses it: two blocks of one preconditioner, stepped twice
            raise ValueError(
                f"params[{i}] is params[{j}] again: block_mean_adagrad would hold it as two sets of blocks with their "
                "own statistics and step it twice. List each parameter once (and build blocks for that list)."
            )
    dtype, device = state_sum.dtype, state_sum.device
    if not state_sum.is_contiguous():
        raise ValueError(
            "state_sum must be contiguous (the step reads it as views per tensor); pass state_sum.clone()."
        )
    needed = state_dtype(p.dtype for p in params)
    if torch.promote_types(dtype, needed) != dtype:
        raise ValueError(
            f"state_sum has dtype {dtype}, narrower than these parameters need ({needed}: float32 or the widest "
            f"parameter dtype); keep the state as {needed} (state_sum.to({needed}), and U, w and the root with it)."
        )
    for i, (p, g) in enumerate(zip(params, grads)):
        numel = blocks.bounds[i + 1] - blocks.bounds[i]
        if p.numel() != numel or p.device != device:
            raise ValueError(
                f"parameter {i} has shape {tuple(p.shape)} on {p.device}, but blocks hold {numel} entries for it and "
                f"state_sum is on {device}: pass the parameters in the order blocks were built for, on state_sum's "
                "device (build blocks with ParamBlocks.build(params, rule))."
            )
        if g is None:
            continue
        if not isinstance(g, Tensor):
            raise TypeError(f"grads[{i}] must be a tensor or None, got {type(g).__name__}.")
        if g.layout != torch.strided:
            raise SparseGradientError(
                f"sparse gradients are not supported (grads[{i}] has layout {g.layout}); pass dense gradients "
                "(g.to_dense()), e.g. from nn.Embedding(..., sparse=False)."
            )
        if g.shape != p.shape or g.device != device or not g.is_floating_point():
            raise ValueError(
                f"grads[{i}] has shape {tuple(g.shape)}, dtype {g.dtype} on {g.device}, but parameter {i} has shape "
                f"{tuple(p.shape)} on {device}: pass each parameter's own (floating-point) gradient, or None."
            )
    _check_step_and_root(stats, k, dtype, device)
    fingerprint = blocks.label_fingerprint(k)
    saved = stats.get(FINGERPRINT_KEY)
    if saved is not None and saved != fingerprint:
        raise ValueError(
            f"stats belong to other blocks: they were stepped with blocks of fingerprint {saved}, and these blocks "
            f"({k} of sizes {_short(blocks.partition.sizes.tolist())}) have {fingerprint}. The statistics of another "
            "partition with as many blocks describe other entries; step them with the blocks they were made with, or "
            f"start new ones (U and w zeros, the root None, and no {FINGERPRINT_KEY!r} entry)."
        )
    if workspace is not None:
        if not isinstance(workspace, Workspace):
            raise TypeError(f"workspace must be a Workspace or None, got {type(workspace).__name__}.")
        if workspace.h is not state_sum or workspace.bounds != blocks.bounds or workspace.sums.shape[0] != k:
            raise ValueError(
                "workspace was built for another state_sum or other blocks (it holds views of its own state_sum and "
                "per-tensor buffers of its blocks); build one with Workspace.build(blocks, state_sum), or pass None."
            )
    return fingerprint


def _short(values: list[int], limit: int = 8) -> str:
    """``values`` for a message, the first ``limit`` of them when there are more."""
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)})"


@torch.no_grad()  # the parameters are leaves that require grad: updated in place, as torch.optim's step does
def block_mean_adagrad(
    params: list[Tensor],
    grads: list[Tensor | None],
    state_sum: Tensor,
    stats: dict[str, Any],
    blocks: ParamBlocks,
    workspace: Workspace | None,
    *,
    lr: list[float],
    weight_decay: list[float],
    maximize: list[bool],
    eps: float,
    damping: float,
    update_interval: int,
    correlation: Correlation = normalised_correlation,
    mask: bool,
    check_finite: bool,
    fused: bool,
) -> None:
    r"""One step of block-mean AdaGrad on every parameter (see the module docstring for the math).

    Args:
        params: all parameters, in the flat order of ``blocks``.
        grads: their gradients, ``None`` for a parameter without one (it keeps its ``h``, adds
            nothing to the statistics and does not move). A call where every gradient is ``None`` changes
            nothing and is not counted as a step, as :meth:`BlockMeanAdagrad.step` then returns at once.
        state_sum: :math:`h` of all parameters, updated in place. # shape: (d,)
        stats: the global state, updated in place: ``U`` (``k x k``), ``w`` (``k``), ``step`` and the
            cached root (see :func:`preconditioner`), in ``state_sum``'s dtype and on its device. After the step it
            also holds ``"partition_fingerprint"``: the blocks' :meth:`~ParamBlocks.label_fingerprint`, and
            statistics that hold another one (stepped with other blocks, even as many of other sizes) are refused;
            statistics without it (zeros, the class's ``global_state``) are taken as they are.
        blocks: the partition of the ``d`` entries, per tensor.
        workspace: buffers for ``state_sum`` and ``blocks`` (:meth:`Workspace.build`), kept between steps; unused
            by the fused path. ``None`` builds one for this call (correct, but it allocates and finds the entries
            where ``h == 0`` again every step). It may be kept across calls with other parameter tensors of the same
            shapes (its views of them are dropped and made again).
        lr, weight_decay, maximize: per parameter (numbers or one-element tensors, and bools; checked as the class
            checks them). The step runs under ``torch.no_grad()``: no need to wrap the call.
        eps, damping, update_interval, correlation: as in :class:`~bma_gp.optim.BlockMeanAdagrad`.
        mask: whether some entry of :math:`h` may be 0 before this step (the eager paths on an
            accelerator then zero :math:`r` there by formula; on CPU they keep the list of such entries
            in ``workspace`` instead, and the fused path always masks, at no cost).
        check_finite: raise ``ValueError`` on an inf/nan gradient before changing anything (the fused path's
            first pass computes the flag; for the eager paths this function checks first, with one host
            synchronisation).
        fused: take the compiled path (``blocks.by_rows`` required).

    Raises:
        ValueError: with ``check_finite``, a gradient holds inf or nan; ``params``, ``grads``,
            ``state_sum``, ``stats`` (``U``, ``w``, the root: shape, dtype, device, blocks) or ``workspace`` do not
            fit ``blocks`` and one another; ``state_sum`` is narrower than float32 or a parameter's dtype; ``eps``,
            ``damping`` or ``update_interval`` is invalid (checked as the class checks them). Nothing is changed
            then; also a negative ``stats["step"]`` or a cached root whose ``root_step`` is after it (the stale
            root would be kept until the count reached it). ``TypeError``: an argument of the wrong type (``lr``
            not a list, ``stats["step"]`` not an int).
        SparseGradientError: a gradient is sparse.
    """
    if not isinstance(state_sum, Tensor):
        raise TypeError(f"state_sum must be a tensor of shape (d,), got {type(state_sum).__name__}.")
    if not isinstance(blocks, ParamBlocks):
        raise TypeError(
            f"blocks must be a ParamBlocks, got {type(blocks).__name__}; build it with ParamBlocks.build(params, rule)."
        )
    if not isinstance(stats, dict):
        raise TypeError(
            f"stats must be a dict holding U, w and step, got {type(stats).__name__}; start it as "
            "{'U': zeros(k, k), 'w': zeros(k), 'step': 0}."
        )
    _refuse_inference_tensors(params, state_sum, stats)
    _refuse_transforms()
    d, k = blocks.bounds[-1], blocks.num_blocks
    if len(params) != len(blocks.segments) or len(grads) != len(params) or tuple(state_sum.shape) != (d,):
        raise ValueError(
            f"block_mean_adagrad got {len(params)} parameters, {len(grads)} gradients and state_sum of shape "
            f"{tuple(state_sum.shape)}, but blocks describe {len(blocks.segments)} parameters of d = {d} entries: "
            "pass one gradient (or None) per parameter and state_sum of shape (d,), as built for these blocks."
        )
    _check_statistics(stats, k)
    eps = check_hyperparameter("eps", eps, positive=True)  # eps = 0 gives 0 / 0 where h = 0 (see the class)
    damping = check_hyperparameter("damping", damping)
    update_interval = check_hyperparameter("update_interval", update_interval, positive=True, integer=True)
    # the switches as the class checks its own (a truthy string such as "no" silently meant True; NumPy bools pass)
    mask = check_bool("mask", mask)
    check_finite = check_bool("check_finite", check_finite)
    fused = check_bool("fused", fused)
    fingerprint = _check_arguments(params, grads, state_sum, stats, blocks, workspace, lr, weight_decay, maximize)
    # a gradient with torch's negative bit (x.conj().imag) or a zero stride: materialised, as the class does
    # (FlatParams.collect_grads)
    grads = [materialised_grad(g) if g is not None else g for g in grads]
    # per parameter as the class passes them: Python floats (a 0-d tensor lr of a scheduler, as in a param group)
    lr = [float(check_hyperparameter("learning rate", x)) for x in lr]
    weight_decay = [float(check_hyperparameter("weight_decay", x)) for x in weight_decay]
    maximize = [check_bool("maximize", x) for x in maximize]
    if all(g is None for g in grads):
        # no gradient at all: nothing to do, and the step is not counted, as the class's step returns early then (the
        # count moves the root's refresh schedule: counting it put a later run 0.21 away from the class's)
        return
    if check_finite and not fused:  # the eager paths leave the check to their caller (the class checks first)
        present = [g for g in grads if g is not None]
        if present and not _all_finite(present, state_sum.dtype, [])[0]:
            raise ValueError(_non_finite_message("BlockMeanAdagrad", params))
    stats.setdefault("root_lam", None)  # no root yet: computed at this step
    stats.setdefault("root_B", None)
    stats.setdefault("root_step", None)
    if workspace is not None:
        # the CPU step for one block per tensor bumps the version counters of the parameters its cached views were
        # made with: other tensors of the same shapes (a rebuilt list) would be written with their counters unbumped
        # (autograd would not refuse a graph that saved their old values) and the old ones bumped
        workspace.forget_other_params(params)
        if workspace.stepped_version != state_sum._version:
            # h changed since this workspace's last step (a reset in place, h.zero_()): some entry may be 0 again, and
            # the CPU lists of such entries assume that h only grows (a kept list left r = eps^(-1/2) there, and an
            # entry whose gradient was 0 moved by 236 at lr = 0.1), as the class's step checks its own record
            workspace.forget_zeros()
    # under torch.inference_mode() the buffers the step makes (a workspace, the root) would be inference tensors,
    # without the version counters it keeps its caches by: it runs outside, as the class's step does
    with contextlib.ExitStack() as outside:
        if torch.is_inference_mode_enabled():
            outside.enter_context(torch.inference_mode(False))
            outside.enter_context(torch.no_grad())
        _run_block_mean_adagrad(
            params,
            grads,
            state_sum,
            stats,
            blocks,
            workspace,
            lr=lr,
            weight_decay=weight_decay,
            maximize=maximize,
            eps=eps,
            damping=damping,
            update_interval=update_interval,
            correlation=correlation,
            mask=mask,
            check_finite=check_finite,
            fused=fused,
        )
    stats[FINGERPRINT_KEY] = fingerprint  # these statistics now belong to these blocks
    if workspace is not None:
        workspace.stepped_version = state_sum._version


#: the tensors of a functional step's ``stats`` (the statistics and the cached root)
_STATS_TENSORS = ("U", "w", "root_lam", "root_B")


def _refuse_inference_tensors(params: list[Tensor], state_sum: Tensor, stats: dict[str, Any]) -> None:
    """``ValueError`` where a parameter or a statistic is an inference tensor (made under ``torch.inference_mode()``):
    such a tensor has no version counter, which the step reads to keep its caches, and outside inference mode it
    cannot be updated in place. A few flag reads; before anything changes."""
    tensors = [state_sum, *(stats.get(key) for key in _STATS_TENSORS), *params]
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and t.is_inference():  # named only then: no string per parameter and step
            names = [
                "state_sum",
                *(f'stats["{key}"]' for key in _STATS_TENSORS),
                *map("params[{}]".format, range(len(params))),
            ]
            name = names[i]
            raise ValueError(
                f"{name} is an inference tensor (made under torch.inference_mode()): the step keeps its caches by "
                "version counters, which inference tensors lack. Make the parameters and the state outside "
                "torch.inference_mode() (the step itself may be called inside it, or under torch.no_grad())."
            )


def _refuse_transforms() -> None:
    """``ValueError`` inside a running :mod:`torch.func` transform (``grad``, ``vmap``, ...): the step updates the
    parameters, ``state_sum`` and ``stats`` in place, which a transform's wrappers cannot take (torch raised its own
    error part-way through, after ``stats["step"]`` had counted the step). One flag read; before anything changes."""
    if functorch_active():
        raise ValueError(
            "block_mean_adagrad was called inside a torch.func transform (grad, vmap, jacrev, ...): it updates "
            "params, state_sum and stats in place, which a transform's tensors cannot take. Compute the gradients "
            "with the transform (grads = torch.func.grad(loss)(params)) and call the step outside it."
        )


def _run_block_mean_adagrad(params, grads, state_sum, stats, blocks, workspace, *, fused, **kwargs) -> None:
    """:func:`block_mean_adagrad` after its checks: a workspace for the eager paths, autocast off."""
    if workspace is None and not fused:
        workspace = Workspace.build(blocks, state_sum)
    # called inside torch.autocast, the step's matrix products would run in bfloat16/float16 (see the class's step)
    with torch.autocast(state_sum.device.type, enabled=False), torch.autocast("cpu", enabled=False):
        _block_mean_adagrad(params, grads, state_sum, stats, blocks, workspace, fused=fused, **kwargs)


def _block_mean_adagrad(
    params, grads, state_sum, stats, blocks: ParamBlocks, workspace: Workspace | None, *, eps: float, fused: bool, **kw
) -> None:
    """:func:`block_mean_adagrad` without its checks of the arguments against ``blocks`` (the optimizer class passes
    arguments built for them, every step): the dispatch to the fused, the by-rows or the scattered step.

    With ``check_finite`` and ``damping = 0`` (a singular :math:`F` then gives an infinite root) the step checks the
    root it computes and, where :math:`F` is singular by its rank (:func:`_check_rank`) or the root is not finite,
    raises ``ValueError`` with ``h``, ``U``, ``w``, the step count, the root and the workspace's bookkeeping as they
    were (the eager paths have updated ``h`` by then: restored from a copy made only in this case) and no parameter
    written.

    The step's tensors are made on ``state_sum``'s device whatever torch's global default device
    (:func:`torch.set_default_device`): this module names the device of every tensor it makes, and where another
    default is set (a torch function mode is active: one C call tells, nothing more on the default path) the step
    runs inside ``with torch.device(state_sum.device)``, for the helpers it calls."""
    if _default_device_elsewhere(state_sum.device):
        with torch.device(state_sum.device):
            _block_mean_adagrad(params, grads, state_sum, stats, blocks, workspace, eps=eps, fused=fused, **kw)
        return
    # an eps below the smallest subnormal of the state's dtype (1e-50 in float32) is 0 in its arithmetic, and where
    # h = 0 the step would divide 0 by 0 and poison U and w, which eps > 0 is required to prevent. Raised to that
    # subnormal, it changes nothing else: sqrt(h) of every h > 0 is so much larger that the sum rounds to it
    eps = max(eps, _SMALLEST_SUBNORMAL.get(state_sum.dtype, 0.0))
    check_root = kw["check_finite"] and kw["damping"] == 0  # a Python test: nothing more on the default path
    kwargs = dict(kw, eps=eps, check_root=check_root)
    if fused:
        if not blocks.by_rows:
            raise ValueError("the fused step needs blocks that are rows of every tensor ('tensor' or 'row').")
        impl = _fused_block_mean_adagrad
    elif blocks.by_rows:
        impl = _single_tensor_block_mean_adagrad
    else:
        impl = _scattered_block_mean_adagrad
    if not check_root:
        impl(params, grads, state_sum, stats, blocks, workspace, **kwargs)
        return
    # the fused path writes h after the root (its first pass writes nothing); the eager paths before it
    h_before = None if fused else state_sum.clone()
    U, w = stats["U"], stats["w"]
    before = (U.clone(), w.clone(), stats["step"], state_sum._version)
    ws_before = None if workspace is None else (dict(workspace.h_max), dict(workspace.chain_until), workspace.h_version)
    try:
        impl(params, grads, state_sum, stats, blocks, workspace, **kwargs)
    except _SingularRoot as error:  # raised before any parameter was written and before the root was cached
        U.copy_(before[0])  # the statistics were updated in place
        w.copy_(before[1])
        stats["step"] = before[2]
        if h_before is not None:
            state_sum.copy_(h_before)
        if workspace is not None and ws_before is not None:
            workspace.forget_zeros()  # the lists of entries where h == 0 are rebuilt from the restored h
            workspace.h_max, workspace.chain_until = ws_before[0], ws_before[1]
            # the bounds of h hold for the restored h where they held for it before the step
            workspace.h_version = state_sum._version if ws_before[2] == before[3] else ws_before[2]
        raise ValueError(str(error)) from None


def _default_device_elsewhere(device: torch.device) -> bool:
    """Whether torch's default device for new tensors (:func:`torch.set_default_device`, a ``with torch.device(...)``
    block) is another than ``device``. Such a default is a torch function mode: without any (the usual case) this
    is one C call; with one, it makes an empty tensor and reads its device."""
    return bool(torch._C._len_torch_function_stack()) and torch.empty(0).device != device


def _accumulate(stats: dict[str, Any], n_sums: Tensor, n_sq: Tensor) -> None:
    """The step's block statistics: ``U += (P^T n)(P^T n)^T``, ``w += P^T n^2``."""
    stats["U"].addr_(n_sums, n_sums)
    stats["w"].add_(n_sq)


def _single_tensor_block_mean_adagrad(
    params,
    grads,
    state_sum,
    stats,
    blocks,
    ws,
    *,
    lr,
    weight_decay,
    maximize,
    eps,
    damping,
    update_interval,
    correlation,
    mask,
    check_finite,
    check_root,
) -> None:
    dtype, cpu = state_sum.dtype, state_sum.device.type == "cpu"
    if cpu and _tensor_blocks_apply(params, grads, blocks, dtype, maximize):
        _tensor_blocks_cpu_step(
            params,
            grads,
            state_sum,
            stats,
            blocks,
            ws,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            damping=damping,
            update_interval=update_interval,
            correlation=correlation,
            check_finite=check_finite,
            check_root=check_root,
        )
        return
    stats["step"] += 1
    sums = ws.sums.zero_()  # columns: per block P^T v, P^T n, P^T n^2
    n_all, r_all = ws.nr.unbind(0)
    present = []
    for i, g in enumerate(grads):
        seg = blocks.segments[i]
        if g is None or seg is None:
            continue
        present.append(i)
        a, b = blocks.bounds[i], blocks.bounds[i + 1]
        g = g.reshape(-1)  # a view where it can be: read where it is
        if g.dtype != dtype:
            g = g.to(dtype)
        if maximize[i]:
            g = -g
        h, n, r = state_sum[a:b], n_all[a:b], r_all[a:b]
        h.addcmul_(g, g)
        z_inv_sqrt(h, eps, mask=mask and not cpu, out=r, scratch=ws.scratch[: b - a], divide=(g, n))  # n = g / z
        if cpu:
            ws.mask_zeros(i, h, r, n)  # before the block sums: n = 0 where h = 0, as r
        first, last = blocks.first_block[i], blocks.first_block[i + 1]
        if last - first == 1:  # one block (every tensor under "tensor"): plain reductions, no partition bookkeeping
            torch.stack([torch.dot(g, r), n.sum(), torch.dot(n, n)], out=sums[first])
        else:
            torch.stack([seg.block_dot(g, r), seg.block_sum(n), seg.block_dot(n, n)], dim=-1, out=sums[first:last])
    v_sums, n_sums, n_sq = sums.unbind(-1)
    _accumulate(stats, n_sums, n_sq)
    lam, B = preconditioner(
        stats,
        blocks.partition,
        damping=damping,
        update_interval=update_interval,
        correlation=correlation,
        check_root=check_root,
    )
    coupling = B @ v_sums  # (B_R P^T v): the k x k step of the operator's product
    for i in reversed(present):  # the tensors of the first loop last to first: their n and r may still be cached
        seg, p = blocks.segments[i], params[i]
        a, b = blocks.bounds[i], blocks.bounds[i + 1]
        first, last = blocks.first_block[i], blocks.first_block[i + 1]
        n, r = n_all[a:b], r_all[a:b]
        decay = 1.0 - lr[i] * weight_decay[i]
        if p.dtype != dtype:  # narrower than the state (16-bit): the step in the state's dtype, rounded into p once
            target = torch.zeros_like(n)
            seg.addcmul_(target, lam[first:last], n, value=-lr[i])
            seg.addcmul_(target, coupling[first:last], r, value=-lr[i])
            p.copy_(target.view(p.shape).add_(p, alpha=decay))
            continue
        if weight_decay[i]:
            p.mul_(decay)
        if seg.num_blocks == 1 and p.is_contiguous():
            # one block: p += -lr lam_R n, then p += -lr coupling r, each factor a 0-d tensor (no host sync);
            # two contiguous passes measured faster than one addmv over the strided [n r] columns (123 vs 167 us
            # per 10^6 entries, 2 threads)
            p.view(-1).addcmul_(n, lam[first], value=-lr[i]).addcmul_(r, coupling[first], value=-lr[i])
            continue
        target = p.view(-1) if p.is_contiguous() else torch.zeros_like(n)
        seg.addcmul_(target, lam[first:last], n, value=-lr[i])
        seg.addcmul_(target, coupling[first:last], r, value=-lr[i])
        if target.data_ptr() != p.data_ptr():
            p.add_(target.view(p.shape).to(p.dtype))


def _tensor_blocks_apply(params, grads, blocks: ParamBlocks, dtype: torch.dtype, maximize) -> bool:
    """Whether :func:`_tensor_blocks_cpu_step` takes this step: the blocks are rows of every tensor (the dispatch of
    :func:`block_mean_adagrad` sends other layouts to the scattered step, even when the tensors with a gradient are
    one block each), some tensor with entries has a gradient, and each such tensor is one block, with contiguous
    gradient and parameter of the state's dtype and no ``maximize``."""
    if not blocks.by_rows:
        return False
    first, any_present = blocks.first_block, False
    for i, g in enumerate(grads):
        if g is None or blocks.segments[i] is None:
            continue
        any_present, p = True, params[i]
        if (
            first[i + 1] - first[i] != 1
            or maximize[i]
            or g.dtype != dtype
            or p.dtype != dtype
            or not g.is_contiguous()
            or not p.is_contiguous()
        ):
            return False
    return any_present


#: tensors of at most this many entries (float32 or float64) take the host form of the CPU step for one block per
#: tensor: numpy operations on the tensors' own memory, which carry less fixed cost than torch calls (5-25 us each
#: right after passes over megabytes). Measured with cold caches, the first pass per tensor: 50 against 69 us at
#: 1024 entries, 182-185 against 207-219 us at 32768, even at 49152, 318-330 against 287-314 us at 65536 (numpy
#: runs on one thread, torch on two)
HOST_MAX_NUMEL = 2**15
#: where some tensor of a step takes a torch form (it is above :data:`HOST_MAX_NUMEL`), the host form is taken only
#: when at least this many tensors qualify for it, else they take the torch forms too. Right after the passes over
#: megabytes numpy's code is out of the caches, and its first calls cost about 150 us more per step than the same
#: calls warm; torch's code is warm there. Measured at 2 x 2^20 entries plus m tensors of 1024 (same optimizer,
#: interleaved): the torch forms 75-125 us faster per step at m = 2, the two forms within 1% at m = 4, the host form
#: 200 us faster at m = 8 and 500 us at m = 16
HOST_MIN_TENSORS = 3
#: after some gradient entry of a tensor was exactly 0 (where the ratio form needs a repair pass), the tensor takes
#: the chain form for this many steps before the ratio form is tried again
RATIO_RETRY_STEPS = 32
#: relative slack of the bounds kept for the ratio form (``h + g^2`` and ``sum g^2`` round by far less)
_BOUND_SLACK = 1 + 2.0**-20


def _tensor_blocks_cpu_step(
    params,
    grads,
    state_sum,
    stats,
    blocks,
    ws,
    *,
    lr,
    weight_decay,
    eps,
    damping,
    update_interval,
    correlation,
    check_finite,
    check_root,
) -> None:
    r"""The eager step on CPU when every tensor is one block (``partition="tensor"``, the default).

    The arithmetic of the tensor-by-tensor loop, in fewer passes over memory and fewer calls:

    * one read of every gradient first, :math:`\sum g^2` (a dot product): with ``check_finite`` a non-finite sum
      makes the step look at that gradient entry by entry and raise ``ValueError`` before anything changes; the
      sum also bounds :math:`\max |g|` (rounding is monotone: a sum of nonnegative terms is at least its
      largest term, rounded) and so this step's ``h`` (:attr:`Workspace.h_max`);
    * tensor by tensor, so that each tensor's ``g``, ``h``, ``n`` and ``r`` stay in the last-level cache from
      one operation to the next (one pass over all tensors per operation was measured slower at 2.1M
      parameters: 42 MB of buffers do not fit in a 32 MB cache), one of
      - the *host form* (tensors of up to :data:`HOST_MAX_NUMEL` entries, float32/float64): the whole step in
        numpy on the tensors' memory (:func:`_host_tensor_pass`);
      - the *ratio form* (larger tensors, when :func:`_cpu_kernels.ratio_scale` finds a safe scale ``s``):
        ``h``, :math:`s n` and :math:`\sqrt{s} r` in four passes (:func:`_cpu_kernels.adagrad_ratio`), the
        update in one (:func:`_cpu_kernels.add_two`); on tensors without entries where ``h == 0``, in chunks
        that fit the level-2 caches where the machine suits it (:func:`_chunked_ratio_pass`). Where a gradient
        entry was exactly 0 the quotient is ``nan``, which the block sum ``P^T v`` reveals: that tensor's ``r``
        is recomputed from ``h`` and it takes the chain form for :data:`RATIO_RETRY_STEPS` steps;
      - or the *chain form*: ``h += g^2``, then ``z`` and ``n = g / z`` and ``r`` (:func:`z_inv_sqrt`);
    * the k-sized rest (statistics, root, per-tensor factors) on the host in float64 numpy
      (:func:`_host_coefficients`), for the default correlation and up to :data:`NUMPY_ROOT_MAX_BLOCKS` blocks.
    """
    present = [i for i, g in enumerate(grads) if g is not None and blocks.segments[i] is not None]
    gs = [grads[i].view(-1) for i in present]
    hs, ns, rs, n_shaped, r_shaped, host, stepped = ws.tensor_views(blocks, params, present)
    m = len(present)
    on_host = [j for j in range(m) if host[j] is not None and not gs[j].is_neg()]
    if len(on_host) < min(m, HOST_MIN_TENSORS):  # a few small tensors beside larger ones: the torch forms
        on_host = []
    big = sorted(set(range(m)).difference(on_host))
    chunk = _cpu_kernels.ratio_chunk_numel(state_sum.dtype) if big else 0  # checks the setting: before any change
    host_root = correlation is normalised_correlation and blocks.num_blocks <= NUMPY_ROOT_MAX_BLOCKS
    # the buffers the step writes into are allocated (once per workspace) before it changes anything: a step that
    # cannot allocate them fails with h, the statistics and the step count as they were
    if host_root:
        _prepare_host_root(ws, blocks, stats)
    if chunk:
        most = max((-(-gs[j].numel() // chunk) for j in big if gs[j].numel() >= 2 * chunk), default=0)
        if most:
            ws.chunk_sums(most)
    squares = [0.0] * m
    dots = ws.dots  # per tensor: g . g, then g . r, sum n and n . n (the torch forms)
    if big:
        for j in big:
            torch.dot(gs[j], gs[j], out=dots[j, 0])
        column = dots[:m, 0].tolist()
        for j in big:
            squares[j] = column[j]
    # the host form's numpy calls one after the other, from here to its first pass: numpy's code stays warm
    g_np = {j: _host_array(gs[j]) for j in on_host}
    with np.errstate(all="ignore"):  # an overflow is looked at below
        for j in on_host:
            squares[j] = float(np.dot(g_np[j], g_np[j]))
    if check_finite and not all(math.isfinite(x) for x in squares):  # or a finite sum of squares overflowed
        if not all(math.isfinite(x) or bool(torch.isfinite(gs[j]).all()) for j, x in enumerate(squares)):
            raise ValueError(_non_finite_message("BlockMeanAdagrad", params))
    stats["step"] += 1
    block_sums: list = [(0.0, 0.0, 0.0)] * m  # per tensor: P^T v, P^T n, P^T n^2
    with np.errstate(all="ignore"):  # inf/nan as torch gives them (eps = 0, check_finite=False), without warnings
        for j in on_host:
            h_np, n_np, r_np = host[j]
            *block_sums[j], ws.host_zeros[present[j]] = _host_tensor_pass(g_np[j], h_np, n_np, r_np, eps)
    scales = _ratio_scales(ws, present, hs, big, squares, eps, stats["step"])
    chunked: dict[int, list[float]] = {}  # per tensor whose ratio form ran in chunks: its three (scaled) sums
    for j in big:
        i, g, h, n, r, s = present[j], gs[j], hs[j], ns[j], rs[j], scales[j]
        known = ws.zeros.get(i)
        if known is None and s and chunk and g.numel() >= 2 * chunk and float(h.min()) > 0:
            # no list of the entries where h == 0 (a new workspace, or h changed outside the steps): none before this
            # step's g^2, so none after it; the chunks then run as in the run this one continues
            known = ws.zeros[i] = torch.empty(0, dtype=torch.long, device=h.device)
        if s and chunk and g.numel() >= 2 * chunk and known is not None and not known.numel():
            chunked[j] = _chunked_ratio_pass(ws, i, g, h, n, r, s, eps, chunk)  # no entry of h is 0: no mask
        elif s:
            _cpu_kernels.adagrad_ratio(g, h, n, r, ws.one, s, eps)  # h, n' = s n, r' = sqrt(s) r
        else:
            h.addcmul_(g, g)
            z_inv_sqrt(h, eps, mask=False, out=r, divide=(g, n))  # r, and n = g / z
        if j in chunked:
            continue
        # h = 0 (no gradient yet, or g^2 underflowed to 0): r = 0 and n = r^2 g = 0 there, before the block sums
        ws.mask_zeros(i, h, r, n)
        torch.dot(g, r, out=dots[j, 1])
        torch.sum(n, 0, out=dots[j, 2])
        torch.dot(n, n, out=dots[j, 3])
    if big:
        values = dots[:m, 1:].tolist()
        for j in big:
            v, n_sum, n_sq = chunked[j] if j in chunked else values[j]
            s = scales[j]
            if s:
                if math.isnan(v):  # a gradient entry was exactly 0: r = nan there
                    v = _repair_ratio_form(ws, present[j], gs[j], hs[j], rs[j], s, eps, stats["step"])
                v, n_sum, n_sq = v / math.sqrt(s), n_sum / s, n_sq / (s * s)  # powers of two: exact
            block_sums[j] = (v, n_sum, n_sq)
    rows = [blocks.first_block[i] for i in present]
    if host_root:
        # the k-sized rest of the step on the host in float64 numpy: a few microseconds per operation, where each
        # torch call costs 5-25 us right after passes over megabytes (code and dispatch tables evicted)
        c_n, c_r = _host_coefficients(stats, blocks, ws, rows, block_sums, damping, update_interval, check_root)
    else:
        table = torch.tensor(block_sums, dtype=state_sum.dtype, device=state_sum.device)  # not the global default
        v, n_sum, n_sq = table.view(-1, 3).unbind(-1)
        if len(rows) < blocks.num_blocks:  # some tensors had no gradient: their blocks' sums are 0
            index = torch.tensor(rows, device=state_sum.device)
            v, n_sum, n_sq = (torch.zeros_like(stats["w"]).index_copy_(0, index, x) for x in (v, n_sum, n_sq))
        _accumulate(stats, n_sum, n_sq)
        lam, B = preconditioner(
            stats,
            blocks.partition,
            damping=damping,
            update_interval=update_interval,
            correlation=correlation,
            check_root=check_root,
        )
        c_n, c_r = (x.double().numpy()[rows].tolist() for x in (lam, B @ v))
    c_n = [c * -lr[i] for c, i in zip(c_n, present)]
    c_r = [c * -lr[i] for c, i in zip(c_r, present)]
    decay = [1.0 - lr[i] * weight_decay[i] for i in present]
    if any(d != 1.0 for d in decay):
        torch._foreach_mul_([params[i] for i in present], decay)
    # p += c_n n + c_r r: the torch forms last tensor first (its n and r may still be cached; in the ratio form n
    # and r are s n and sqrt(s) r), then the host form (measured: the host form first was no faster at 2.1M)
    for j in reversed(big):
        s, p = scales[j], params[present[j]]
        if s:
            _cpu_kernels.add_two(p.view(-1), ns[j], rs[j], c_n[j] / s, c_r[j] / math.sqrt(s))
        else:
            _cpu_kernels.add_two(p, n_shaped[j], r_shaped[j], c_n[j], c_r[j])
    with np.errstate(all="ignore"):
        for j in on_host:
            _host_update(_host_array(params[present[j]].view(-1)), host[j][1], host[j][2], c_n[j], c_r[j])
    # numpy's writes and torch's fused SGD kernel leave the parameters' version counters as they were: bump them as
    # torch's in-place ops do (autograd then refuses a graph that saved the old values), in one call
    increment_version(stepped)
    ws.h_version = state_sum._version  # the bounds in ws.h_max hold until h changes elsewhere


def _chunked_ratio_pass(ws: Workspace, i: int, g, h, n, r, s: float, eps: float, size: int) -> list[float]:
    r"""The ratio form's first pass over tensor ``i`` (:func:`_cpu_kernels.adagrad_ratio` and the three reductions) in
    chunks of ``size`` entries, each chunk's passes one after the other while its buffers are in the level-2 caches
    (:func:`_cpu_kernels.ratio_chunk_numel`); returns ``[g . r', sum n', n' . n']``, the chunks' sums added in
    float64, in order. Only for tensors without entries where ``h == 0`` (there is nothing to mask)."""
    views = ws.chunk_views.get((i, size))
    if views is None or views[0] is not h:
        spans = [(lo, min(lo + size, g.numel())) for lo in range(0, g.numel(), size)]
        views = ws.chunk_views[(i, size)] = (h, spans, [tuple(x[a:b] for x in (h, n, r)) for a, b in spans])
    _, spans, parts = views
    one = ws.one
    assert one is not None  # built with the workspace
    out = ws.chunk_sums(len(spans))  # allocated before the step changed anything (_tensor_blocks_cpu_step)
    for c, ((a, b), (hc, nc, rc)) in enumerate(zip(spans, parts)):
        gc = g[a:b]
        _cpu_kernels.adagrad_ratio(gc, hc, nc, rc, one, s, eps)
        torch.dot(gc, rc, out=out[c, 0])
        torch.sum(nc, 0, out=out[c, 1])
        torch.dot(nc, nc, out=out[c, 2])
    return [sum(column) for column in zip(*out[: len(spans)].tolist())]  # in chunk order: deterministic


def _host_array(t: Tensor) -> np.ndarray:
    """A numpy array on the memory of the CPU tensor ``t`` (no copy)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _host_tensor_pass(g, h, n, r, eps: float) -> tuple[float, float, float, bool]:
    """The host form's first pass over one tensor (numpy arrays on the tensors' memory): ``h += g^2``,
    ``z = sqrt(h) + eps``, ``n = g / z`` and ``r = z^{-1/2}`` (both 0 where ``h == 0``: ``n = r^2 g``, and an entry
    whose ``g^2`` underflowed to 0 counts as one without gradient); returns the block sums ``(g . r, sum n, n . n)``
    and whether some entry of ``h`` is 0."""
    np.multiply(g, g, out=n)
    h += n
    np.sqrt(h, out=r)
    r += eps
    np.divide(g, r, out=n)
    np.sqrt(r, out=r)
    np.divide(1.0, r, out=r)
    zero = h == 0
    some_zero = bool(zero.any())
    if some_zero:
        r[zero] = 0.0
        n[zero] = 0.0
    return float(np.dot(g, r)), float(n.sum()), float(np.dot(n, n)), some_zero


def _host_update(p, n, r, c_n: float, c_r: float) -> None:
    """The host form's update, ``p += c_n n + c_r r`` (``n`` and ``r`` are overwritten)."""
    n *= c_n
    r *= c_r
    n += r
    p += n


def _host_coefficients(
    stats,
    blocks: ParamBlocks,
    ws: Workspace,
    rows: list[int],
    block_sums: list,
    damping: float,
    update_interval: int,
    check_root: bool = False,
) -> tuple[list[float], list[float]]:
    """The statistics' update, the root (when due) and the per-tensor factors ``lam_R`` and ``B_R P^T v`` of ``n``
    and ``r``, from the block sums ``(v, P^T n, P^T n^2)`` (one tuple per tensor with a gradient, its block in
    ``rows``), in float64 on the host: Python floats up to :data:`PYTHON_ROOT_MAX_BLOCKS` blocks, numpy above.
    ``U`` and ``w`` are updated in place; the root is written into the workspace's own tensors
    (:meth:`Workspace.root_buffers`), which become the state's ``root_lam`` and ``root_B``. With ``check_root`` a
    root that is due raises :class:`_SingularRoot` before it is stored where :math:`F` is singular by its rank
    (:func:`_check_rank`) or the root is not finite (``U`` and ``w`` are updated by then: the caller restores them)."""
    k = blocks.num_blocks
    full = [(0.0, 0.0, 0.0)] * k  # blocks of tensors without a gradient: their sums are 0
    for row, sums in zip(rows, block_sums):
        full[row] = sums
    v, n_sum, n_sq = (list(x) for x in zip(*full))
    U, w = ws.state_arrays(stats["U"], stats["w"])  # the state's memory: updated in place
    small = k <= PYTHON_ROOT_MAX_BLOCKS
    # float64 sums, rounded once into the state's dtype; at a few blocks on Python floats (np.outer costs ~60 us
    # right after the passes over the parameters), the same sums and roundings
    if small:
        U[...] = [[u + a * b for u, b in zip(row, n_sum)] for row, a in zip(U.tolist(), n_sum)]
        w[...] = [x + y for x, y in zip(w.tolist(), n_sq)]
    else:
        U += np.outer(n_sum, n_sum)
        w += n_sq
    due = stats["root_lam"] is None or (stats["step"] - stats["root_step"]) >= update_interval
    if due:
        if check_root:
            _check_rank(stats["step"], w, damping)
        root: tuple[Any, Any] | None = None
        if small:
            consts = _root_constants(blocks.partition, torch.float64, torch.device("cpu"), lists=True)
            root = _inverse_root_python(U.tolist(), w.tolist(), consts, damping)
        if root is None:
            consts = _root_constants(blocks.partition, torch.float64, torch.device("cpu"), numpy=True)
            try:
                root = _inverse_root_numpy(U.astype(np.float64), w.astype(np.float64), consts, damping)
            except np.linalg.LinAlgError:  # non-finite statistics (check_finite=False): torch's eigh gives NaN
                lam_t, B_t = _normalised_inverse_root_torch(stats["U"], stats["w"], blocks.partition, damping)
                root = (lam_t.double().numpy(), B_t.double().numpy())
        lam, B = root
        if check_root and not _root_is_finite(lam, B, stats["w"].dtype):
            raise _SingularRoot(_non_finite_root_message(damping))
        stored = ws.root_buffers(k, stats["w"].dtype)
        stored[2][...] = lam  # stored in the state's dtype, as the root always was
        stored[3][...] = B
        stats.update(root_lam=stored[0], root_B=stored[1], root_step=stats["step"])
        ws.host_root = None  # the stored root (in the state's dtype) as floats, made on the first step that reuses it
    else:
        lam_t, B_t = stats["root_lam"], stats["root_B"]
        key = ws.root_key(lam_t, B_t)
        cached = ws.host_root
        if cached is None or any(a is not b for a, b in zip(cached[0][:2], key[:2])) or cached[0][2:] != key[2:]:
            lam, B = lam_t.double().numpy(), B_t.double().numpy()
            cached = ws.host_root = (key, *((lam.tolist(), B.tolist()) if small else (lam, B)))
        lam, B = cached[1], cached[2]
    if isinstance(lam, list):
        return [lam[r] for r in rows], [sum(map(operator.mul, B[r], v)) for r in rows]
    return lam[rows].tolist(), (B @ np.array(v))[rows].tolist()


def _prepare_host_root(ws: Workspace, blocks: ParamBlocks, stats: dict[str, Any]) -> None:
    """What :func:`_host_coefficients` allocates, made before the step changes anything (once per workspace): the
    tensors the root is stored in (:meth:`Workspace.root_buffers`) and the partition's constants
    (:func:`_root_constants`); and the numpy arrays on the statistics ``U`` and ``w`` (:meth:`Workspace.state_arrays`),
    checked to fit the blocks where they are new or their memory moved (raises ``ValueError`` before any change)."""
    k, dtype = blocks.num_blocks, stats["w"].dtype
    ws.state_arrays(stats["U"], stats["w"], k)
    store = ws.root_store
    if store is None or store[0].shape[0] != k or store[0].dtype != dtype:
        ws.root_buffers(k, dtype)
        cpu = torch.device("cpu")
        if k <= PYTHON_ROOT_MAX_BLOCKS:
            _root_constants(blocks.partition, torch.float64, cpu, lists=True)
        _root_constants(blocks.partition, torch.float64, cpu, numpy=True)


def _ratio_scales(ws: Workspace, present, hs, candidates, squares, eps: float, step: int) -> list[float]:
    """Per tensor with a gradient, the scale ``s`` of the ratio form, or ``0.0`` (the host or the chain form);
    updates the bounds of ``h`` (:attr:`Workspace.h_max`: ``h_max + sum g^2``, rounded up) of the ``candidates``
    (positions in ``present``). A bound grown too loose for a scale is rebuilt from ``h`` (one pass); a tensor that
    still has no safe scale takes the chain form for :data:`RATIO_RETRY_STEPS` steps before it is tried again.

    Where ``h`` changed outside this path since the bounds were taken (its version counter moved: another path, a
    ``set_()`` or ``resize_()`` of ``state[p]["sum"]``, a state rebuilt from replaced entries), a kept bound is
    checked against ``h`` (the one pass that bounding afresh takes) and kept where it still holds, so that a step
    whose ``h`` holds the same values picks the scale of the run it continues (the scale changes the rounding)."""
    scales = [0.0] * len(present)
    kept: dict[int, float] | None = None
    if ws.h_version != ws.h._version:  # h changed outside this path: only bounds that still hold, checked below
        kept, ws.h_max = ws.h_max, {}
    if not _cpu_kernels.available():
        return scales
    for j in candidates:
        i, h, sq = present[j], hs[j], squares[j]
        old = (ws.h_max if kept is None else kept).get(i)
        largest = 0.0
        if old is None or kept is not None:  # a bound afresh, or a kept one checked: one pass over h either way
            largest = float(h.max())
            if old is not None and not largest <= old:  # no longer a bound (or nan): afresh
                old = None
        bound = (largest if old is None else old) + sq * _BOUND_SLACK
        bound *= _BOUND_SLACK
        if math.isfinite(bound):
            ws.h_max[i] = bound
        else:
            ws.h_max.pop(i, None)
        if ws.chain_until.get(i, 0) > step:
            continue
        g_max = math.sqrt(sq) * _BOUND_SLACK  # the largest |g| is at most the norm (see above)
        s = _cpu_kernels.ratio_scale(bound, g_max, eps, h.numel(), h.dtype)
        if not s and old is not None and math.isfinite(sq):  # perhaps only the kept bound is too loose
            bound = ws.h_max[i] = (float(h.max()) + sq * _BOUND_SLACK) * _BOUND_SLACK
            s = _cpu_kernels.ratio_scale(bound, g_max, eps, h.numel(), h.dtype)
        if not s:  # no safe scale: the chain form, and no pass over h to look for one, for a while
            ws.chain_until[i] = step + RATIO_RETRY_STEPS + 1
        scales[j] = s
    return scales


def _repair_ratio_form(ws: Workspace, i: int, g: Tensor, h: Tensor, r: Tensor, s: float, eps: float, step: int):
    """Recompute the ratio form's :math:`\\sqrt{s} r` of tensor ``i`` from ``h`` (a gradient entry was exactly 0,
    so the quotient was ``nan`` there); that tensor takes the chain form for the next :data:`RATIO_RETRY_STEPS`
    steps. Returns the block sum ``g . r`` (still scaled by :math:`\\sqrt{s}`)."""
    _cpu_kernels.rescale_from_h(h, r, s, eps)
    ws.mask_zeros(i, h, r)
    ws.chain_until[i] = step + RATIO_RETRY_STEPS + 1  # the next RATIO_RETRY_STEPS steps
    return float(torch.dot(g, r))


def _fused_block_mean_adagrad(
    params,
    grads,
    state_sum,
    stats,
    blocks,
    ws,
    *,
    lr,
    weight_decay,
    maximize,
    eps,
    damping,
    update_interval,
    correlation,
    mask,
    check_finite,
    check_root,
) -> None:
    del ws, mask  # the compiled passes need no buffers and always mask
    present = [i for i, g in enumerate(grads) if g is not None and blocks.segments[i] is not None]
    gs = [grads[i].neg() if maximize[i] else grads[i] for i in present]
    hs = [blocks.segments[i].as_rows(state_sum[blocks.bounds[i] : blocks.bounds[i + 1]]) for i in present]
    if present:
        sums, finite = _fused.compiled("block_sums")(gs, hs, eps)
    else:  # only gradients without entries (zero-width layers): nothing to sum or move, and the step counts as eagerly
        sums, finite = state_sum.new_zeros(0, 3), True
    if check_finite and not bool(finite):  # the step's one host synchronisation
        raise ValueError(_non_finite_message("BlockMeanAdagrad", params))
    first = blocks.first_block
    if len(present) < len(blocks.segments):  # some parameters had no gradient: their blocks' sums are 0
        full = sums.new_zeros(blocks.num_blocks, 3)
        row = 0
        for i in present:
            full[first[i] : first[i + 1]] = sums[row : row + first[i + 1] - first[i]]
            row += first[i + 1] - first[i]
        sums = full
    v_sums, n_sums, n_sq = sums.unbind(-1)
    stats["step"] += 1  # the first change of the state (the first pass wrote nothing)
    _accumulate(stats, n_sums, n_sq)
    lam, B = preconditioner(
        stats,
        blocks.partition,
        damping=damping,
        update_interval=update_interval,
        correlation=correlation,
        check_root=check_root,
    )
    # theta <- c2 theta + c0 n + c1 r per block: c0 = -lr lam_R, c1 = -lr (B_R P^T v), c2 = 1 - lr wd
    coef = torch.stack([lam, B @ v_sums, torch.ones_like(v_sums)], dim=-1)
    rates = {lr[i] for i in present}
    if len(rates) == 1 and not any(weight_decay[i] for i in present):  # one learning rate: one scaling
        coef[:, :2] *= -rates.pop()
    else:
        for i in present:  # the blocks of different tensors do not overlap: scale each in place
            c = coef[first[i] : first[i + 1]]
            c[:, :2] *= -lr[i]
            if weight_decay[i]:
                c[:, 2] = 1.0 - lr[i] * weight_decay[i]
    coefs = [coef[first[i] : first[i + 1]] for i in present]  # views of one table, in either case
    if present:
        _fused.compiled("apply_update")(gs, hs, [params[i] for i in present], coefs, eps)


def _scattered_block_mean_adagrad(
    params,
    grads,
    state_sum,
    stats,
    blocks,
    ws,
    *,
    lr,
    weight_decay,
    maximize,
    eps,
    damping,
    update_interval,
    correlation,
    mask,
    check_finite,
    check_root,
) -> None:
    del check_finite  # checked by the caller
    dtype, partition = state_sum.dtype, blocks.partition
    if ws.grad is None:  # allocated before anything changes
        ws.grad = torch.empty_like(state_sum)
    g = ws.grad
    stats["step"] += 1
    for i, grad in enumerate(grads):
        chunk = g[blocks.bounds[i] : blocks.bounds[i + 1]]
        if grad is None:
            chunk.zero_()
        else:
            torch.mul(grad.reshape(-1).to(dtype), -1.0 if maximize[i] else 1.0, out=chunk)
    h = state_sum
    h.addcmul_(g, g)
    n, r = ws.nr.unbind(0)
    cpu = h.device.type == "cpu"
    z_inv_sqrt(h, eps, mask=mask and not cpu, out=r, scratch=ws.scratch, divide=(g, n))  # r, and n = g / z
    if cpu:
        ws.mask_zeros(-1, h, r, n)  # n = 0 where h = 0, as r (before the block sums)
    n_sums = partition.block_sum(n)
    _accumulate(stats, n_sums, partition.block_sum(n.square_()))
    lam, B = preconditioner(
        stats,
        partition,
        damping=damping,
        update_interval=update_interval,
        correlation=correlation,
        check_root=check_root,
    )
    if ws.root is None or ws.root[0] != stats["root_step"] or ws.root[1].lam is not lam:
        ws.root = (stats["root_step"], BlockMeanLinearOperator(lam, B, partition))
    u = (ws.root[1] @ g.mul_(r)).mul_(r)  # z^{-1/2} R z^{-1/2} g: the operator's own product
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        p = params[i]
        step = u[blocks.bounds[i] : blocks.bounds[i + 1]].view(p.shape)
        decay = 1.0 - lr[i] * weight_decay[i]
        if p.dtype != step.dtype:  # narrower than the state (16-bit): the step in its dtype, rounded into p once
            p.copy_(step.mul(-lr[i]).add_(p, alpha=decay))
            continue
        if weight_decay[i]:
            p.mul_(decay)
        p.add_(step, alpha=-lr[i])
