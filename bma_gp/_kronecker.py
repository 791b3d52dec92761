r"""Closed forms for a Kronecker product with a block mean factor plus a per-task or task-coupling noise.

``MultitaskKernel(BlockMeanKernel(...))`` (or around a ``GroupKernel``) under a ``MultitaskGaussianLikelihood``
gives :math:`A = M \otimes K + I_n \otimes D` with :math:`M` a symmetric :class:`~bma_gp.BlockMeanLinearOperator`
(``n x n``, ``k`` blocks), :math:`K` the ``t x t`` task matrix and :math:`D` the ``t x t`` noise: a positive diagonal
under ``rank=0`` (the task noises, plus the global noise; linear_operator's ``KroneckerProductAddedDiagLinearOperator``)
or a full positive semi-definite matrix under ``rank >= 1`` (``F F^T``, plus the global noise;
linear_operator's ``SumKroneckerLinearOperator``). linear_operator solves the first through the eigendecomposition of
every factor, which for :math:`M` is an explicit ``n x n`` eigenvector matrix (``n^2`` memory, ``n^3``-like time),
and runs CG and Lanczos silently when the diagonal is not Kronecker-structured; it factorises the second densely up
to ``max_cholesky_size`` and beyond it whitens it by an inverse root of :math:`D`, taken by Lanczos where
``t > max_cholesky_size`` (an iterative estimate, and none at all for a singular :math:`D`). Nothing here needs
:math:`D` itself to be invertible: only the small matrices below must be positive definite.

By :math:`M`'s eigenstructure the matrix splits without any eigendecomposition:

* within block :math:`i` (size :math:`s_i`) the :math:`s_i - 1` directions orthogonal to the block's indicator have
  eigenvalue :math:`\lambda_i` under :math:`M`, so :math:`A` acts on them, tensored with the tasks, as
  :math:`G_i = \lambda_i K + D` (``t x t``);
* on the span of the normalised indicators :math:`U = P S^{-1/2}` :math:`M` acts as the core
  :math:`C = \operatorname{diag}(\lambda) + S^{1/2} B S^{1/2}`, so :math:`A` acts there as
  :math:`H = C \otimes K + I_k \otimes D` (``kt x kt``; block diagonal with blocks :math:`c_i K + D` where :math:`B`,
  so :math:`C`, is diagonal, as a ``GroupKernel`` gives it).

A solve splits the right-hand side into block sums and within-block deviations (``O(n t c)``), applies
:math:`G_{c_m}^{-1}` to each point's deviation and :math:`H^{-1}` to the scaled block sums, and adds them back;
:math:`\log|A| = \sum_i (s_i - 1) \log|G_i| + \log|H|`. Everything is a Cholesky factorisation of small matrices, in
the block mean operator's core dtype (``float64`` for ``float32`` operators), and plain autograd carries the
gradients to :math:`\lambda`, :math:`B`, :math:`K` and :math:`D` (no ``eigh`` backward, which is undefined at
repeated eigenvalues such as :math:`K = I`). Cost ``O(n t (t + c) + k t^3 + (k t)^3)``, ``O(n t (t + c))`` memory;
the ``(k t)^3`` term is ``k t^3`` for a diagonal :math:`B`.

The same factors give square roots (:meth:`KroneckerBlockMean.root_matmul`, :class:`KroneckerRoot`): with
:math:`\Pi` the centring within blocks and :math:`\mathcal L` the point-wise :math:`L_{G_i}`,
:math:`R = \mathcal L (\Pi \otimes I_t) + (U \otimes I_t) L_H (U \otimes I_t)^\top` has :math:`R R^\top = A`, and
with :math:`L^{-\top}` in place of both factors :math:`R R^\top = A^{-1}`; ``n t x n t``, applied by products
(``O(n t (t + c) + (k t)^2 c)``), never formed: draws without linear_operator's eigenvectors. Prediction
(``fast_pred_var`` included) reads the small factors themselves (:mod:`bma_gp.kernels.kronecker_prediction_strategy`).

An ``LCMKernel`` over such kernels gives a sum :math:`\sum_q M_q \otimes K_q + I_n \otimes D`. Where every
:math:`M_q` has the same partition (equal labels) the within-block deviations of block :math:`i` are eigenvectors of
every :math:`M_q` (eigenvalue :math:`\lambda_{q,i}`) and the normalised indicators span the same space for all of
them, so the split holds term by term: :math:`G_i = \sum_q \lambda_{q,i} K_q + D` and
:math:`H = \sum_q C_q \otimes K_q + I_k \otimes D` (block diagonal where every :math:`B_q` is diagonal), and every
formula above is unchanged (:class:`KroneckerBlockMean` holds the list of terms; one ``MultitaskKernel`` is the case
of one term). Different partitions share no such basis and keep linear_operator's path, announced.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from linear_operator.operators import (
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    RootLinearOperator,
    SumKroneckerLinearOperator,
)
from linear_operator.operators.diag_linear_operator import ConstantDiagLinearOperator
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import tracks_derivatives
from bma_gp._by_products import ByProducts
from bma_gp._errors import NotPositiveDefiniteError
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator

__all__ = [
    "KroneckerBlockMean",
    "KroneckerRoot",
    "KroneckerRootProduct",
    "announcing",
    "kronecker_block_mean",
    "kronecker_sum_block_mean",
    "kronecker_terms_block_mean",
    "no_closed_form_reason",
    "no_closed_form_sum_reason",
    "no_closed_form_terms_reason",
]

# set while a warned fallback runs linear_operator's path, so its inner Cholesky does not warn a second time
_ANNOUNCED: contextvars.ContextVar[bool] = contextvars.ContextVar("bma_gp_kronecker_announced", default=False)


@contextlib.contextmanager
def announcing() -> Iterator[bool]:
    """Mark the fallback that runs inside as announced; yields whether an outer call announced it already."""
    outer = _ANNOUNCED.get()
    token = _ANNOUNCED.set(True)
    try:
        yield outer
    finally:
        _ANNOUNCED.reset(token)


def announced() -> bool:
    return _ANNOUNCED.get()


def _diag_values(op: DiagLinearOperator, size: int) -> Tensor:
    """The diagonal of ``op`` as a ``(*batch, size)`` tensor (a ``ConstantDiagLinearOperator`` holds one value)."""
    values = op._diag  # (ConstantDiagLinearOperator keeps its one value there too, as diag_values)
    return values.expand(*values.shape[:-1], size) if values.shape[-1] != size else values


def _equal_rows(values: Tensor) -> Tensor | None:
    """The first row of ``values`` (``(*batch, n, t)``) if every row equals it, by value; ``None`` otherwise or where
    derivatives are tracked (the entries' gradients differ from point to point: no per-task closed form gives them)."""
    if tracks_derivatives(values):
        return None
    first = values[..., :1, :]
    return first.squeeze(-2) if bool((values == first).all()) else None


def _task_noise(diag: LinearOperator, n: int, t: int, data_first: bool) -> Tensor | None:
    """``D`` (``(*batch, t)``) with ``diag = I_n (x) D`` (``D (x) I_n`` where the task factor comes first), or ``None``
    where the diagonal is not constant over the points within a task (a per-point noise)."""
    if isinstance(diag, ConstantDiagLinearOperator):  # a global noise, add_diagonal(c), add_jitter
        return diag.diag_values.expand(*diag.diag_values.shape[:-1], t)
    if isinstance(diag, KroneckerProductDiagLinearOperator) and len(diag.linear_ops) == 2:
        # MultitaskGaussianLikelihood(rank=0): Kron(ConstantDiag(1, n), Diag(task noises [+ global noise]))
        data, task = diag.linear_ops if data_first else diag.linear_ops[::-1]
        if data.shape[-1] != n or task.shape[-1] != t:
            return None
        task_values = _diag_values(task, t)
        if isinstance(data, ConstantDiagLinearOperator):
            return data.diag_values * task_values
        if isinstance(data, DiagLinearOperator):
            point = _equal_rows(_diag_values(data, n).unsqueeze(-1))
            return None if point is None else point * task_values
        return None
    if type(diag) is DiagLinearOperator:  # by value: only without derivatives (_equal_rows)
        values = diag._diag
        if values.shape[-1] != n * t:
            return None
        shaped = values.unflatten(-1, (n, t)) if data_first else values.unflatten(-1, (t, n)).mT
        return _equal_rows(shaped)
    return None


@dataclass
class KroneckerBlockMean:
    r""":math:`\sum_q M_q \otimes K_q + I_n \otimes D` (``data_first``; :math:`\sum_q K_q \otimes M_q + D \otimes I_n`
    otherwise), with the closed-form solve and log-determinant of the module docstring. Every :math:`M_q` is a
    symmetric block mean operator over the same partition (equal labels); one term is ``MultitaskKernel``'s
    :math:`M \otimes K + I_n \otimes D`, several an ``LCMKernel``'s. The split is the same: block :math:`i`'s
    deviations see :math:`G_i = \sum_q \lambda_{q,i} K_q + D` and the block means
    :math:`H = \sum_q C_q \otimes K_q + I_k \otimes D`."""

    Ms: tuple[BlockMeanLinearOperator, ...]
    Ks: tuple[Tensor, ...]  # each (*batch, t, t), symmetrised, in the working dtype
    D: Tensor  # (*batch, t, t), the noise (diagonal under rank=0), symmetrised, in the working dtype
    data_first: bool
    batch_shape: torch.Size

    @property
    def t(self) -> int:
        return self.D.shape[-1]

    @property
    def partition(self):
        """The partition every :math:`M_q` shares."""
        return self.Ms[0].partition

    @property
    def n(self) -> int:
        return self.Ms[0].shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype: the block mean operators' core dtype (``float64`` for ``float32`` operators)."""
        return self.D.dtype

    # ------------------------------------------------------------------ the small factorisations
    def _cholesky(self, A: Tensor, what: str) -> Tensor:
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            raise NotPositiveDefiniteError(
                f"the closed form of this Kronecker sum with block mean factors (sum_q M_q (x) K_q + I (x) D) needs "
                f"{what} to be positive definite, and its Cholesky factorisation failed: a block mean factor M_q or "
                "a task matrix K_q is not positive semi-definite, or the noise D is not positive definite on what "
                "the products leave uncovered (a MultitaskGaussianLikelihood(rank >= 1) without its global noise has "
                "a singular D; with a block offset lam_i = 0, as a GroupKernel's, the whole matrix is then singular)."
            )
        return L

    def diagonal_core(self) -> bool:
        """Whether every :math:`M_q` has a diagonal ``B`` (a ``GroupKernel``'s): then :math:`H` is block diagonal."""
        return all(M._diagonal_core() for M in self.Ms)

    def signal(self, full: bool) -> tuple[Tensor, Tensor]:
        r"""``(P, X)``: the products' part of the split, :math:`P_i = \sum_q \lambda_{q,i} K_q` (``(*batch, k, t, t)``)
        and :math:`X = \sum_q C_q \otimes K_q` (``(*batch, k t, k t)``) where ``full``, else its ``k`` diagonal blocks
        :math:`\sum_q c_{q,i} K_q` (``(*batch, k, t, t)``, for diagonal cores only)."""
        P, X = signal_parts(self.Ms, self.Ks, full)
        return P, X

    def _matrices(self) -> tuple[Tensor, Tensor, bool]:
        """``(G, H, diagonal)``: the per-block ``G_i = sum_q lam_{q,i} K_q + D`` (``(*batch, k, t, t)``) and the core
        ``H``, ``(*batch, k t, k t)`` or, where every ``B`` is diagonal (``diagonal``), its ``k`` diagonal blocks
        ``(*batch, k, t, t)``."""
        D, t = self.D, self.t
        k = self.partition.num_blocks
        diagonal = self.diagonal_core()
        if diagonal:
            for M in self.Ms:
                if M._validating():
                    M._check_finite()
        else:
            limit = settings.max_capacitance_size.value()
            if k * t > limit:
                raise ValueError(
                    f"the closed form of this Kronecker sum with block mean factors factorises the (k t) x (k t) "
                    f"core sum_q C_q (x) K_q + I (x) D, k = {k} blocks times t = {t} tasks = {k * t}, more than "
                    f"bma_gp.settings.max_capacitance_size = {limit}. Raise the limit with "
                    f"`with bma_gp.settings.max_capacitance_size({k * t}):` if the O({k * t}^3) factorisation fits "
                    "your machine, or use fewer blocks (a GroupKernel's diagonal B needs only k t x t factorisations)."
                )
        P, X = self.signal(not diagonal)
        noise = D.unsqueeze(-3)  # (*batch, 1, t, t)
        if diagonal:
            H = X + noise
        else:
            eye = torch.eye(k, dtype=X.dtype, device=X.device)
            H = X + (eye[:, None, :, None] * D[..., None, :, None, :]).reshape(*D.shape[:-2], k * t, k * t)
        return P + noise, H, diagonal

    def factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(LG, LH, LH_or_None)``: the per-block Cholesky factors ``LG`` of ``G_i = sum_q lam_{q,i} K_q + D``
        (``(*batch, k, t, t)``) and ``LH`` of the core ``H``, ``(*batch, k t, k t)`` or, where every ``B`` is
        diagonal, ``(*batch, k, t, t)`` (then the third entry is ``None``)."""
        G, H, diagonal = self._matrices()
        core = "the (k t) x (k t) core sum_q C_q (x) K_q + I (x) D"
        LH = self._cholesky(H, "sum_q c_{q,i} K_q + D for every block" if diagonal else core)
        LG = self._cholesky(G, "sum_q lam_{q,i} K_q + D for every block")
        return LG, LH, None if diagonal else LH

    def _inverse_sqrt(self, A: Tensor, what: str) -> Tensor:
        """The symmetric :math:`A^{-1/2}` of the positive definite matrices ``A`` (``(*batch, m, m)``), by ``eigh``."""
        e, V = torch.linalg.eigh(A)
        if bool((e <= 0).any()):
            self._cholesky(A, what)  # its error names what must be positive definite
            raise NotPositiveDefiniteError(
                f"the closed form of this Kronecker sum with block mean factors needs {what} to be positive definite "
                "for its inverse square root; an eigenvalue is not positive."
            )
        return (V * e.rsqrt().unsqueeze(-2)) @ V.mT

    def inverse_sqrt_matmul(self, rhs: Tensor) -> Tensor:
        r""":math:`A^{-1/2}` ``rhs`` with the symmetric inverse square root (``rhs`` of shape ``(*batch, n t, c)``, in
        the core dtype): the split of the module docstring is orthogonal and each part invariant under :math:`A`, so
        :math:`A^{-1/2} = \mathcal G^{-1/2} (\Pi \otimes I_t) + (U \otimes I_t) H^{-1/2} (U \otimes I_t)^\top`, with
        :math:`\mathcal G^{-1/2}` the point-wise :math:`G_i^{-1/2}` (``k`` symmetric ``t x t`` roots by ``eigh``, as is
        :math:`H^{-1/2}`). Gradients pass through ``eigh``, whose backward pass is undefined at repeated eigenvalues
        (such as :math:`K = I` with a diagonal noise). Cost ``O(n t (t + c) + (k t)^3)``, ``k t^3`` for a diagonal
        :math:`B`."""
        G, H, diagonal = self._matrices()
        G_root = self._inverse_sqrt(G, "sum_q lam_{q,i} K_q + D for every block")
        H_root = self._inverse_sqrt(H, "the core sum_q C_q (x) K_q + I (x) D")
        partition, k, t, sizes, sums, deviations = self._split(rhs)
        res = partition.expand(G_root, dim=-3) @ deviations
        root = sizes.sqrt()[:, None, None]
        z = sums / root
        w = H_root @ z if diagonal else (H_root @ z.flatten(-3, -2)).unflatten(-2, (k, t))
        res = res + partition.expand(w / root, dim=-3)
        return self._from_points(res)

    # ------------------------------------------------------------------ solve and log-determinant
    def _to_points(self, rhs: Tensor) -> Tensor:
        """``rhs`` (``(*batch, n t, c)``) as ``(*batch, n, t, c)``: points, tasks, columns."""
        n, t = self.n, self.t
        if self.data_first:
            return rhs.unflatten(-2, (n, t))
        return rhs.unflatten(-2, (t, n)).transpose(-3, -2)

    def _from_points(self, x: Tensor) -> Tensor:
        if self.data_first:
            return x.flatten(-3, -2)
        return x.transpose(-3, -2).flatten(-3, -2)

    def _split(self, rhs: Tensor):
        """``rhs`` (``(*batch, n t, c)``) as its block sums ``(*batch, k, t, c)`` and within-block deviations
        ``(*batch, n, t, c)``, in the core dtype, with the partition, ``k``, ``t`` and the block sizes."""
        partition = self.partition
        sizes = partition.sizes.to(self.dtype)
        x = self._to_points(rhs.to(self.dtype))  # (*batch, n, t, c)
        sums = partition.block_sum(x, dim=-3)  # (*batch, k, t, c)
        deviations = x - partition.expand(sums / sizes[:, None, None], dim=-3)
        return partition, partition.num_blocks, self.t, sizes, sums, deviations

    def solve(self, rhs: Tensor, factors: tuple | None = None) -> Tensor:
        """``A^{-1} rhs`` for ``rhs`` of shape ``(*batch, n t, c)``."""
        LG, LH, full = self.factors() if factors is None else factors
        partition, k, t, sizes, sums, deviations = self._split(rhs)
        # the within-block deviations: G_i^{-1} at every point of block i (the k small inverses, gathered)
        G_inv = torch.cholesky_inverse(LG)  # (*batch, k, t, t)
        res = partition.expand(G_inv, dim=-3) @ deviations
        # the block-mean directions: z = S^{-1/2} P^T x, w = H^{-1} z, back as P S^{-1/2} w
        root = sizes.sqrt()[:, None, None]
        z = sums / root
        if full is None:  # block diagonal H: one t x t solve per block
            w = torch.cholesky_solve(z, LH)
        else:
            w = torch.cholesky_solve(z.flatten(-3, -2), LH).unflatten(-2, (k, t))
        res = res + partition.expand(w / root, dim=-3)
        return self._from_points(res)

    def logdet(self, factors: tuple | None = None) -> Tensor:
        r""":math:`\log|A| = \sum_i (s_i - 1) \log|G_i| + \log|H|`, shape ``(*batch)``."""
        LG, LH, full = self.factors() if factors is None else factors
        dev_weights = (self.partition.sizes - 1).to(LG.dtype)
        log_G = 2 * LG.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (*batch, k)
        res = (dev_weights * log_G).sum(-1)
        log_H = 2 * LH.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return res + (log_H.sum(-1) if full is None else log_H)

    # ------------------------------------------------------------------ roots
    def root_matmul(self, rhs: Tensor, inverse: bool = False, transposed: bool = False) -> Tensor:
        r"""``R rhs`` (``R^T rhs`` where ``transposed``) for ``rhs`` of shape ``(*batch, n t, c)``, in the core dtype,
        with the square roots of the module docstring's split: :math:`R = \mathcal L (\Pi \otimes I_t) + (U \otimes I_t)
        L_H (U \otimes I_t)^\top` (``R R^T = A``) and, where ``inverse``, :math:`R = \mathcal L^{-\top} (\Pi \otimes
        I_t) + (U \otimes I_t) L_H^{-\top} (U \otimes I_t)^\top` (``R R^T = A^{-1}``), with :math:`\Pi` the centring
        within blocks, :math:`\mathcal L` the point-wise Cholesky factor :math:`L_{G_i}` of each point's block and
        :math:`L_H` that of the core. :math:`\mathcal L` is constant within blocks, so it commutes with the centring,
        and :math:`\Pi U = 0` removes the cross terms of :math:`R R^\top`. Cost ``O(n t (t + c) + (k t)^2 c)``."""
        LG, LH, full = self.factors()
        partition, k, t, sizes, sums, deviations = self._split(rhs)
        dtype = sizes.dtype
        if inverse:  # the k small inverses L_{G_i}^{-1}, applied point by point
            eye = torch.eye(t, dtype=dtype, device=LG.device).expand_as(LG)
            LG_inv = torch.linalg.solve_triangular(LG, eye, upper=False)
            point_factor = LG_inv if transposed else LG_inv.mT
        else:
            point_factor = LG.mT if transposed else LG
        res = partition.expand(point_factor, dim=-3) @ deviations
        root = sizes.sqrt()[:, None, None]
        z = sums / root  # (U (x) I)^T x
        if full is None:  # block diagonal H: one t x t factor per block
            w = _triangular_apply(LH, z, inverse, transposed)
        else:
            w = _triangular_apply(LH, z.flatten(-3, -2), inverse, transposed).unflatten(-2, (k, t))
        res = res + partition.expand(w / root, dim=-3)
        return self._from_points(res)

    def inverse_diagonal(self) -> Tensor:
        r""":math:`\operatorname{diag}(A^{-1})` (``(*batch, n t)``): at a point of block :math:`i` and task :math:`a`,
        :math:`(1 - 1/s_i) [G_i^{-1}]_{aa} + [H^{-1}]_{(i, a), (i, a)} / s_i`."""
        LG, LH, full = self.factors()
        partition = self.partition
        k, t = partition.num_blocks, self.t
        sizes = partition.sizes.to(LG.dtype)[:, None]
        G_diag = torch.cholesky_inverse(LG).diagonal(dim1=-2, dim2=-1)  # (*batch, k, t)
        H_diag = torch.cholesky_inverse(LH).diagonal(dim1=-2, dim2=-1)
        if full is not None:
            H_diag = H_diag.unflatten(-1, (k, t))
        per_point = partition.expand((1 - 1 / sizes) * G_diag + H_diag / sizes, dim=-2)  # (*batch, n, t)
        return per_point.flatten(-2) if self.data_first else per_point.mT.flatten(-2)


def signal_parts(Ms, Ks, full: bool) -> tuple[Tensor, Tensor]:
    r"""``(P, X)`` for the products :math:`\sum_q M_q \otimes K_q` over one partition (``k`` blocks, ``t`` tasks):
    :math:`P_i = \sum_q \lambda_{q,i} K_q`, ``(*batch, k, t, t)``, what they are on block :math:`i`'s within-block
    deviations, and :math:`X = \sum_q C_q \otimes K_q` on the normalised block indicators, ``(*batch, k t, k t)``
    (block index first) where ``full``, else the ``k`` diagonal blocks :math:`\sum_q c_{q,i} K_q` (every ``B``
    diagonal). Plain autograd reaches every :math:`\lambda_q`, :math:`B_q` and :math:`K_q`."""
    P: Tensor | None = None
    X: Tensor | None = None
    for M, K in zip(Ms, Ks):
        if full:
            lam, C = M.core()
            k, t = C.shape[-1], K.shape[-1]
            term = (C[..., :, None, :, None] * K[..., None, :, None, :]).reshape(
                *torch.broadcast_shapes(C.shape[:-2], K.shape[:-2]), k * t, k * t
            )
        else:
            lam, _, c = M._diagonal_parts()
            term = c[..., :, None, None] * K.unsqueeze(-3)
        dev = lam[..., :, None, None] * K.unsqueeze(-3)
        P = dev if P is None else P + dev
        X = term if X is None else X + term
    assert P is not None and X is not None
    return P, X


def _triangular_apply(L: Tensor, z: Tensor, inverse: bool, transposed: bool) -> Tensor:
    """``L z``, ``L^T z``, ``L^{-T} z`` or ``L^{-1} z`` (``inverse``, ``transposed``) for a lower triangular ``L``."""
    if not inverse:
        return (L.mT if transposed else L) @ z
    if transposed:
        return torch.linalg.solve_triangular(L, z, upper=False)
    return torch.linalg.solve_triangular(L.mT, z, upper=True)


class KroneckerRoot(ByProducts):
    r"""The square root of :meth:`KroneckerBlockMean.root_matmul` of a Kronecker sum with a block mean factor
    (``parent``, whose closed form it reads at each product: nothing with a graph is kept), :math:`R R^\top = A`, or
    :math:`A^{-1}` where ``inverse``; ``transposed``: :math:`R^\top`. ``n t x n t``, never formed (``to_dense`` is a
    product with the identity)."""

    def __init__(self, parent: LinearOperator, inverse: bool = False, transposed: bool = False):
        super().__init__(parent=parent, inverse=inverse, transposed=transposed)
        self.parent, self.inverse, self.transposed = parent, inverse, transposed

    def closed(self) -> KroneckerBlockMean:
        closed = self.parent._closed()
        if closed is None:  # (the parent had one when it made this root: its structure does not change)
            raise RuntimeError(f"{type(self.parent).__name__} lost its closed form")
        return closed

    def _size(self) -> torch.Size:
        return self.parent.shape

    def _transpose_nonbatch(self) -> KroneckerRoot:
        return KroneckerRoot(self.parent, inverse=self.inverse, transposed=not self.transposed)

    def _expand_batch(self, batch_shape) -> KroneckerRoot:
        return KroneckerRoot(self.parent._expand_batch(batch_shape), inverse=self.inverse, transposed=self.transposed)

    def to_dense(self) -> Tensor:
        """``R`` as a tensor, by products with the identity a block of columns at a time (GPyTorch's ``fast_pred_var``
        cache forms it): the products' temporaries are those of a block, not of all ``(n t)^2`` entries."""
        size = self.shape[-1]
        step = max(1, min(size, (1 << 21) // size))
        starts = range(0, size, step)
        pieces = (self._matmul(self._unit_columns(s, min(step, size - s))) for s in starts)
        if torch.is_grad_enabled():  # autograd: one concatenation, not in-place writes
            return torch.cat(list(pieces), dim=-1)
        res = torch.empty(*self.batch_shape, size, size, dtype=self.dtype, device=self.device)
        for s, piece in zip(starts, pieces):
            res[..., s : s + step] = piece
        return res

    def _unit_columns(self, start: int, width: int) -> Tensor:
        """Columns ``start .. start + width`` of the identity, batched."""
        size = self.shape[-1]
        unit = torch.zeros(size, width, dtype=self.dtype, device=self.device)
        index = torch.arange(width, device=self.device)
        unit[start + index, index] = 1
        return unit.expand(*self.batch_shape, size, width)

    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        res = self.closed().root_matmul(x, inverse=self.inverse, transposed=self.transposed)
        res = res.to(torch.promote_types(rhs.dtype, self.parent.dtype))
        return res.squeeze(-1) if vector else res


class KroneckerRootProduct(RootLinearOperator):
    r""":math:`R R^\top` for a :class:`KroneckerRoot`: its diagonal is the parent's (``A``) or the closed form of
    :math:`\operatorname{diag}(A^{-1})`, not a sum over the entries of :math:`R` (linear_operator's default forms
    ``R``)."""

    def _diagonal(self) -> Tensor:
        root = self.root
        if isinstance(root, KroneckerRoot) and not root.transposed:
            if root.inverse:
                return root.closed().inverse_diagonal().to(root.parent.dtype)
            return root.parent._diagonal()
        return super()._diagonal()


def no_closed_form_reason(op) -> str:
    """Why :func:`kronecker_block_mean` finds no closed form for ``op``, and what linear_operator does instead (for the
    fallback warning)."""
    kron, diag = op.linear_op, op.diag_tensor
    factors = kron.linear_ops if isinstance(kron, KroneckerProductLinearOperator) else (kron,)
    if len(factors) != 2 or not any(isinstance(f, BlockMeanLinearOperator) and f.symmetric for f in factors):
        why = (
            "its Kronecker product is not one symmetric BlockMeanLinearOperator times a t x t task matrix (it is "
            f"{' (x) '.join(type(f).__name__ for f in factors)})"
        )
    else:
        why = (
            "its added diagonal is not the same for every data point within a task (a per-point noise, or one "
            "whose entries carry their own gradients), so the Kronecker structure does not split it"
        )
    structured = isinstance(diag, ConstantDiagLinearOperator) or (
        isinstance(diag, KroneckerProductDiagLinearOperator)
        and len(diag.linear_ops) == len(factors)
        and all(d.shape == f.shape for d, f in zip(diag.linear_ops, factors))
    )
    if structured:
        does = (
            "linear_operator takes every factor's eigendecomposition (a dense one, or Lanczos past "
            "max_cholesky_size, for a factor without a closed-form spectrum)"
        )
    else:
        from linear_operator import settings as lo_settings

        size = op.shape[-1]
        does = (
            f"linear_operator factorises the dense {size} x {size} matrix up to gpytorch.settings.max_cholesky_size "
            f"({lo_settings.max_cholesky_size.value()}) and runs CG and Lanczos (iterative, approximate solves and "
            "log-determinant) beyond it"
        )
    return f"{why}. {does}"


def kronecker_block_mean(op) -> KroneckerBlockMean | None:
    """The closed form of a ``KroneckerProductAddedDiagLinearOperator`` ``op`` (``Kron(M, K) + diagonal``), or ``None``
    where it has none: the product is not one symmetric block mean operator times a task matrix, or the diagonal is
    not ``I_n (x) D`` (:func:`_task_noise`)."""
    if _block_mean_product(op.linear_op) is None:
        return None
    res = _closed_terms((op.linear_op, op.diag_tensor), op.batch_shape)
    return res if isinstance(res, KroneckerBlockMean) else None


def _symmetric(task, dtype: torch.dtype) -> Tensor:
    """A ``t x t`` factor (operator or tensor) as a dense symmetrised tensor in ``dtype``."""
    dense = task.to_dense() if isinstance(task, LinearOperator) else task
    return (0.5 * (dense + dense.mT)).to(dtype)


def _block_mean_product(kron) -> tuple[BlockMeanLinearOperator, LinearOperator, int] | None:
    """``(M, task factor, index of M)`` for a two-factor Kronecker product with a symmetric block mean factor."""
    if not isinstance(kron, KroneckerProductLinearOperator) or len(kron.linear_ops) != 2:
        return None
    candidates = [
        (f, kron.linear_ops[1 - i], i)
        for i, f in enumerate(kron.linear_ops)
        if isinstance(f, BlockMeanLinearOperator) and f.symmetric
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0].shape[-1])  # two: the larger one is the data factor


def _identity_scale(op, n: int) -> Tensor | None:
    """``c`` (``(*batch, 1)``) with ``op = c I_n``, or ``None``: a ``ConstantDiagLinearOperator`` (the likelihood's
    ``eye_lt``), or a ``DiagLinearOperator`` whose entries are equal by value and carry no gradients."""
    if op.shape[-1] != n:
        return None
    if isinstance(op, ConstantDiagLinearOperator):
        return op.diag_values
    if type(op) is DiagLinearOperator:
        return _equal_rows(_diag_values(op, n).unsqueeze(-1))
    return None


def kronecker_sum_block_mean(op) -> KroneckerBlockMean | None:
    """The closed form of a ``SumKroneckerLinearOperator`` ``op``: ``Kron(M, K) + Kron(c I_n, D)`` (either term first,
    the factors in either order, the data factors in the same place) with ``D`` any ``t x t`` operator
    (``MultitaskGaussianLikelihood(rank >= 1)``: ``RootLinearOperator(F)``, plus a ``ConstantDiagLinearOperator`` with
    the global noise); ``None`` otherwise."""
    if not isinstance(op, SumKroneckerLinearOperator) or len(op.linear_ops) != 2:
        return None
    res = _closed_terms(op.linear_ops, op.batch_shape)
    return res if isinstance(res, KroneckerBlockMean) else None


def kronecker_terms_block_mean(terms, batch_shape: torch.Size) -> KroneckerBlockMean | None:
    r"""The closed form of the sum of ``terms``, :math:`\sum_q M_q \otimes K_q + I_n \otimes D` (an ``LCMKernel``'s
    covariance plus a ``MultitaskGaussianLikelihood``'s noise), or ``None`` (:func:`no_closed_form_terms_reason` says
    why)."""
    res = _closed_terms(terms, batch_shape)
    return res if isinstance(res, KroneckerBlockMean) else None


def no_closed_form_terms_reason(terms) -> str:
    """Why :func:`kronecker_terms_block_mean` finds no closed form for the sum of ``terms``, and what linear_operator
    does instead."""
    res = _closed_terms(terms, torch.Size())
    why = "its terms have a closed form" if isinstance(res, KroneckerBlockMean) else res
    return (
        f"{why} (its terms are {' + '.join(type(term).__name__ for term in terms)}). linear_operator's generic sum "
        "factorises the dense matrix up to gpytorch.settings.max_cholesky_size and runs CG and Lanczos beyond it"
    )


def _closed_terms(terms, batch_shape: torch.Size) -> KroneckerBlockMean | str:
    r"""The closed form of the sum of ``terms`` or, where there is none, why not. The terms are Kronecker products
    :math:`M_q \otimes K_q` with a symmetric block mean factor :math:`M_q` over one partition (equal labels), all
    with the data factor in the same place, and the noise: diagonals that are ``I_n (x) D`` (:func:`_task_noise`)
    and Kronecker products ``c I_n (x) D`` with a ``t x t`` ``D`` (any rank); at least one of each."""
    products, rest = [], []
    for term in terms:
        product = _block_mean_product(term)
        if product is None:
            rest.append(term)
        else:
            products.append(product)
    if not products:
        return "it has no Kronecker product of a symmetric BlockMeanLinearOperator and a t x t task matrix"
    M0, task0, index = products[0]
    n, t, partition = M0.shape[-1], task0.shape[-1], M0.partition
    for M, task, i in products[1:]:
        if i != index or M.shape[-1] != n or task.shape[-1] != t or task.shape[-2] != t:
            return "its Kronecker products do not all have an n x n block mean factor and a t x t task factor in place"
        if not M.partition.same_as(partition):
            return (
                "its block mean factors partition the data differently (an LCMKernel's block mean or group kernels "
                "are in closed form only over the same blocks, equal labels)"
            )
    if not rest:
        return "it has no noise term I_n (x) D (the prior covariance of an LCMKernel alone)"
    dtype = functools.reduce(torch.promote_types, [M.core_dtype for M, _, _ in products])
    D: Tensor | None = None
    for term in rest:
        if isinstance(term, DiagLinearOperator):
            values = _task_noise(term, n, t, index == 0)
            piece = None if values is None else torch.diag_embed(values.to(dtype))
        elif isinstance(term, KroneckerProductLinearOperator) and len(term.linear_ops) == 2:
            data, task_noise = term.linear_ops[index], term.linear_ops[1 - index]
            scale = _identity_scale(data, n)
            square = task_noise.shape[-1] == t and task_noise.shape[-2] == t
            piece = None if scale is None or not square else _symmetric(task_noise, dtype) * scale.to(dtype)[..., None]
        else:
            piece = None
        if piece is None:
            return (
                f"its {type(term).__name__} term is neither a block mean Kronecker product nor a noise that is the "
                "same at every data point within a task (I_n (x) D: a per-point noise, or one whose entries carry "
                "their own gradients, does not split)"
            )
        D = piece if D is None else D + piece
    assert D is not None
    Ms = tuple(M for M, _, _ in products)
    Ks = tuple(_symmetric(task, dtype) for _, task, _ in products)
    return KroneckerBlockMean(Ms, Ks, D, index == 0, batch_shape)


def no_closed_form_sum_reason(op) -> str:
    """Why :func:`kronecker_sum_block_mean` finds no closed form for ``op`` and what linear_operator does instead."""
    return (
        "it is not Kron(M, K) + Kron(c I_n, D) with one symmetric BlockMeanLinearOperator M and a t x t noise D "
        f"(its terms are {' + '.join(type(term).__name__ for term in op.linear_ops)}). linear_operator whitens it "
        "by an inverse root of the second term's factors (by Lanczos past max_cholesky_size) and eigendecomposes the "
        "whitened first term densely"
    )
