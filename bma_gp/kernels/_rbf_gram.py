r"""The SGPR root of an RBF kernel held as its inputs: one training step of SGPR plus groupings with no ``n x m``
tensor kept.

A closed-form sum ``M = D + sum_j P_j B_j P_j^T + U U^T`` needs only these products with its root
(:class:`~bma_gp.BlockMeanSumLinearOperator`): ``U^T D^{-1} U``, ``U^T D^{-1} y`` and the block sums
``P_j^T W_j D^{-1} U``. For ``U = K A`` (``K = exp(-|x' - z'|^2 / 2)``, ``A = s L^{-T}``), :class:`_RBFGram` forms
them one row block at a time: the block of ``K`` (one ``exp`` pass), the block of ``U`` (one GEMM) and its
products (one more). Its backward pass forms the block of ``U`` again, in the eigenvectors ``Q`` of ``H = sym(dG)``
(``Y = U Q = K (A Q)``, one GEMM), and takes both of ``U``'s factors' gradients from the same ``dU``
(``P = S (2 Y diag(lam) + g)``, ``g`` the gathered gradients of the block sums in ``Q``'s coordinates):

* ``dK = P (A Q)^T + b (A dR)^T`` (one GEMM), ``dA = (K^T P) Q^T + (K^T b) dR^T`` (one GEMM);
* ``d/ds_a = y_a . (lam o y_a + g_a)`` from ``Y`` itself.

A backward pass on ``K``'s side alone (``dK = S (2 K (A H A^T) + ...)``, ``dA = A^{-T} (2 G H + ...)`` from the
outputs: one GEMM) cancels terms of size ``|k_a| |A|^2`` down to ``U``'s size, and ``|u_a| << |k_a| |A|`` when
``K_ZZ`` is ill-conditioned: with two inducing points 0.01 apart (``|L^{-T}|`` 7e7) the noise's gradient lost every
digit and the SGPR trace term's gradients had the wrong sign. The gradients of the lengthscale and the inducing
points are the difference of a ``K`` path and a ``K_ZZ`` path, each of size ``|A|``: they cancel only when both come
from the same rounded ``U``, which is why ``dA`` is summed from ``P`` rather than solved for from the outputs.

Forming ``U`` (one pass, 1 GB at ``n = 10^6``, ``m = 256`` in float32), its products (one pass) and the
gradients back through both (three passes) did the same work and kept ``U``.

The forward pass keeps ``U``'s side on purpose: ``A^T (K^T S K) A`` would be one GEMM fewer, but it multiplies
the rounding of ``K^T S K`` by ``|A|^2``, and in float32 at ``n = 10^6`` the capacitance lost its positive
determinant. The Gram matrix of the rounded ``U`` blocks stays positive semidefinite.

SGPR's trace term, ``sum_i (k_ii - |u_i|^2) / sigma_i^2``, needs ``sum_i |u_i|^2 / sigma_i^2 = tr(U^T S^{-1} U)``
with ``S = diag(sigma^2)``. When the sum's diagonal is the likelihood's noise (Gaussian and fixed-noise
likelihoods), that is the trace of the Gram matrix the marginal likelihood formed already, so the term costs no
pass at all (:class:`TraceTerm`).
"""

from __future__ import annotations

import weakref

import torch
from gpytorch.likelihoods import MultitaskGaussianLikelihood
from gpytorch.mlls import InducingPointKernelAddedLossTerm
from linear_operator.operators import (
    DenseLinearOperator,
    LinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
)
from torch import Tensor

from bma_gp import settings
from bma_gp._autograd import first_order_only, reverse_mode_only
from bma_gp._lazy_root import LazyRoot
from bma_gp._precision import core_dtype
from bma_gp.block_mean_sum_linear_operator import _CAST_ROWS, _FLUSH_TERMS, _t_matmul_wide
from bma_gp.kernels._rbf_root import _augment, _kernel_block, _scaled, input_grads, rbf_root

__all__ = ["RBFRootFactor", "LazyRootOperator", "TraceTerm"]


def _add_t_matmul(total: Tensor, a: Tensor, b: Tensor) -> None:
    """``total += a^T b``, the product in ``a``'s precision and added in ``total``'s (the working precision)."""
    if a.dtype == total.dtype:
        total.addmm_(a.T, b)
    else:
        total.add_((a.T @ b).to(total.dtype))


@reverse_mode_only("ChunkedInducingPointKernel (the Gram matrix of its root)")
class _RBFGram(torch.autograd.Function):
    """``(U^T S U, U^T b, P_1^T W_1 S U, ...)`` with ``U = K A``, ``K = exp(-|x' - z'|^2 / 2)`` and ``S = diag(dinv)``,
    one row block of ``K`` and ``U`` at a time (neither is stored).

    The forward pass forms ``U``'s products from ``U``'s blocks, so the Gram matrix is a Gram matrix of the rounded
    ``U`` (positive semidefinite to rounding). Forming ``A^T (K^T S K) A`` instead would multiply the rounding of
    ``K^T S K`` by ``|A|^2`` (``L^{-T}`` reaches 10^3 for ill-conditioned inducing points): in float32 at
    ``n = 10^6`` the capacitance lost its positive determinant. The backward pass works on ``U``'s side too, as
    autograd through ``U = K A`` would, with ``U``'s rows in the eigenvectors of ``H = sym(dG)``: ``dU = S (2 U H + g)
    + b dR^T``, ``dK = dU A^T`` and ``dA = K^T dU`` from the same ``dU`` (:meth:`backward`; three GEMMs per block).
    Products run in ``x``'s precision, sums over blocks in ``dinv``'s.
    """

    @staticmethod
    def forward(ctx, rows, labels, ks, weights, x, inducing, lengthscale, a, dinv, rhs):
        wdt, dt = dinv.dtype, x.dtype
        n, m, r = x.shape[0], inducing.shape[0], a.shape[-1]
        xs, zs = _scaled(x, inducing, lengthscale)
        xa, za_t = _augment(xs, rows=True), _augment(zs, rows=False).T.contiguous()
        c_max = min(rows, n)
        kbuf, ubuf, sbuf = x.new_empty(c_max, m), x.new_empty(c_max, r), x.new_empty(c_max, r)
        wbuf = x.new_empty(c_max, r) if any(w is not None for w in weights) else None
        cast_buf = x.new_empty(min(_CAST_ROWS, c_max), r, dtype=rhs.dtype) if rhs.shape[-1] else None
        gram = x.new_zeros(r, r, dtype=wdt)
        root_t = x.new_zeros(r, rhs.shape[-1], dtype=wdt)
        cross = [x.new_zeros(k, r, dtype=wdt) for k in ks]
        sums = [x.new_zeros(k, r) for k in ks]  # block sums in x's precision, flushed into ``cross`` (below)
        # as in the sum's own root pass: about _FLUSH_TERMS rows per level are summed in x's precision before
        # they join the working-precision total; a cast of the k x r buffer per row block cost more than the
        # sums when k is large (10^5 levels: 61 casts of 2.6e7 entries per pass)
        flush_every = [max(1, (_FLUSH_TERMS * k) // rows) for k in ks]
        a_x = a.to(dt)
        dinv_x = dinv.to(dt)
        weights_x = [None if w is None else w.to(dt) for w in weights]
        for block, start in enumerate(range(0, n, rows)):
            c = min(rows, n - start)
            last = start + rows >= n
            k = _kernel_block(xa[start : start + c], za_t, kbuf[:c])
            u = torch.mm(k, a_x, out=ubuf[:c])
            # expanded columns: a broadcast multiply is 1.5x slower here
            scaled = torch.mul(u, dinv_x[start : start + c].unsqueeze(-1).expand(c, r), out=sbuf[:c])
            gram += (u.T @ scaled).to(wdt)
            if cast_buf is not None:
                root_t += _t_matmul_wide(u, rhs[start : start + c], cast_buf)
            for j, buf in enumerate(sums):
                vals = scaled
                wj = weights_x[j]
                if wj is not None:
                    assert wbuf is not None
                    vals = torch.mul(scaled, wj[start : start + c].unsqueeze(-1).expand(c, r), out=wbuf[:c])
                buf.index_add_(0, labels[j][start : start + c], vals)
                if last or (block + 1) % flush_every[j] == 0:
                    cross[j] += buf.to(wdt)
                    buf.zero_()
        ctx.rows, ctx.labels, ctx.weights = rows, labels, weights_x
        ctx.save_for_backward(x, inducing, lengthscale, a, dinv, rhs, gram, root_t, *cross)
        return (gram, root_t, *cross)

    @staticmethod
    @first_order_only("the RBF inducing-point Gram products")
    def backward(ctx, grad_gram, grad_root_t, *grad_cross):
        # On U's side, as autograd through U = K A would: with H = sym(dG) = Q diag(lam) Q^T and the rows of U
        # rotated, Y = U Q = K (A Q) (one GEMM per block), the gathered gradients of the block sums
        # g_a = sum_j w_ja (dC_j Q)[l_ja] and P = S (2 Y diag(lam) + g) (dU = P Q^T + b dR^T):
        #   d/ds_a = y_a . (lam o y_a + g_a),   d/db_a = dR^T u_a = (A dR)^T k_a,
        #   dK = P (A Q)^T + b (A dR)^T,   dA = (K^T P) Q^T + (K^T b) dR^T.
        # Forming A H A^T and applying it to K (one GEMM per block, dA = A^{-T} (2 G H + ...) from the outputs) cancels
        # terms of size |K| |A|^2 down to U's size: |u_a| << |k_a| |A| when K_ZZ is ill-conditioned (close inducing
        # points), and the noise's gradient u_a H u_a^T lost every digit (the trace term's gradient had the wrong sign,
        # 25.1 against 6e-6). dK and dA must also come from the same dU: the K path and the K_ZZ path of the gradients
        # of the lengthscale and the inducing points cancel (each of size |A|), and A^{-T} (U^T dU) differs from
        # K^T dU by cond(A) times the rounding of U.
        x, inducing, lengthscale, a, dinv, rhs, gram, root_t, *cross = ctx.saved_tensors
        need_x, need_z, need_l, need_a, need_d, need_b = ctx.needs_input_grad[4:10]
        dt, wdt = x.dtype, dinv.dtype
        n, m, d, r = x.shape[0], inducing.shape[0], x.shape[-1], a.shape[-1]
        rows = ctx.rows
        a_w = a.to(wdt)
        sym = None if grad_gram is None else 0.5 * (grad_gram + grad_gram.mT)
        g_root = None if grad_root_t is None or not rhs.shape[-1] else grad_root_t
        have_g = any(g is not None for g in grad_cross)
        use_y = sym is not None or have_g
        grads: list[Tensor | None] = [None] * 10
        b_k = None if g_root is None else (a_w @ g_root).to(dt)  # m x t
        need_inputs = need_x or need_z or need_l
        grad_d = torch.zeros_like(dinv) if need_d and use_y else None
        grad_b = torch.zeros_like(rhs) if need_b and b_k is not None else None
        if not (use_y or b_k is not None) or not (need_inputs or need_a or grad_d is not None or grad_b is not None):
            if need_a:
                grads[7] = torch.zeros_like(a)
            if need_d:
                grads[8] = torch.zeros_like(dinv)
            return tuple(grads)
        vecs = b_y = b_y_t = lam_x = h_x = None
        g_q: list[Tensor | None] = [None] * len(grad_cross)
        if use_y:
            lam = None
            if sym is not None:
                try:  # a gradient with NaN or inf (which eigh refuses) keeps H: Y H is one more GEMM per block
                    lam, vecs = torch.linalg.eigh(sym) if bool(torch.isfinite(sym).all()) else (None, None)
                except RuntimeError:  # eigh did not converge
                    lam = vecs = None
                if lam is None:
                    h_x = sym.to(dt)
            if vecs is None:
                vecs = torch.eye(r, dtype=wdt, device=a.device)
            if lam is None:
                lam = a_w.new_zeros(r)
            a_q = a_w @ vecs
            b_y, b_y_t, lam_x = a_q.to(dt), a_q.mT.to(dt).contiguous(), lam.to(dt)
            g_q = [None if g is None else (g.to(wdt) @ vecs).to(dt).contiguous() for g in grad_cross]
        dx = torch.zeros_like(x) if need_x else None
        xs, zs = _scaled(x, inducing, lengthscale)
        xa, za_t = _augment(xs, rows=True), _augment(zs, rows=False).T.contiguous()
        xb = torch.cat([xs, xs.square(), torch.ones_like(xs[:, :1])], dim=-1) if need_inputs else None
        col = x.new_zeros(2 * d + 1, m)
        c_max = min(rows, n)
        kbuf, tbuf = x.new_empty(c_max, m), x.new_empty(c_max, m)
        ybuf, pbuf = (x.new_empty(c_max, r) if use_y else None for _ in range(2))
        qbuf = x.new_empty(c_max, r) if use_y and have_g else None
        k_p = a_w.new_zeros(m, r) if need_a and use_y else None  # K^T P, summed in the working precision
        k_b = a_w.new_zeros(m, rhs.shape[-1]) if need_a and b_k is not None else None  # K^T b
        dinv_x = dinv.to(dt)
        for start in range(0, n, rows):
            c = min(rows, n - start)
            k = _kernel_block(xa[start : start + c], za_t, kbuf[:c])
            p = None
            if use_y:
                assert ybuf is not None and pbuf is not None and b_y is not None and lam_x is not None
                y = torch.mm(k, b_y, out=ybuf[:c])  # U Q
                lam_c = lam_x.expand(c, r)  # expanded: faster than broadcasting
                p = torch.mul(y, lam_c, out=pbuf[:c]) if h_x is None else torch.mm(y, h_x, out=pbuf[:c])  # U H
                for j, gj in enumerate(g_q):
                    if gj is None:
                        continue
                    assert qbuf is not None
                    idx = ctx.labels[j][start : start + c]
                    piece = torch.index_select(gj, 0, idx, out=qbuf[:c])
                    wj = ctx.weights[j]
                    if wj is not None:
                        piece.mul_(wj[start : start + c].unsqueeze(-1).expand(c, r))
                    p.add_(piece)
                if grad_d is not None:  # y_a . (lam o y_a + g_a): row dot products as a batched GEMM
                    grad_d[start : start + c] = (y.unsqueeze(-2) @ p.unsqueeze(-1)).reshape(c).to(wdt)
                if h_x is None:
                    p.addcmul_(y, lam_c)
                else:
                    p.addmm_(y, h_x)
                p.mul_(dinv_x[start : start + c].unsqueeze(-1).expand(c, r))  # P
            if grad_b is not None:
                assert b_k is not None
                grad_b[start : start + c] = k @ b_k
            rhs_c = None if b_k is None else rhs[start : start + c].to(dt)
            if k_p is not None:
                assert p is not None
                _add_t_matmul(k_p, k, p)
            if k_b is not None:
                assert rhs_c is not None
                _add_t_matmul(k_b, k, rhs_c)
            if not need_inputs:
                continue
            if p is not None:
                assert b_y_t is not None
                dk = torch.mm(p, b_y_t, out=tbuf[:c])
            else:
                dk = tbuf[:c].zero_()
            if b_k is not None:
                assert rhs_c is not None
                dk.addmm_(rhs_c, b_k.T)
            e = dk.mul_(k)  # E = dK o K
            assert xb is not None
            col.addmm_(xb[start : start + c].T, e)
            if dx is not None:  # dx' = E z' - x' rowsum(E)
                dx[start : start + c] = (e @ zs).sub_(xs[start : start + c] * e.sum(-1, keepdim=True)) / lengthscale
        if need_a:
            grad_a = torch.zeros_like(a_w)
            if k_p is not None:
                assert vecs is not None
                grad_a += k_p @ vecs.mT
            if k_b is not None:
                assert g_root is not None
                grad_a += k_b @ g_root.to(wdt).mT
            grads[7] = grad_a.to(a.dtype)
        grads[4] = dx
        if need_inputs:
            grads[5], grads[6] = input_grads(col, zs, lengthscale, need_z, need_l)
        if need_d:
            grads[8] = grad_d if grad_d is not None else torch.zeros_like(dinv)
        grads[9] = grad_b
        return tuple(grads)


class _Grams(list):
    """``(d, U^T D^{-1} U)`` of each :meth:`RBFRootFactor.weighted_products` over one ``L^{-T}`` tensor (a list that
    takes weak references)."""


#: The Gram matrices per ``L^{-T}`` tensor (by id; a fresh tensor each training forward pass), held by the factors
#: over it: an entry goes with the last of them, while the tensor (which each of them holds) keeps its id. Keyed to
#: the tensor's life instead, entries lived for good whenever no backward pass freed their graphs, which hold it.
_GRAMS: weakref.WeakValueDictionary[int, _Grams] = weakref.WeakValueDictionary()


def _shared_grams(inv_root: Tensor) -> _Grams:
    """The Gram matrices over ``inv_root`` of the live factors, or a new list registered for it."""
    grams = _GRAMS.get(id(inv_root))
    if grams is None:
        grams = _GRAMS[id(inv_root)] = _Grams()
    return grams


class RBFRootFactor(LinearOperator, LazyRoot):
    r"""The ``n x m`` SGPR root :math:`U = s\,\exp(-\lVert x/l - Z/l \rVert^2 / 2)\, L^{-\top}`, held as its inputs.

    :class:`~bma_gp.BlockMeanSumLinearOperator` asks it for :math:`U^\top D^{-1} U`, :math:`U^\top D^{-1} y` and
    the block sums of :math:`D^{-1} U` (:meth:`weighted_products`), which it forms without ``U``. Anything else
    (a product, an index, a root decomposition) forms ``U`` once, in row blocks, with the hand-written backward
    pass of :mod:`bma_gp.kernels._rbf_root`.
    """

    def __init__(self, x: Tensor, inducing: Tensor, inv_root: Tensor, lengthscale: Tensor, scale: Tensor, rows: int):
        super().__init__(x, inducing, inv_root, lengthscale, scale, rows=rows)
        self.x, self.inducing, self.inv_root = x, inducing, inv_root
        self.lengthscale, self.scale, self.rows = lengthscale, scale, rows
        self._formed: tuple[Tensor, Tensor] | None = None
        # ``(d, U^T D^{-1} U)`` of each :meth:`weighted_products`, shared by every factor over the same ``L^{-T}``
        # tensor: linear_operator rebuilds operators from their tensors (``evaluate_kernel``), and the trace term
        # must find the Gram matrix the marginal likelihood formed (its factor holds the list until then)
        self._grams = _shared_grams(inv_root)

    # ---------------------------------------------------------------- U itself, on demand
    def _pair(self) -> tuple[Tensor, Tensor]:
        if self._formed is None:
            self._formed = rbf_root(self.rows, self.x, self.inducing, self.inv_root, self.lengthscale, self.scale)
        return self._formed

    def materialize(self) -> Tensor:
        return self._pair()[0]

    def to_dense(self) -> Tensor:
        return self._pair()[0]

    def row_norms(self) -> Tensor:
        """``rowsum(U**2)``, formed with ``U``."""
        return self._pair()[1]

    def _dense(self) -> DenseLinearOperator:
        return DenseLinearOperator(self.materialize())

    def _size(self) -> torch.Size:
        return torch.Size([self.x.shape[-2], self.inv_root.shape[-1]])

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.materialize() @ rhs

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self.materialize().mT @ rhs

    def _transpose_nonbatch(self) -> LinearOperator:
        return DenseLinearOperator(self.materialize().mT)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        return self._dense()._getitem(row_index, col_index, *batch_indices)

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        return self._dense()._get_indices(row_index, col_index, *batch_indices)

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return self._dense()._expand_batch(batch_shape)

    # ---------------------------------------------------------------- products without U
    def _gram(self, dinv: Tensor, rhs: Tensor, labels, ks, weights) -> tuple[Tensor, ...]:
        x, inducing, lengthscale, rows = self.x, self.inducing, self.lengthscale, self.rows
        a = self.inv_root * self.scale
        wdt = core_dtype(x.dtype)
        if wdt != x.dtype and not settings.fast_root_products.on():
            # a float32 root's products in float64, from the float32 inputs (the data, the inducing points, the
            # lengthscale and A = s L^{-T} as the float32 model rounds them): each gradient is a difference of terms
            # of size |k_a| |A| that cancel down to |u_a| (the data term against the trace term, the K path against
            # the K_ZZ path), and with the kernel blocks, U = K A and the backward's products rounded to float32 they
            # were 10-1650x further off than GPyTorch's float32 SGPR (d = 1, m = 64, lengthscale 0.3, noise 1e-2:
            # the lengthscale's gradient 180% off against 1.4%). Half the rows per block: the same block bytes
            x, inducing, lengthscale, a = (t.to(wdt) for t in (x, inducing, lengthscale, a))
            rhs = rhs.to(wdt)
            rows = max(1, rows * self.x.element_size() // x.element_size())
        return _RBFGram.apply(rows, tuple(labels), tuple(ks), tuple(weights), x, inducing, lengthscale, a, dinv, rhs)

    def weighted_products(self, diag_values, dinv, rhs, labels, ks, weights):
        out = self._gram(dinv, rhs, labels, ks, weights)
        self._grams.append((diag_values, out[0]))
        return out[0], out[1], list(out[2:])

    def weighted_trace(self, noise: Tensor) -> Tensor:
        r""":math:`\sum_i \lVert u_i \rVert^2 / \sigma_i^2 = \operatorname{tr}(U^\top S^{-1} U)`: the trace of the Gram
        matrix of an earlier :meth:`weighted_products` with the same diagonal when there is one (working precision)."""
        needs_grad = torch.is_grad_enabled() and self._needs_grad(noise)
        for diag_values, gram in reversed(self._grams):
            if diag_values.shape == noise.shape and (diag_values is noise or torch.equal(diag_values, noise)):
                # equal values are not the same noise for the gradient: a kernel given a likelihood of its own whose
                # noise equals the model's (two fresh GaussianLikelihoods start equal) took the model's Gram matrix,
                # so the trace term's gradient went to the model's noise (8.8 where -0.17, the kernel's -9.7 where
                # -0.78): reused with gradients only when both come from the same parameters
                if not needs_grad or (gram.requires_grad and _same_leaves(diag_values, noise)):
                    return torch.diagonal(gram).sum()
        wdt = core_dtype(self.dtype)
        empty = noise.new_zeros(noise.shape[-1], 0, dtype=wdt)
        return torch.diagonal(self._gram(noise.to(wdt).reciprocal(), empty, (), (), ())[0]).sum()

    def _needs_grad(self, noise: Tensor) -> bool:
        return noise.requires_grad or any(t.requires_grad for t in self.representation())


class LazyRootOperator(LowRankRootLinearOperator):
    """``U U^T`` for an :class:`RBFRootFactor`: its diagonal comes with ``U``; sums with block mean operators take
    the factor as it is."""

    def _diagonal(self) -> Tensor:
        if isinstance(self.root, RBFRootFactor):
            return self.root.row_norms()
        return super()._diagonal()

    def _formed(self) -> LowRankRootLinearOperator:
        """``U U^T`` with ``U`` formed: the factor has no batch dimensions of its own (linear_operator's default
        rebuilt it with the old shape: an unsqueezed or repeated operator kept ``(n, n)``)."""
        root = self.root
        return LowRankRootLinearOperator(root.materialize() if isinstance(root, RBFRootFactor) else root)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        return self._formed()._unsqueeze_batch(dim)

    def _expand_batch(self, batch_shape) -> LinearOperator:
        return self._formed()._expand_batch(batch_shape)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        from bma_gp._composition import add_lazy_root

        res = super().add_diagonal(diag)  # linear_operator's reading of a scalar, one-entry or per-point diag
        closed = add_lazy_root(self, res._diag_tensor) if isinstance(res, LowRankRootAddedDiagLinearOperator) else None
        return res if closed is None else closed


def _leaves(t: Tensor, limit: int = 256) -> frozenset[int] | None:
    """The ids of the autograd leaves ``t`` is computed from (empty for a constant); None past ``limit`` graph nodes
    (too far to tell)."""
    if t.grad_fn is None:
        return frozenset((id(t),)) if t.requires_grad else frozenset()
    leaves: set[int] = set()
    seen: dict[int, object] = {}  # the nodes held, so that no id is reused during the walk
    stack: list = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        if len(seen) > limit:
            return None
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            leaves.add(id(variable))
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return frozenset(leaves)


def _same_leaves(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (equal values) come from the same autograd leaves: the same likelihood's noise, read
    twice."""
    if a is b:
        return True
    leaves = _leaves(a)
    return leaves is not None and leaves == _leaves(b)


class TraceTerm(InducingPointKernelAddedLossTerm):
    """GPyTorch's SGPR trace term, :math:`-\\tfrac12 \\sum_i (k_{ii} - q_{ii}) / \\sigma_i^2`, with
    :math:`\\sum_i q_{ii} / \\sigma_i^2` taken from the factor's Gram matrix (:meth:`RBFRootFactor.weighted_trace`)."""

    def loss(self, *params) -> Tensor:
        variational = self.variational_dist.lazy_covariance_matrix
        factor = getattr(variational, "root", None)
        if not isinstance(factor, RBFRootFactor) or isinstance(self.likelihood, MultitaskGaussianLikelihood):
            return super().loss(*params)
        prior_covar = self.prior_dist.lazy_covariance_matrix
        shape = prior_covar.shape[:-1]
        noise = self.likelihood._shaped_noise_covar(shape, *params).diagonal(dim1=-1, dim2=-2)
        if noise.shape != shape:
            return super().loss(*params)
        trace = factor.weighted_trace(noise)
        # the difference of two sums of size n k / sigma^2 in the working precision, in which the trace was summed: a
        # float32 model rounded both to float32 first (2.4e-4 at 2600, against a difference of 8e-4)
        wdt = trace.dtype
        diag = prior_covar.diagonal(dim1=-1, dim2=-2)
        prior = (diag.to(wdt) / noise.to(wdt)).sum(-1)
        return (-0.5 * (prior - trace)).to(torch.promote_types(diag.dtype, noise.dtype))
