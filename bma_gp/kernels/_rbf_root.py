"""The SGPR root of an RBF kernel, ``U = s exp(-D / 2) L^{-T}``, in row blocks with a hand-written backward pass.

:class:`~bma_gp.ChunkedInducingPointKernel` differentiates any base kernel by recomputing each row block
under autograd. For the kernel most SGPR models use, ``ScaleKernel(RBFKernel())`` (one lengthscale or
one per input dimension), that recomputation pays for every elementwise step of GPyTorch's distance and
exponential twice (forward and backward) and keeps their intermediates. Here the derivatives are written
out instead. With ``x' = x / l``, ``z' = Z / l``, ``E = K o (dU_total A_s^T)`` (``o`` the elementwise
product, ``A_s = s L^{-T}``, ``K`` the unscaled kernel block):

* ``dA_s = sum over blocks of K^T dU_total`` (one GEMM per block), ``dL^{-T} = s dA_s``,
  ``ds = <L^{-T}, dA_s>``;
* ``dx'_i = -(x'_i rowsum(E)_i - (E z')_i)``, ``dz'_j = (E^T x')_j - z'_j colsum(E)_j``;
* ``dl = -(sum_i dx'_i o x'_i + sum_j dz'_j o z'_j) / l``, ``dx = dx' / l``, ``dZ = dz' / l``;

where ``dU_total = dU + 2 U diag(d diag)`` also carries the gradient of the row sums of ``U**2``. Per
block the backward pass is one small GEMM and two elementwise passes to rebuild ``K``, two ``c x m x m``
GEMMs, and one elementwise product.
"""

from __future__ import annotations

import torch
from gpytorch.kernels import RBFKernel, ScaleKernel
from torch import Tensor

from bma_gp._autograd import first_order_only, reverse_mode_only

__all__ = ["input_grads", "rbf_parts", "rbf_root"]


def rbf_parts(kernel, x: Tensor, inducing: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """``(lengthscale, outputscale or None)`` for a plain (Scale)RBF kernel this module covers, else None.

    Covered: ``RBFKernel`` or ``ScaleKernel(RBFKernel)`` of exactly these classes (a subclass may change
    the formula), no ``active_dims`` of their own, no batch shape, 2-D inputs, one lengthscale or one per
    input column.
    """
    scale = None
    inner = kernel
    if type(kernel) is ScaleKernel:
        if kernel.active_dims is not None or kernel.batch_shape != torch.Size([]):
            return None
        scale, inner = kernel.outputscale, kernel.base_kernel
    if type(inner) is not RBFKernel or inner.active_dims is not None or inner.batch_shape != torch.Size([]):
        return None
    if x.dim() != 2 or inducing.dim() != 2 or x.shape[-1] != inducing.shape[-1]:
        return None
    lengthscale = inner.lengthscale
    if lengthscale.shape not in (torch.Size([1, 1]), torch.Size([1, x.shape[-1]])):
        return None
    if scale is not None and scale.numel() != 1:
        return None
    return lengthscale, scale


def _augment(scaled: Tensor, rows: bool) -> Tensor:
    """``[x', -|x'|^2 / 2, -1/2]`` (rows) or ``[z', 1, |z'|^2]`` (inducing side): their product is ``-D / 2``."""
    sq = scaled.square().sum(-1, keepdim=True)
    ones = torch.ones_like(sq)
    if rows:
        return torch.cat([scaled, -0.5 * sq, -0.5 * ones], dim=-1)
    return torch.cat([scaled, ones, sq], dim=-1)


def _scaled(x: Tensor, inducing: Tensor, lengthscale: Tensor) -> tuple[Tensor, Tensor]:
    """``x'`` and ``z'`` centred on the inducing points' mean, so that the expanded squared distance loses no more
    digits than GPyTorch's (which also centres). ``D`` is unchanged, and so are the gradient formulas: the
    shift's terms cancel because ``sum_i dx'_i + sum_j dz'_j = 0``."""
    shift = inducing.mean(-2, keepdim=True)
    return (x - shift) / lengthscale, (inducing - shift) / lengthscale


def input_grads(
    col: Tensor, zs: Tensor, lengthscale: Tensor, need_z: bool, need_l: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(dZ, dl)`` from ``col = E^T [x', x'^2, 1]`` summed over every row block (``E = dK o K``): with
    ``q = E^T x'``, ``q2 = E^T x'^2``, ``dz' = q - z' colsum(E)`` and
    ``sum_i dx'_i o x'_i = sum_j (q_j o z'_j - q2_j)``."""
    d = zs.shape[-1]
    q, q2, colsum = col[:d].T, col[d : 2 * d].T, col[2 * d]
    dzs = q - zs * colsum.unsqueeze(-1)
    dz = dzs / lengthscale if need_z else None
    dl = None
    if need_l:
        sx = (q * zs - q2).sum(0)
        per = -(sx + (dzs * zs).sum(0)) / lengthscale.reshape(-1)
        dl = per.sum().reshape(lengthscale.shape) if lengthscale.numel() == 1 else per.reshape(lengthscale.shape)
    return dz, dl


def _kernel_block(xa: Tensor, za_t: Tensor, out: Tensor) -> Tensor:
    """``exp(-D / 2)`` for one row block (``D`` clamped at 0 like GPyTorch's squared distance), into ``out``."""
    torch.mm(xa, za_t, out=out)
    return out.clamp_max_(0.0).exp_()


@reverse_mode_only("ChunkedInducingPointKernel (the RBF / Matern root of its inducing-point covariance)")
class _RBFRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: int, x: Tensor, inducing: Tensor, inv_root: Tensor, lengthscale: Tensor, scale):
        n, m = x.shape[0], inducing.shape[0]
        xs, zs = _scaled(x, inducing, lengthscale)
        xa, za_t = _augment(xs, rows=True), _augment(zs, rows=False).T.contiguous()
        a_s = inv_root if scale is None else inv_root * scale
        root = x.new_empty(n, inv_root.shape[-1])
        diag = x.new_empty(n)
        buf = x.new_empty(min(rows, n), m)
        for start in range(0, n, rows):
            c = min(rows, n - start)
            k = _kernel_block(xa[start : start + c], za_t, buf[:c])
            block = root[start : start + c]
            torch.mm(k, a_s, out=block)
            torch.linalg.vector_norm(block, dim=-1, out=diag[start : start + c])  # a fifth of vecdot's time
        diag.square_()
        ctx.rows = rows
        ctx.has_scale = scale is not None
        ctx.save_for_backward(x, inducing, inv_root, lengthscale, scale if scale is not None else inv_root, root)
        return root, diag

    @staticmethod
    @first_order_only("the RBF inducing-point root")
    def backward(ctx, grad_root: Tensor | None, grad_diag: Tensor | None):
        x, inducing, inv_root, lengthscale, scale, root = ctx.saved_tensors
        scale = scale if ctx.has_scale else None
        rows = ctx.rows
        n, m = x.shape[0], inducing.shape[0]
        need_x, need_z, need_a, need_l = ctx.needs_input_grad[1:5]
        need_s = ctx.has_scale and ctx.needs_input_grad[5]
        xs, zs = _scaled(x, inducing, lengthscale)
        xa, za_t = _augment(xs, rows=True), _augment(zs, rows=False).T.contiguous()
        a_s = inv_root if scale is None else inv_root * scale
        a_s_t = a_s.T.contiguous()
        c_max = min(rows, n)
        kbuf, ubuf, ebuf = (x.new_empty(c_max, m) for _ in range(3))
        g_as = inv_root.new_zeros(m, inv_root.shape[-1])  # sum of K^T dU_total
        d = x.shape[-1]
        # E^T [x', x'^2, 1]: every sum the gradients of Z and l need, one small GEMM per block (MKL's
        # GEMV and sums over the columns of E cost several times more)
        xb = torch.cat([xs, xs.square(), torch.ones_like(xs[:, :1])], dim=-1)
        col = x.new_zeros(2 * d + 1, m)
        dx = torch.empty_like(x) if need_x else None
        need_inputs = need_x or need_z or need_l
        for start in range(0, n, rows):
            c = min(rows, n - start)
            k = _kernel_block(xa[start : start + c], za_t, kbuf[:c])
            du, rows_c = ubuf[:c], slice(start, start + c)
            if grad_root is not None and grad_diag is not None:
                g_c = grad_diag[rows_c].unsqueeze(-1).expand(c, m)  # expanded: faster than broadcasting
                torch.addcmul(grad_root[rows_c], root[rows_c], g_c, value=2.0, out=du)
            elif grad_root is not None:
                du = grad_root[start : start + c]
            elif grad_diag is not None:
                torch.mul(root[start : start + c], 2.0 * grad_diag[start : start + c].unsqueeze(-1), out=du)
            else:
                break
            if need_a or need_s:
                g_as.addmm_(k.T, du)
            if not need_inputs:
                continue
            e = torch.mm(du, a_s_t, out=ebuf[:c]).mul_(k)  # E = dK o K
            col.addmm_(xb[start : start + c].T, e)
            if dx is not None:  # dx' = E z' - x' rowsum(E)
                xs_blk = xs[start : start + c]
                dx[start : start + c] = (e @ zs).sub_(xs_blk * e.sum(-1, keepdim=True)) / lengthscale
        grads: list[Tensor | None] = [None, None, None, None, None, None]
        if need_inputs:
            grads[1] = dx
            grads[2], grads[4] = input_grads(col, zs, lengthscale, need_z, need_l)
        if need_a:
            grads[3] = g_as if scale is None else g_as * scale
        if need_s:
            assert scale is not None
            grads[5] = (g_as * inv_root).sum().reshape(scale.shape)
        return tuple(grads)


def rbf_root(
    rows: int, x: Tensor, inducing: Tensor, inv_root: Tensor, lengthscale: Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(U, rowsum(U**2))`` with ``U = s exp(-|x/l - Z/l|^2 / 2) L^{-T}``, ``rows`` rows at a time, differentiable
    with respect to ``x``, ``inducing``, ``inv_root``, ``lengthscale`` and ``scale``.

    The tensors are taken in the dtype they promote to, as GPyTorch's ``RBFKernel`` computes (``x / l``) and its
    ``InducingPointKernel`` returns: float32 or integer ``x`` with float64 parameters gives a float64 root (the
    preallocated blocks had ``x``'s dtype, and the products into them failed with "Expected out tensor to have dtype
    double, but got float"). Gradients return in each input's own dtype."""
    dtype = x.dtype
    for t in (inducing, inv_root, lengthscale, scale):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    x, inducing, inv_root, lengthscale = (t.to(dtype) for t in (x, inducing, inv_root, lengthscale))
    scale = None if scale is None else scale.to(dtype)
    return _RBFRoot.apply(rows, x, inducing, inv_root, lengthscale, scale)
