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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bma_gp import BlockMeanLinearOperator, Partition, block_mean_from_sums
from bma_gp._precision import core_dtype
from bma_gp.optim import _cpu_kernels, _fused
from bma_gp.optim._scaling import z_inv_sqrt, zero_entries
from bma_gp.optim.flat_optimizer import _non_finite_message
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
    """
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
    folded as the operator folds them. No :class:`~bma_gp.BlockMeanLinearOperator` objects and no
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
            lam, B = _inverse_root_formulas(np, U_np, w_np, consts, damping)
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
    lam, B = _inverse_root_formulas(torch, U.to(cd), w.to(cd), consts, damping)
    return lam.to(dtype), B.to(dtype)


#: Up to this many blocks a CPU root is computed with numpy (its ``eigh`` and elementwise operations carry less
#: fixed cost than torch's at small sizes); above it with torch, whose ``eigh`` uses more threads.
NUMPY_ROOT_MAX_BLOCKS = 128
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _inverse_root_formulas(xp, U, w, consts, damping: float):
    """The body of :func:`_normalised_inverse_root` for ``xp`` = ``torch`` or ``numpy`` (2-D ``U``; the same
    operations exist under the same names in both)."""
    inv_s, inv_within, single, outer_rsqrt = consts
    d = w * inv_s
    seen = d > 0
    inv_d = xp.where(seen, 1 / xp.where(seen, d, 1.0), 0.0)
    diag_U = xp.diagonal(U)
    off = (diag_U - w) * inv_within * inv_d  # s_i B_ii / d_i (0 for singletons)
    lam = xp.where(seen, 1 - off * inv_s, 1.0) + damping
    t = xp.sqrt(inv_d * inv_s)
    C = U * xp.outer(t, t)
    idx = xp.arange(C.shape[-1])
    C[idx, idx] = lam + off
    # eigh reads one triangle: no symmetrisation needed
    lam = xp.where(single, xp.where(C[idx, idx] > 0, C[idx, idx], 1.0), lam)  # fold singletons as the operator does
    e, V = xp.linalg.eigh(C)
    f_lam = 1 / xp.sqrt(lam)
    D = (V * (1 / xp.sqrt(e))) @ V.T
    D[idx, idx] -= f_lam
    D = D * outer_rsqrt
    return f_lam, (D + D.T) * 0.5


def _root_constants(partition: Partition, dtype: torch.dtype, device: torch.device, numpy: bool = False) -> tuple:
    """What :func:`_normalised_inverse_root` needs of the block sizes, made once per partition, dtype and device
    (kept on the partition): ``1 / s``, ``1 / (s - 1)`` (0 for singletons), the singleton mask and
    ``s_i^{-1/2} s_j^{-1/2}``; with ``numpy``, as numpy arrays (CPU only)."""
    key = (dtype, device, numpy)
    cached = getattr(partition, "_inverse_root_constants", None)
    if cached is None or cached[0] != key:
        s = partition.sizes.to(device=device, dtype=dtype)
        single = s == 1
        inv_within = torch.where(single, 0.0, (s - 1).clamp_min(1).reciprocal())
        r = s.rsqrt()
        consts = (s.reciprocal(), inv_within, single, torch.outer(r, r))
        cached = (key, tuple(c.numpy() for c in consts) if numpy else consts)
        partition._inverse_root_constants = cached  # type: ignore[attr-defined]
    return cached[1]


@dataclass(eq=False)
class Workspace:
    """Work buffers of the eager paths, reused every step, for one layout and one ``h`` buffer.

    ``n`` and ``r`` are the two rows of one ``(2, d)`` buffer.

    Attributes:
        h: the flat ``h`` the views below belong to. # shape: (d,)
        nr: ``n`` and ``r``. # shape: (2, d)
        sums: per block, ``P^T v``, ``P^T n`` and ``P^T n^2``. # shape: (k, 3)
        scratch: ``sqrt(h)`` while masking, one tensor long. # shape: (max numel,)
        grad: the gathered flat gradient (scattered path only, allocated there). # shape: (d,)
        root: the preconditioner operator of the last root step (scattered path), and that step.
        zeros: on CPU, per tensor (``-1``: the flat vector), the entries where ``h == 0``
            (:func:`~bma_gp.optim._scaling.zero_entries`); rebuilt from ``h`` when missing.
        views: per set of tensors with a gradient (up to 16 sets), the flat views of ``h``, ``n`` and ``r``
            per tensor and those of ``n`` and ``r`` shaped like the parameters (:func:`_tensor_blocks_cpu_step`).
        h_max: per tensor, an upper bound of its ``h`` (:func:`_tensor_blocks_cpu_step`'s ratio form), valid while
            ``h``'s version counter is ``h_version``.
        chain_until: per tensor, the step until which it takes the chain form (a gradient entry was exactly 0).
    """

    h: Tensor
    nr: Tensor
    sums: Tensor
    scratch: Tensor
    grad: Tensor | None = None
    root: tuple[int, BlockMeanLinearOperator] | None = field(default=None)
    zeros: dict[int, Tensor] = field(default_factory=dict)
    views: dict[tuple[int, ...], tuple[list[Tensor], ...]] = field(default_factory=dict)
    h_max: dict[int, float] = field(default_factory=dict)
    h_version: int = -1
    chain_until: dict[int, int] = field(default_factory=dict)

    def has_zeros(self) -> bool:
        """Whether some entry of ``h`` was 0 after the last step (CPU; ``True`` before the first)."""
        return not self.zeros or any(idx.numel() for idx in self.zeros.values())

    def mask_zeros(self, key: int, h: Tensor, r: Tensor) -> None:
        """``r = 0`` where ``h = 0``, by the list of such entries (CPU)."""
        idx = self.zeros[key] = zero_entries(h, self.zeros.get(key))
        if idx.numel():
            r.index_put_((idx,), r.new_zeros(()))  # measured faster than index_fill_ (46 against 55 us per 10^4)

    def tensor_views(self, blocks: ParamBlocks, params: list[Tensor], present: list[int]) -> tuple[list[Tensor], ...]:
        """``(h, n, r, n_shaped, r_shaped)`` of the tensors ``present``: flat views, then ``n`` and ``r`` shaped like
        those parameters (built once per set)."""
        key = tuple(present)
        cached = self.views.get(key)
        if cached is None:
            if len(self.views) >= 16:  # gradients present on many different sets of tensors: keep the cache small
                self.views.clear()
            n_all, r_all = self.nr.unbind(0)
            spans = [(blocks.bounds[i], blocks.bounds[i + 1], params[i].shape) for i in present]
            flat = [[x[a:b] for a, b, _ in spans] for x in (self.h, n_all, r_all)]
            shaped = [[x.view(shape) for x, (_, _, shape) in zip(xs, spans)] for xs in flat[1:]]
            cached = self.views[key] = (*flat, *shaped)
        return cached

    @classmethod
    def build(cls, blocks: ParamBlocks, h: Tensor) -> Workspace:
        numels = [b - a for a, b in zip(blocks.bounds, blocks.bounds[1:])]
        scratch = max(numels, default=0) if blocks.by_rows else h.numel()  # per tensor, or the flat vector
        return cls(
            h=h,
            nr=torch.empty(2, h.numel(), dtype=h.dtype, device=h.device),
            sums=torch.zeros(blocks.num_blocks, 3, dtype=h.dtype, device=h.device),
            scratch=torch.empty(scratch, dtype=h.dtype, device=h.device),
        )


def preconditioner(
    stats: dict[str, Any],
    partition: Partition,
    *,
    damping: float,
    update_interval: int,
    correlation: Correlation = normalised_correlation,
) -> tuple[Tensor, Tensor]:
    r"""``(lam_R, B_R)`` of :math:`R = (F + \delta I)^{-1/2}` from the statistics ``U`` and ``w``.

    Recomputed when ``stats["step"] - stats["root_step"] >= update_interval`` (or when there is
    none yet) and cached in ``stats`` (``root_lam``, ``root_B``, ``root_step``); otherwise the
    stale root is returned.
    """
    due = stats["root_lam"] is None or (stats["step"] - stats["root_step"]) >= update_interval
    if due:
        if correlation is normalised_correlation:  # the default: the same math without operator objects
            lam, B = _normalised_inverse_root(stats["U"], stats["w"], partition, damping)
        else:
            root = inverse_root(correlation(stats["U"], stats["w"], partition), damping)
            lam, B = root.lam, root.B
        stats.update(root_lam=lam, root_B=B, root_step=stats["step"])
    return stats["root_lam"], stats["root_B"]


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
            nothing to the statistics and does not move).
        state_sum: :math:`h` of all parameters, updated in place. # shape: (d,)
        stats: the global state, updated in place: ``U`` (``k x k``), ``w`` (``k``), ``step`` and the
            cached root (see :func:`preconditioner`).
        blocks: the partition of the ``d`` entries, per tensor.
        workspace: buffers for ``state_sum`` (:meth:`Workspace.build`); unused by the fused path.
        lr, weight_decay, maximize: per parameter.
        eps, damping, update_interval, correlation: as in :class:`~bma_gp.optim.BlockMeanAdagrad`.
        mask: whether some entry of :math:`h` may be 0 before this step (the eager paths on an
            accelerator then zero :math:`r` there by formula; on CPU they keep the list of such entries
            in ``workspace`` instead, and the fused path always masks, at no cost).
        check_finite: the fused path raises ``ValueError`` on an inf/nan gradient before changing
            anything (its first pass computes the flag); the eager paths expect the caller to check.
        fused: take the compiled path (``blocks.by_rows`` required).

    Raises:
        ValueError: with ``fused`` and ``check_finite``, a gradient holds inf or nan.
    """
    kwargs = dict(
        lr=lr,
        weight_decay=weight_decay,
        maximize=maximize,
        eps=eps,
        damping=damping,
        update_interval=update_interval,
        correlation=correlation,
        mask=mask,
        check_finite=check_finite,
    )
    if fused:
        if not blocks.by_rows:
            raise ValueError("the fused step needs blocks that are rows of every tensor ('tensor' or 'row').")
        impl = _fused_block_mean_adagrad
    elif blocks.by_rows:
        impl = _single_tensor_block_mean_adagrad
    else:
        impl = _scattered_block_mean_adagrad
    impl(params, grads, state_sum, stats, blocks, workspace, **kwargs)


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
            ws.mask_zeros(i, h, r)
        first, last = blocks.first_block[i], blocks.first_block[i + 1]
        if last - first == 1:  # one block (every tensor under "tensor"): plain reductions, no partition bookkeeping
            torch.stack([torch.dot(g, r), n.sum(), torch.dot(n, n)], out=sums[first])
        else:
            torch.stack([seg.block_dot(g, r), seg.block_sum(n), seg.block_dot(n, n)], dim=-1, out=sums[first:last])
    v_sums, n_sums, n_sq = sums.unbind(-1)
    _accumulate(stats, n_sums, n_sq)
    lam, B = preconditioner(
        stats, blocks.partition, damping=damping, update_interval=update_interval, correlation=correlation
    )
    coupling = B @ v_sums  # (B_R P^T v): the k x k step of the operator's product
    for i in reversed(present):  # the tensors of the first loop last to first: their n and r may still be cached
        seg, p = blocks.segments[i], params[i]
        a, b = blocks.bounds[i], blocks.bounds[i + 1]
        first, last = blocks.first_block[i], blocks.first_block[i + 1]
        n, r = n_all[a:b], r_all[a:b]
        if weight_decay[i]:
            p.mul_(1.0 - lr[i] * weight_decay[i])
        if seg.num_blocks == 1 and p.is_contiguous() and p.dtype == dtype:
            # one block: p += -lr lam_R n, then p += -lr coupling r, each factor a 0-d tensor (no host sync);
            # two contiguous passes measured faster than one addmv over the strided [n r] columns (123 vs 167 us
            # per 10^6 entries, 2 threads)
            p.view(-1).addcmul_(n, lam[first], value=-lr[i]).addcmul_(r, coupling[first], value=-lr[i])
            continue
        target = p.view(-1) if p.is_contiguous() and p.dtype == dtype else torch.zeros_like(n)
        seg.addcmul_(target, lam[first:last], n, value=-lr[i])
        seg.addcmul_(target, coupling[first:last], r, value=-lr[i])
        if target.data_ptr() != p.data_ptr():
            p.add_(target.view(p.shape).to(p.dtype))


def _tensor_blocks_apply(params, grads, blocks: ParamBlocks, dtype: torch.dtype, maximize) -> bool:
    """Whether :func:`_tensor_blocks_cpu_step` takes this step: some tensor with entries has a gradient, and each
    such tensor is one block, with contiguous gradient and parameter of the state's dtype and no ``maximize``."""
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


#: tensors of at least this many entries take the ratio form of the CPU step for one block per tensor (torch's fused
#: AdaGrad and SGD kernels, :mod:`~bma_gp.optim._cpu_kernels`); smaller ones the chain form, which makes fewer calls
RATIO_MIN_NUMEL = 2**15
#: after some gradient entry of a tensor was exactly 0 (where the ratio form needs a repair pass), the tensor takes
#: the chain form for this many steps before the ratio form is tried again
RATIO_RETRY_STEPS = 32


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
) -> None:
    r"""The eager step on CPU when every tensor is one block (``partition="tensor"``, the default).

    The arithmetic of the tensor-by-tensor loop, in fewer passes over memory:

    * one read of every gradient first (``aminmax``): it checks finiteness (``ValueError`` before anything
      changes, with ``check_finite``) and bounds this step's ``h`` (:attr:`Workspace.h_max`);
    * tensor by tensor, so that each tensor's ``g``, ``h``, ``n`` and ``r`` stay in the last-level cache from
      one operation to the next (one pass over all tensors per operation was measured slower at 2.1M
      parameters: 42 MB of buffers do not fit in a 32 MB cache), either
      - the *ratio form* (tensors of :data:`RATIO_MIN_NUMEL` entries or more, when :func:`_cpu_kernels.ratio_scale`
        finds a safe scale ``s``): ``h``, :math:`s n` and :math:`\sqrt{s} r` in four passes
        (:func:`_cpu_kernels.adagrad_ratio`), the update in one (:func:`_cpu_kernels.add_two`). Where a
        gradient entry was exactly 0 the quotient is ``nan``, which the block sum ``P^T v`` reveals: that
        tensor's ``r`` is recomputed from ``h`` and it takes the chain form for :data:`RATIO_RETRY_STEPS` steps;
      - or the *chain form*: ``h += g^2``, then ``z`` and ``n = g / z`` and ``r`` (:func:`z_inv_sqrt`), and
        the update as two ``torch._foreach_addcmul_`` calls over all such tensors;
    * the block sums are collected and stacked once.
    """
    present = [i for i, g in enumerate(grads) if g is not None and blocks.segments[i] is not None]
    gs = [grads[i].view(-1) for i in present]
    hs, ns, rs, n_shaped, r_shaped = ws.tensor_views(blocks, params, present)
    extremes = torch.stack([x for g in gs for x in torch.aminmax(g)]).tolist()  # min, max per tensor
    if check_finite and not all(math.isfinite(x) for x in extremes):
        raise ValueError(_non_finite_message("BlockMeanAdagrad"))
    stats["step"] += 1
    scales = _ratio_scales(ws, present, hs, extremes, eps, stats["step"])
    one = torch.ones((), dtype=state_sum.dtype)  # AdaGrad's step count: its learning rate is not decayed
    sums = []
    for i, g, h, n, r, s in zip(present, gs, hs, ns, rs, scales):
        if s:
            _cpu_kernels.adagrad_ratio(g, h, n, r, one, s, eps)  # h, n' = s n, r' = sqrt(s) r
        else:
            h.addcmul_(g, g)
            z_inv_sqrt(h, eps, mask=False, out=r, divide=(g, n))  # r, and n = g / z
        ws.mask_zeros(i, h, r)  # h = 0 (no gradient yet): r = 0 (n is already 0 there)
        sums.append(torch.dot(g, r))
        sums.append(n.sum())
        sums.append(torch.dot(n, n))
    rows = [blocks.first_block[i] for i in present]
    if correlation is normalised_correlation and blocks.num_blocks <= NUMPY_ROOT_MAX_BLOCKS:
        # the k-sized rest of the step on the host in float64 numpy: a few microseconds per operation, where each
        # torch call costs 5-25 us right after passes over megabytes (code and dispatch tables evicted)
        block_sums = torch.stack(sums).numpy().astype(np.float64).reshape(-1, 3)
        if any(scales):
            _repair_and_unscale(ws, block_sums, present, gs, hs, rs, scales, eps, stats["step"])
        c_n, c_r = _host_coefficients(stats, blocks, rows, block_sums, damping, update_interval)
    else:
        block_sums_t = torch.stack(sums).view(-1, 3)
        if any(scales):
            host = block_sums_t.double().numpy()
            _repair_and_unscale(ws, host, present, gs, hs, rs, scales, eps, stats["step"])
            block_sums_t = torch.from_numpy(host).to(block_sums_t.dtype)
        v, n_sum, n_sq = block_sums_t.unbind(-1)
        if len(rows) < blocks.num_blocks:  # some tensors had no gradient: their blocks' sums are 0
            index = torch.tensor(rows, device=state_sum.device)
            v, n_sum, n_sq = (torch.zeros_like(stats["w"]).index_copy_(0, index, x) for x in (v, n_sum, n_sq))
        _accumulate(stats, n_sum, n_sq)
        lam, B = preconditioner(
            stats, blocks.partition, damping=damping, update_interval=update_interval, correlation=correlation
        )
        c_n, c_r = (x.double().numpy()[rows] for x in (lam, B @ v))
    rates = np.array([-lr[i] for i in present])
    c_n, c_r = (c_n * rates).tolist(), (c_r * rates).tolist()
    decay = [1.0 - lr[i] * weight_decay[i] for i in reversed(present)]
    if any(d != 1.0 for d in decay):
        torch._foreach_mul_([params[i] for i in reversed(present)], decay)
    # p += c_n n + c_r r, last tensor first (its n and r may still be cached); in the ratio form n and r are
    # s n and sqrt(s) r
    for j in reversed(range(len(present))):
        s = scales[j]
        p = params[present[j]]
        if s:
            _cpu_kernels.add_two(p.view(-1), ns[j], rs[j], c_n[j] / s, c_r[j] / math.sqrt(s))
        else:
            _cpu_kernels.add_two(p, n_shaped[j], r_shaped[j], c_n[j], c_r[j])
    ws.h_version = state_sum._version  # the bounds in ws.h_max hold until h changes elsewhere


def _host_coefficients(stats, blocks: ParamBlocks, rows: list[int], block_sums, damping: float, update_interval: int):
    """The statistics' update, the root (when due) and the per-tensor factors ``lam_R`` and ``B_R P^T v`` of ``n``
    and ``r``, from the block sums ``(v, P^T n, P^T n^2)`` (float64, one row per tensor with a gradient), in numpy
    float64 on the host. ``U``, ``w`` and the cached root stay torch tensors of the state's dtype."""
    k = blocks.num_blocks
    if len(rows) < k:  # some tensors had no gradient: their blocks' sums are 0
        full = np.zeros((k, 3))
        full[rows] = block_sums
        block_sums = full
    v, n_sum, n_sq = block_sums.T
    U, w = stats["U"].numpy(), stats["w"].numpy()  # the state's memory: updated in place
    U += np.outer(n_sum, n_sum)
    w += n_sq
    due = stats["root_lam"] is None or (stats["step"] - stats["root_step"]) >= update_interval
    lam = B = None
    if due:
        consts = _root_constants(blocks.partition, torch.float64, torch.device("cpu"), numpy=True)
        try:
            lam, B = _inverse_root_formulas(np, U.astype(np.float64), w.astype(np.float64), consts, damping)
            root = torch.from_numpy(lam).to(stats["w"].dtype), torch.from_numpy(B).to(stats["w"].dtype)
        except np.linalg.LinAlgError:  # non-finite statistics (check_finite=False): torch's eigh gives NaN instead
            root = _normalised_inverse_root_torch(stats["U"], stats["w"], blocks.partition, damping)
        stats.update(root_lam=root[0], root_B=root[1], root_step=stats["step"])
    if lam is None or B is None:
        lam, B = (stats[key].double().numpy() for key in ("root_lam", "root_B"))
    return lam[rows], (B @ v)[rows]


def _ratio_scales(ws: Workspace, present, hs, extremes, eps: float, step: int) -> list[float]:
    """Per tensor with a gradient, the scale ``s`` of the ratio form, or ``0.0`` for the chain form; updates the
    bounds of ``h`` (:attr:`Workspace.h_max`: ``h_max + max|g|^2``, rounded up) of the tensors that can take it."""
    if not _cpu_kernels.available():
        return [0.0] * len(present)
    if ws.h_version != ws.h._version:  # h changed outside this path (another path, a loaded state): bound afresh
        ws.h_max.clear()
    scales = []
    for j, (i, h) in enumerate(zip(present, hs)):
        if h.numel() < RATIO_MIN_NUMEL:
            scales.append(0.0)
            continue
        low, high = extremes[2 * j], extremes[2 * j + 1]
        g_max = max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.inf
        bound = ws.h_max.get(i)
        if bound is None:
            bound = float(h.max())  # once per tensor and loaded state
        bound = (bound + g_max * g_max) * (1 + 2.0**-20)  # h + g^2 rounds up by less than one part in 2^23
        if math.isfinite(bound):
            ws.h_max[i] = bound
        else:
            ws.h_max.pop(i, None)
        if ws.chain_until.get(i, 0) > step:
            scales.append(0.0)
        else:
            scales.append(_cpu_kernels.ratio_scale(bound, g_max, eps, h.numel(), h.dtype))
    return scales


def _repair_and_unscale(ws: Workspace, block_sums, present, gs, hs, rs, scales, eps: float, step: int) -> None:
    """Recompute ``r`` from ``h`` for the ratio-form tensors whose ``P^T v`` is ``nan`` (a gradient entry was
    exactly 0), then divide the ratio form's block sums by ``sqrt(s)``, ``s`` and ``s^2`` (``block_sums``: a float64
    numpy array, one row per tensor)."""
    for j, s in enumerate(scales):
        if s and math.isnan(block_sums[j, 0]):
            i = present[j]
            _cpu_kernels.rescale_from_h(hs[j], rs[j], s, eps)
            ws.mask_zeros(i, hs[j], rs[j])
            block_sums[j, 0] = float(torch.dot(gs[j], rs[j]))
            ws.chain_until[i] = step + RATIO_RETRY_STEPS + 1  # the next RATIO_RETRY_STEPS steps
    factors = np.array([[s**-0.5, 1 / s, s**-2] if s else [1.0, 1.0, 1.0] for s in scales])
    block_sums *= factors


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
) -> None:
    del ws, mask  # the compiled passes need no buffers and always mask
    present = [i for i, g in enumerate(grads) if g is not None and blocks.segments[i] is not None]
    gs = [grads[i].neg() if maximize[i] else grads[i] for i in present]
    hs = [blocks.segments[i].as_rows(state_sum[blocks.bounds[i] : blocks.bounds[i + 1]]) for i in present]
    sums, finite = _fused.compiled("block_sums")(gs, hs, eps)
    if check_finite and not bool(finite):  # the step's one host synchronisation
        raise ValueError(_non_finite_message("BlockMeanAdagrad"))
    stats["step"] += 1
    first = blocks.first_block
    if len(present) < len(blocks.segments):  # some parameters had no gradient: their blocks' sums are 0
        full = sums.new_zeros(blocks.num_blocks, 3)
        row = 0
        for i in present:
            full[first[i] : first[i + 1]] = sums[row : row + first[i + 1] - first[i]]
            row += first[i + 1] - first[i]
        sums = full
    v_sums, n_sums, n_sq = sums.unbind(-1)
    _accumulate(stats, n_sums, n_sq)
    lam, B = preconditioner(
        stats, blocks.partition, damping=damping, update_interval=update_interval, correlation=correlation
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
) -> None:
    del check_finite  # checked by the caller
    stats["step"] += 1
    dtype, partition = state_sum.dtype, blocks.partition
    if ws.grad is None:
        ws.grad = torch.empty_like(state_sum)
    g = ws.grad
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
        ws.mask_zeros(-1, h, r)
    n_sums = partition.block_sum(n)
    _accumulate(stats, n_sums, partition.block_sum(n.square_()))
    lam, B = preconditioner(stats, partition, damping=damping, update_interval=update_interval, correlation=correlation)
    if ws.root is None or ws.root[0] != stats["root_step"] or ws.root[1].lam is not lam:
        ws.root = (stats["root_step"], BlockMeanLinearOperator(lam, B, partition))
    u = (ws.root[1] @ g.mul_(r)).mul_(r)  # z^{-1/2} R z^{-1/2} g: the operator's own product
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        p = params[i]
        if weight_decay[i]:
            p.mul_(1.0 - lr[i] * weight_decay[i])
        p.add_(u[blocks.bounds[i] : blocks.bounds[i + 1]].view(p.shape).to(p.dtype), alpha=-lr[i])
