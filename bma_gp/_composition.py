"""Recognising sums that stay in the closed-form family, in any order and nesting.

``M + DiagLinearOperator(d)`` starts in this package's ``__add__``, but ``DiagLinearOperator(d) + M``,
``LowRankRootLinearOperator(U) + M`` and GPyTorch's lazily evaluated kernel tensors start in
linear_operator's and GPyTorch's own ``__add__``, which would build a generic
:class:`~linear_operator.operators.SumLinearOperator` (dense Cholesky, or CG and Lanczos). :func:`install`
wraps those ``__add__`` methods (and ``add_diagonal`` of lazily evaluated kernel tensors; ``add_diagonal`` and the
constant multiple of the task layouts, ``BlockDiagLinearOperator`` / ``BlockInterleavedLinearOperator`` of a batch of
block mean operators, which ``W + DiagLinearOperator(d)`` already reaches through ``__add__``) so that
they hand the sum to :func:`add_structured` *only when one operand is a block mean operator* (or a
lazily evaluated kernel that contains a :class:`~bma_gp.BlockMeanKernel` or
:class:`~bma_gp.GroupKernel`); every other sum is left exactly as linear_operator builds it. A sum
with a summand outside the family becomes a :class:`FallbackSumLinearOperator`, which warns when a
solve or log-determinant actually runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import cast

import torch
from linear_operator import to_dense
from linear_operator.operators import (
    AddedDiagLinearOperator,
    BlockDiagLinearOperator,
    BlockInterleavedLinearOperator,
    BlockLinearOperator,
    ConstantMulLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    InterpolatedLinearOperator,
    KroneckerProductAddedDiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    MaskedLinearOperator,
    MatmulLinearOperator,
    PsdSumLinearOperator,
    RootLinearOperator,
    SumBatchLinearOperator,
    SumKroneckerLinearOperator,
    SumLinearOperator,
    ZeroLinearOperator,
)
from linear_operator.operators.diag_linear_operator import ConstantDiagLinearOperator
from linear_operator.utils.broadcasting import _matmul_broadcast_shape
from linear_operator.utils.getitem import _is_noop_index
from linear_operator.utils.memoize import cached
from torch import Tensor

from bma_gp._autograd import carries_tangent, functorch_wrapped, tracks_derivatives
from bma_gp._broadcast import batch_constants, shared_batch_entry
from bma_gp._indexing import TorchIndexing, check_floating
from bma_gp._lazy_root import LazyRoot
from bma_gp._pickling import PicklesWithoutCache
from bma_gp._precision import core_dtype
from bma_gp._warnings import ClosedFormFallbackWarning
from bma_gp.block_mean_linear_operator import (
    BlockMeanLinearOperator,
    _check_factor_size,
    _task_lookup,
    check_rhs,
    check_rhs_dtype,
    dense_svd,
)
from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator
from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator, dense_symeig, warned_diagonalization
from bma_gp.partition import Partition

__all__ = [
    "ClosedFormFallbackWarning",
    "FallbackIndexedLinearOperator",
    "FallbackMatmulLinearOperator",
    "FallbackSumLinearOperator",
    "add_structured",
    "closed_form",
    "install",
]


@dataclass
class _Parts:
    diag: list[Tensor] = field(default_factory=list)  # per point
    scalars: list[Tensor] = field(default_factory=list)  # one value per batch entry, shape (*batch, 1)
    lams: list[tuple[Partition, Tensor]] = field(default_factory=list)  # constant inside the blocks
    terms: list[tuple[Partition, Tensor | _Diagonal, Tensor | None]] = field(default_factory=list)
    roots: list = field(default_factory=list)  # tensors and LazyRoots
    sums: int = 0  # how many of this package's sums were collected (their roots are closed form already)


def _involves_block_mean(kernel) -> bool:
    from bma_gp.kernels import BlockMeanKernel, GroupKernel

    return any(isinstance(module, (BlockMeanKernel, GroupKernel)) for module in kernel.modules())


def _is_lazy_block_mean(op) -> bool:
    from gpytorch.kernels import InducingPointKernel, ScaleKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    if not isinstance(op, LazyEvaluatedKernelTensor):
        return False
    bare = op.kernel
    while isinstance(bare, ScaleKernel):
        bare = bare.base_kernel
    if isinstance(bare, InducingPointKernel):
        # an inducing-point kernel alone (scaled or not) evaluates to a low-rank root whatever its base kernel (a
        # block mean or group kernel only gives it K_XZ and K_ZZ): plus a noise, GPyTorch's own closed form
        # (Woodbury), which its SGPR prediction strategy reads. Routed to the package's sum, prediction raised
        # AttributeError (no ``_linear_op``)
        return False
    return _involves_block_mean(op.kernel) or _sums_inducing_points(op.kernel)


def _is_lazy_family_kernel(op) -> bool:
    """A lazily evaluated kernel alone (possibly in ``ScaleKernel`` wrappers) whose evaluation is in the closed-form
    family: an inducing-point kernel (a low-rank root, plus its diagonal correction in eval mode), a ``LinearKernel``
    (a root of the inputs' columns) or a ``ConstantKernel`` (one block of all points). A model that adds kernel
    outputs in its ``forward`` (``self.sgpr(x) + self.groups(x)``, the only way with the group ids as a second input)
    made a sum of lazy tensors where these had no place in the closed forms, though the same kernels added as kernels
    (``covar_module = sgpr + groups``) have one: GPyTorch's ``InducingPointKernel``, ``LinearKernel`` and
    ``ConstantKernel`` trained by a dense Cholesky of the ``n x n`` sum (CG and Lanczos past ``max_cholesky_size``),
    and a ``ChunkedInducingPointKernel`` predicted so, with a warning."""
    from gpytorch.kernels import ConstantKernel, InducingPointKernel, LinearKernel, ScaleKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    if not isinstance(op, LazyEvaluatedKernelTensor):
        return False
    kernel = op.kernel
    while isinstance(kernel, ScaleKernel):
        kernel = kernel.base_kernel
    return isinstance(kernel, (InducingPointKernel, LinearKernel, ConstantKernel))


def _scaled_constant(op) -> BlockMeanLinearOperator | None:
    """A square lazily evaluated ``ScaleKernel(ConstantKernel())`` (one or more ``ScaleKernel`` wrappers) as the block
    mean operator over one block of all points, ``B = outputscale * constant``, without evaluating it: GPyTorch's
    ``ScaleKernel`` multiplies the constant's expanded matrix by its outputscale, a dense ``n x n`` tensor (memory
    ``O(n^2)``) whose sum with a group kernel added in ``forward`` trained by a dense Cholesky, with a warning. None
    for anything else."""
    from gpytorch.kernels import ConstantKernel, ScaleKernel
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    if not isinstance(op, LazyEvaluatedKernelTensor) or op.last_dim_is_batch:
        return None
    kernel, scales = op.kernel, []
    while isinstance(kernel, ScaleKernel):
        scales.append(kernel.outputscale)
        kernel = kernel.base_kernel
    n = op.shape[-1]
    if not scales or not isinstance(kernel, ConstantKernel) or op.shape[-2] != n or n < 2:
        return None
    value = kernel.constant  # (*batch, 1)
    for scale in scales:
        value = value * scale.unsqueeze(-1)
    value = value.to(op.dtype).expand(*op.shape[:-2], 1)
    return BlockMeanLinearOperator(torch.zeros_like(value), value, Partition._whole(n, value.device), diagonal=True)


def _sums_inducing_points(kernel) -> bool:
    """Whether ``kernel`` (possibly scaled) is a sum with a ``ChunkedInducingPointKernel`` among its summands
    (``ChunkedInducingPointKernel + ConstantKernel``): evaluated, it is a low-rank root plus the other summands, a
    sum in the closed-form family or one that warns (GPyTorch's lazy sum went to CG and Lanczos past
    ``max_cholesky_size``, silently)."""
    from gpytorch.kernels import AdditiveKernel, ConstantKernel, InducingPointKernel, ProductKernel, ScaleKernel

    from bma_gp.kernels import ChunkedInducingPointKernel

    def bare(k):
        while isinstance(k, ScaleKernel):
            k = k.base_kernel
        return k

    kernel = bare(kernel)
    if isinstance(kernel, ProductKernel):
        # ChunkedInducingPointKernel * IndexKernel (a multitask SGPR, its factors scaled or not): evaluated, a low-rank
        # root plus a diagonal in eval mode, which plus the noise is linear_operator's Woodbury operator; GPyTorch's
        # lazy product plus the noise was a plain AddedDiagLinearOperator, solved by CG past max_cholesky_size
        # (variances 21-306x off)
        return any(isinstance(bare(part), ChunkedInducingPointKernel) for part in kernel.kernels)
    if not isinstance(kernel, AdditiveKernel):
        return False
    if any(isinstance(module, ChunkedInducingPointKernel) for module in kernel.modules()):
        return True
    # GPyTorch's own InducingPointKernel where its sum is in the closed-form family (plus other inducing-point kernels
    # and constants): evaluated, its roots and constants are a closed-form sum, which the likelihood's noise must join
    # as one, not as linear_operator's AddedDiagLinearOperator around the lazy sum. With an exact summand (an RBF
    # kernel) the sum stays GPyTorch's, as without bma_gp (its preconditioned CG, no warning about block means)
    return any(isinstance(module, InducingPointKernel) for module in kernel.modules()) and all(
        isinstance(bare(part), (InducingPointKernel, ConstantKernel)) for part in kernel.kernels
    )


def _is_lazy_kernel(op) -> bool:
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    return isinstance(op, LazyEvaluatedKernelTensor)


def _is_lazy_root(op) -> bool:
    """A low-rank root held as its inputs (``ChunkedInducingPointKernel`` in training), evaluated or lazily."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp.kernels import ChunkedInducingPointKernel

    if isinstance(op, RootLinearOperator):
        return isinstance(op.root, LazyRoot)
    return (
        isinstance(op, LazyEvaluatedKernelTensor)
        and op.kernel.training
        and any(isinstance(module, ChunkedInducingPointKernel) for module in op.kernel.modules())
    )


def add_lazy_root(left, right) -> LinearOperator | None:
    """``U U^T + D`` (``U`` a :class:`~bma_gp._lazy_root.LazyRoot`) as a :class:`BlockMeanSumLinearOperator`
    without partitions, so that its solve and log-determinant never form ``U``; None if it does not apply."""
    if not isinstance(right, DiagLinearOperator) or left.shape[-2:] != right.shape[-2:]:
        return None
    parts = _Parts()
    if not (_collect(left, parts) and _collect(right, parts)):
        return None
    if parts.terms or len(parts.roots) != 1 or not isinstance(parts.roots[0], LazyRoot):
        return None
    return _build(parts, left)


class _Diagonal:
    """A term's ``B`` held as its diagonal (from an operator built with ``diagonal=True``), so that a sum that
    is still one block mean matrix keeps it that way; :func:`_dense` forms the matrix where a sum needs it."""

    def __init__(self, values: Tensor):
        self.values = values  # (*batch, k)

    def __add__(self, other):
        if isinstance(other, _Diagonal):
            return _Diagonal(self.values + other.values)
        return _dense(self) + other

    def __radd__(self, other):
        return other + _dense(self)


def _dense(B) -> Tensor:
    return torch.diag_embed(B.values) if isinstance(B, _Diagonal) else B


def _block_mean(lam: Tensor, B: Tensor | _Diagonal, partition: Partition) -> BlockMeanLinearOperator:
    """The one-partition operator of a term, keeping a diagonal ``B`` as its values."""
    if isinstance(B, _Diagonal):
        return BlockMeanLinearOperator(lam, B.values, partition, diagonal=True)
    return BlockMeanLinearOperator(lam, B, partition)


def _is_ours(op) -> bool:
    return isinstance(
        op,
        (
            BlockMeanLinearOperator,
            BlockMeanSumLinearOperator,
            BlockMeanProductLinearOperator,
            FallbackMatmulLinearOperator,
        ),
    ) or _is_lazy_block_mean(op)


def _root_of_ours(op) -> LinearOperator | None:
    """The block mean operator or sum that ``op`` equals where ``op`` is one's own root as linear_operator holds it:
    ``M.root_decomposition()`` (``RootLinearOperator(M^{1/2})``, whose ``R R^T`` is a block mean operator over the
    same partition, in closed form) or a sum's (whose root knows the sum); ``None`` otherwise. Such a root plus a
    diagonal was linear_operator's ``AddedDiagLinearOperator`` (CG and Lanczos, silently: 16% off at n = 2,000), and
    plus a block mean operator its root was formed densely (a capacitance of size ``n + k``)."""
    if not isinstance(op, RootLinearOperator):
        return None
    root = op.root
    if isinstance(root, BlockMeanLinearOperator):
        product = root @ root.mT
        return product if isinstance(product, BlockMeanLinearOperator) and product.symmetric else None
    from bma_gp.block_mean_sum_linear_operator import _WoodburyRoot, _ZLRoot

    if isinstance(root, (_WoodburyRoot, _ZLRoot)) and not root.transposed:
        return root.parent
    return None


def _whole_or_itself(op):
    """:func:`_root_of_ours` of ``op`` where it has one, else ``op``."""
    whole = _root_of_ours(op)
    return op if whole is None else whole


def _holds_ours(op) -> bool:
    """A plain ``SumLinearOperator`` (built directly, say) with a block mean operator among its terms, or a sum that
    warns where it is factorised (GPyTorch's variational strategy in eval mode builds
    ``SumLinearOperator(K.add_jitter(), MatmulLinearOperator(...))`` around a fallback ``K``: the outer sum solved by
    CG without the warning the inner one gives)."""
    return type(op) is SumLinearOperator and any(
        _is_ours(term) or isinstance(term, _WarnsWhenFactorised) for term in op.linear_ops
    )


def _collect(op, parts: _Parts) -> bool:
    """Add the pieces of ``op`` to ``parts``; False if some summand has no place in the family."""
    if isinstance(op, ZeroLinearOperator):
        return True
    if isinstance(op, BlockMeanSumLinearOperator):
        parts.sums += 1
        parts.diag.append(op.diag_values)
        blocks = [_Diagonal(B) if flag else B for B, flag in zip(op._block_args, op.diagonal_blocks)]
        parts.terms.extend(zip(op.partitions, blocks, op.weights))
        if op._root_arg is not None:  # a lazy root stays lazy
            parts.roots.append(op._root_arg)
        return True
    if isinstance(op, BlockMeanLinearOperator):
        if not op.symmetric:
            return False
        lam, block = _offsets_and_block(op)
        parts.lams.append((op.partition, lam))
        parts.terms.append((op.partition, block, None))
        return True
    if isinstance(op, ConstantDiagLinearOperator):
        parts.scalars.append(op.diag_values)
        return True
    if isinstance(op, DiagLinearOperator):
        parts.diag.append(op._diag)
        return True
    if isinstance(op, LowRankRootAddedDiagLinearOperator):
        return _collect(op._linear_op, parts) and _collect(op._diag_tensor, parts)
    if isinstance(op, SumLinearOperator):  # also AddedDiagLinearOperator
        return all(_collect(term, parts) for term in op.linear_ops)
    if isinstance(op, RootLinearOperator):  # U U^T with any number of columns (the capacitance limit bounds it)
        whole = _root_of_ours(op)
        if whole is not None:  # a block mean operator's or sum's own root: the operator itself, not n x n
            return _collect(whole, parts)
        root = op.root
        if isinstance(root, LazyRoot):  # formed only if something other than a solve needs it
            parts.roots.append(root)
        else:
            parts.roots.append(root.to_dense() if isinstance(root, LinearOperator) else root)
        return True
    constant = _scaled_constant(op)
    if constant is not None:
        return _collect(constant, parts)
    if _is_lazy_block_mean(op) or _is_lazy_root(op) or _is_lazy_family_kernel(op):
        return _collect(op.evaluate_kernel(), parts)
    constant = _expanded_constant(op)
    if constant is not None:
        return _collect(constant, parts)
    return False


def _expanded_constant(op) -> BlockMeanLinearOperator | None:
    """A square ``DenseLinearOperator`` of one value per batch entry held as an expanded tensor (strides 0 over the
    matrix, what GPyTorch's ``ConstantKernel`` returns) as the block mean operator over one block of all points
    (``lam = 0``, ``B = c``): a term of rank one that sums take in closed form, where the dense summand made the sum a
    fallback (dense Cholesky, CG and Lanczos). None for anything else."""
    if type(op) is not DenseLinearOperator:
        return None
    t = op.tensor
    if not is_expanded_constant(t) or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2:
        return None
    values = _corner(t)  # (*batch, 1)
    return BlockMeanLinearOperator(
        torch.zeros_like(values), values, Partition._whole(t.shape[-1], t.device), diagonal=True
    )


def _corner(t: Tensor) -> Tensor:
    """``t[..., :1, 0]`` of an expanded constant, read from the tensor it was expanded from where it is a view: the
    backward of a slice of the expanded ``n x n`` tensor allocates its whole gradient, ``n x n`` (a user trial: 320 GB
    asked for at n = 2e5 by ``ConstantKernel() + GroupKernel``), while ``as_strided`` of the view's base allocates the
    base's. # shape: (*batch, 1)"""
    base = t._base
    if base is None:
        return t[..., :1, 0]
    return torch.as_strided(base, (*t.shape[:-2], 1), (*t.stride()[:-2], 0), t.storage_offset())


def is_expanded_constant(t: Tensor) -> bool:
    """A floating tensor of one value per batch entry held expanded over its last two dimensions (strides 0, or a
    dimension of size 1: a single test point): what GPyTorch's ``ConstantKernel`` returns, between the same or
    different inputs."""
    if t.dim() < 2 or not t.is_floating_point() or t.shape[-2:].numel() < 2:
        return False
    return all(t.stride(d) == 0 or t.shape[d] == 1 for d in (-1, -2))


def _hooked_scale_forward(original):
    """GPyTorch's ``ScaleKernel.forward`` around a ``ConstantKernel`` (possibly in more ``ScaleKernel`` wrappers)
    returning the scaled constant held expanded, one value per batch entry with strides 0 over the matrix, as
    ``ConstantKernel`` returns its own: GPyTorch multiplies the constant's expanded matrix by the outputscale, a dense
    ``n x n`` tensor, so ``ScaleKernel(ConstantKernel()) + GroupKernel(k)`` (a kernel sum, an intercept variance plus
    random effects) was a fallback sum that trained by a dense Cholesky with a warning, where ``ConstantKernel() +
    GroupKernel(k)`` was closed form. The values, dtype (torch's promotion of the constant and the outputscale),
    device and shape are the original's; every other base kernel, and ``diag=True``, run the original."""
    from gpytorch.kernels import ConstantKernel, ScaleKernel

    @functools.wraps(original)
    def forward(self, x1, x2, last_dim_is_batch=False, diag=False, **params):
        base = self.base_kernel
        while isinstance(base, ScaleKernel):
            base = base.base_kernel
        if diag or not isinstance(base, ConstantKernel):
            return original(self, x1, x2, last_dim_is_batch=last_dim_is_batch, diag=diag, **params)
        inner = self.base_kernel.forward(x1, x2, diag=False, last_dim_is_batch=last_dim_is_batch, **params)
        scale = self.outputscale
        if last_dim_is_batch:
            scale = scale.unsqueeze(-1)
        scale = scale.view(*scale.shape, 1, 1)
        if not isinstance(inner, Tensor) or not is_expanded_constant(inner):
            # a ConstantKernel subclass's own matrix: GPyTorch's product with the outputscale, of the matrix evaluated
            # above (calling the original evaluated the base kernel a second time: twice the cost of a dense subclass,
            # and a second draw of a random one)
            return inner.mul(scale)
        shape = torch.broadcast_shapes(inner.shape, scale.shape)
        # the corner read from the tensor the constant was expanded from (a slice of the expanded matrix would
        # allocate its whole n x n gradient in backward): (*batch, 1, 1), expanded again without a copy
        value = _corner(inner).unsqueeze(-1) * scale
        return value.expand(shape)

    forward._bma_gp_original = original
    return forward


def _offsets_and_block(op: BlockMeanLinearOperator) -> tuple[Tensor, Tensor | _Diagonal]:
    """``lam`` and the block matrix of ``op`` for a sum. Of a singleton block only ``lam_i + B_ii`` is visible, so a
    negative ``lam_i`` is valid there; it moves into ``B_ii``, so that the sum's per-point diagonal holds only
    what the other terms put there (the sums' closed forms need it positive). One host read per operator."""
    lam, b = op.lam, op._b_diag
    single = op.partition.sizes.to(lam.device) == 1
    moved = torch.where(single & (lam < 0), lam, torch.zeros_like(lam))
    if moved.is_meta or not bool(moved.any()):  # (meta tensors hold no values: shapes only)
        return lam, op.B if b is None else _Diagonal(b)
    lam = lam - moved
    return lam, op.B + torch.diag_embed(moved) if b is None else _Diagonal(b + moved)


def _unify(parts: _Parts, like: LinearOperator) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the sum of the collected pieces, every piece cast to that dtype in place: the one
    torch's type promotion gives (as for ``a + b`` of two tensors; a sum over one partition, ``M1 + M2``, adds
    its ``lam`` and ``B`` that way too). Summands on different devices raise a ``ValueError`` that names them."""
    tensors = [*parts.diag, *parts.scalars, *(lam for _, lam in parts.lams), *parts.roots]
    tensors += [B.values if isinstance(B, _Diagonal) else B for _, B, _ in parts.terms]
    devices = list(dict.fromkeys(str(t.device) for t in tensors))
    if len(devices) > 1:
        raise ValueError(
            f"the summands of this sum are on different devices ({', '.join(devices)}): move them to one device "
            "with .to(device) before adding them."
        )
    if not tensors:
        return like.dtype, like.device
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))

    def cast(t):
        if t.dtype == dtype:
            return t
        return t.materialize().to(dtype) if isinstance(t, LazyRoot) else t.to(dtype)

    parts.diag = [cast(t) for t in parts.diag]
    parts.scalars = [cast(t) for t in parts.scalars]
    parts.lams = [(p, cast(lam)) for p, lam in parts.lams]
    parts.roots = [cast(r) for r in parts.roots]
    parts.terms = [
        (p, _Diagonal(cast(B.values)) if isinstance(B, _Diagonal) else cast(B), w) for p, B, w in parts.terms
    ]
    return dtype, tensors[0].device


class _ExpandBlocks(torch.autograd.Function):
    """:math:`P y`, one value per block broadcast to every index, whose backward pass keeps no saved tensor: the
    partition rides on ``ctx`` (torch's ``index_select`` saves its index, and autograd frees saved tensors after a
    backward pass). A sum folds its ``lam`` into the per-point diagonal when it is built, so that node is shared by
    every loss taken from the operator: a second loss's backward (``(S @ x).sum().backward()`` then
    ``S.solve(x).sum().backward()``) raised "Trying to backward through the graph a second time", where
    linear_operator's own sums allow it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(values: Tensor, partition: Partition) -> Tensor:
        return partition.expand(values, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.partition = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.partition.block_sum(grad, dim=-1), None

    @staticmethod
    def jvp(ctx, values_t: Tensor, _partition_t) -> Tensor:
        return ctx.partition.expand(values_t, dim=-1)


def _expand_blocks(partition: Partition, values: Tensor) -> Tensor:
    """:math:`P y` along the last dimension; through :class:`_ExpandBlocks` where derivatives are tracked."""
    if tracks_derivatives(values):
        return _ExpandBlocks.apply(values, partition)
    return partition.expand(values, dim=-1)


def _build(parts: _Parts, like: LinearOperator) -> LinearOperator:
    """The smallest closed-form operator for the collected pieces."""
    n = like.shape[-1]
    dtype, device = _unify(parts, like)
    if not parts.diag and not parts.roots and len(parts.terms) == 1 and parts.terms[0][2] is None:
        # one partition, offsets constant in its blocks by construction (lam, a scalar noise): still one
        # block mean matrix, whatever needs gradients
        part, B, _ = parts.terms[0]
        lam: Tensor | None = None
        for p, value in parts.lams:
            if not p.same_as(part):
                break
            lam = value if lam is None else lam + value
        else:
            lam = torch.zeros(part.num_blocks, dtype=dtype, device=device) if lam is None else lam
            for c in parts.scalars:
                lam = lam + c
            return _block_mean(lam, B, part)  # (the operator broadcasts lam's batch against B's)
    diag = None
    pieces = [*parts.diag, *(_expand_blocks(p, lam) for p, lam in parts.lams)]
    for d in pieces:
        diag = d if diag is None else diag + d
    if diag is None:
        diag = torch.zeros(n, dtype=dtype, device=device)
    for c in parts.scalars:
        diag = diag + c
    # one term per distinct (unweighted) partition
    terms: list[tuple[Partition, Tensor | _Diagonal, Tensor | None]] = []
    for part, B, w in parts.terms:
        for i, (p2, B2, w2) in enumerate(terms):
            if w is None and w2 is None and p2.same_as(part):
                terms[i] = (p2, B2 + B, None)
                break
        else:
            terms.append((part, B, w))
    root = None
    if parts.roots:
        if len(parts.roots) == 1:
            root = parts.roots[0]
        else:
            tensors = [r.materialize() if isinstance(r, LazyRoot) else r for r in parts.roots]
            batch = torch.broadcast_shapes(*(r.shape[:-2] for r in tensors))
            root = torch.cat([r.expand(*batch, *r.shape[-2:]) for r in tensors], dim=-1)
    if root is None and len(terms) == 1 and terms[0][2] is None:
        single = _as_block_mean(parts, terms[0][0], terms[0][1])
        if single is not None:
            return single
    diag = _singletons_into_diagonal(diag, terms)
    return BlockMeanSumLinearOperator(
        diag,
        *(B.values if isinstance(B, _Diagonal) else B for _, B, _ in terms),
        partitions=[p for p, _, _ in terms],
        root=root,
        weights=[w for _, _, w in terms],
        diagonal=[isinstance(B, _Diagonal) for _, B, _ in terms],
    )


def _singletons_into_diagonal(diag: Tensor, terms: list[tuple[Partition, Tensor | _Diagonal, Tensor | None]]) -> Tensor:
    r"""The sum's per-point diagonal with a share of singleton blocks' ``B_ii`` moved into it where it would be
    ``<= 0`` there; ``terms`` (unweighted ones) lose that share from ``B_ii``, in place. The matrix is the same.

    A singleton block's point sees ``d + B_ii`` only, however it is split, so a block mean operator may hold
    ``lam_i <= 0`` there (:func:`_offsets_and_block` moves a negative one into ``B_ii``); the sum's closed forms
    divide by ``d``. Where ``d <= 0 < d + B_ii`` at such a point, both become :math:`(d + B_ii) / 2`, but only
    where that leaves every entry of ``d`` positive: a sum with ``d = 0`` at other points keeps its diagonal (with
    ``d = 0`` everywhere it is :math:`Z G Z^\top`, whose root needs no ``d``). Host reads: one per term over a
    partition with singletons, one more where something moves."""
    if diag.is_meta:  # no values to read (shapes only)
        return diag
    moved = list(terms)
    new = diag
    for t, (part, B, w) in enumerate(terms):
        if w is not None:
            continue
        single = part.sizes.to(diag.device) == 1
        if not bool(single.any()):
            continue
        b = B.values if isinstance(B, _Diagonal) else torch.diagonal(B, dim1=-2, dim2=-1)
        at = part.block_sum(new, dim=-1)  # a singleton's sum is the value at its point
        with torch.no_grad():
            move = single & (at <= 0) & (at + b > 0)
            if not bool(move.any()):
                continue
        shift = torch.where(move, (b - at) * 0.5, torch.zeros_like(b))
        new = new + part.expand(shift, dim=-1)
        moved[t] = (part, _Diagonal(b - shift) if isinstance(B, _Diagonal) else B - torch.diag_embed(shift), None)
    if new is diag or not bool((new.detach() > 0).all()):
        return diag
    terms[:] = moved
    return new


def _as_block_mean(parts: _Parts, partition: Partition, B: Tensor | _Diagonal) -> BlockMeanLinearOperator | None:
    """A diagonal constant inside every block keeps the single-partition operator and all its matrix
    functions. The offsets constant in the blocks by construction (the operator's own ``lam``, a scalar noise) are
    added to ``lam`` whatever needs gradients; the per-point rest (a fixed noise vector, offsets over other
    partitions) only when it needs no gradient (gradients of individual entries differ) and carries no forward-mode
    tangent or ``torch.func`` wrapper (tangents of individual entries differ too)."""
    lam = None
    rest = list(parts.diag)
    for p, value in parts.lams:
        if p.same_as(partition):
            lam = value if lam is None else lam + value
        else:
            rest.append(p.expand(value, dim=-1))
    for c in parts.scalars:
        lam = c if lam is None else lam + c
    if rest:
        diag = rest[0]
        for d in rest[1:]:
            diag = diag + d
        if (torch.is_grad_enabled() and diag.requires_grad) or carries_tangent(diag) or diag.is_meta:
            # (a dual tensor or a torch.func input reports requires_grad=False, and its tangent may differ per point;
            # a meta tensor holds no values to compare: the general sum, as for a diagonal that varies)
            return None
        # the largest and smallest entry of each block: equal exactly when d is constant there (an average of equal
        # entries need not round back to them: 7 entries of 0.1 average to 0.1 + 1 ulp)
        index = partition.labels.expand_as(diag)
        shape = (*diag.shape[:-1], partition.num_blocks)
        high = diag.new_zeros(shape).scatter_reduce(-1, index, diag, "amax", include_self=False)
        low = diag.new_zeros(shape).scatter_reduce(-1, index, diag, "amin", include_self=False)
        if not bool((high == low).all()):
            return None
        lam = high if lam is None else lam + high
    if lam is None:
        return None
    if lam.shape[-1] != partition.num_blocks:  # scalars alone, shape (*batch, 1)
        lam = lam.expand(*lam.shape[:-1], partition.num_blocks)
    return _block_mean(lam, B, partition)


def add_structured(left, right) -> LinearOperator | None:
    """``left + right`` as a closed-form operator, or ``None`` when a summand has no closed form."""
    if isinstance(right, Tensor) or not isinstance(right, LinearOperator):
        return None
    if left.shape[-2:] != right.shape[-2:]:
        return None
    parts = _Parts()
    if not (_collect(left, parts) and _collect(right, parts)):
        return None
    if not parts.terms and len(parts.roots) < 2 and not parts.sums:
        # one root plus diagonals: linear_operator's Woodbury operator (a sum of roots alone, already one of ours,
        # evaluated or lazily, stays ours: it fell to a warned fallback)
        return None
    return _build(parts, left)


def add_low_rank(op: LinearOperator, low_rank_mat) -> LinearOperator | None:
    """``op.add_low_rank(U)``, ``op + U U^T``, as ``op + LowRankRootLinearOperator(U)`` in closed form; ``None``
    when that sum has none (the caller then takes linear_operator's path, which warns on solves)."""
    from linear_operator.operators import LowRankRootLinearOperator

    if not (torch.is_tensor(low_rank_mat) or isinstance(low_rank_mat, LinearOperator)) or low_rank_mat.dim() < 2:
        return None
    return add_structured(op, LowRankRootLinearOperator(low_rank_mat))


def closed_form(op: LinearOperator) -> LinearOperator:
    """Rewrite a (possibly nested, possibly lazily evaluated) sum as this package's closed-form operator.

    Args:
        op: a sum of block mean operators, diagonals and low-rank roots, in any nesting
            (``SumLinearOperator``, ``AddedDiagLinearOperator``, GPyTorch's lazily evaluated kernels).

    Returns:
        A :class:`~bma_gp.BlockMeanLinearOperator` (one partition, a diagonal constant in every block) or
        a :class:`~bma_gp.BlockMeanSumLinearOperator` (with no partitions for a sum of diagonals and low-rank
        roots alone).

    Raises:
        TypeError: ``op`` is not a ``LinearOperator`` or a tensor.
        ValueError: a summand is not a block mean operator, a diagonal or a low-rank root.
    """
    if not isinstance(op, (LinearOperator, Tensor)):
        raise TypeError(
            f"closed_form needs a LinearOperator (a sum of block mean operators, ...), got {type(op).__name__}."
        )
    parts = _Parts()
    if not _collect(op, parts) or not (parts.terms or parts.diag or parts.scalars or parts.roots):
        raise ValueError(
            f"{type(op).__name__} of shape {tuple(op.shape)} is not a sum of block mean operators, diagonals and "
            "low-rank roots (the family with closed forms), so it has no closed-form solve."
        )
    return _build(parts, op)


def _known_nonsymmetric(op) -> bool:
    """Whether ``op`` is one of this package's operators that is not symmetric (a block mean operator built with
    ``symmetric=False``, a product over two partitions, or a fallback made of one)."""
    if isinstance(op, BlockMeanProductLinearOperator):
        return True
    if isinstance(op, BlockMeanLinearOperator):
        return not op.symmetric
    if isinstance(op, _WarnsWhenFactorised):
        return op._nonsymmetric()
    if isinstance(op, (BlockLinearOperator, SumBatchLinearOperator, ConstantMulLinearOperator)):
        # linear_operator's block-diagonal and interleaved layouts, batch sums and constant multiples of such an
        # operator are not symmetric either
        return _known_nonsymmetric(op.base_linear_op)
    if isinstance(op, InterpolatedLinearOperator):
        return _different_sides(op) or _known_nonsymmetric(op.base_linear_op)
    if isinstance(op, SumLinearOperator):  # (rows and columns of a sum regroup its parts into nested plain sums)
        return any(_known_nonsymmetric(term) for term in op.linear_ops)
    if isinstance(op, AddedDiagLinearOperator):
        return _known_nonsymmetric(op._linear_op)
    return False


def _visibly_nonsymmetric(t: Tensor) -> bool:
    """Whether the dense square matrix ``t`` differs from its transpose by more than rounding (``sqrt(eps)`` of its
    largest entry: a kernel matrix evaluated densely need not be symmetric to the last bit)."""
    if t.is_meta or t.shape[-1] != t.shape[-2]:
        return t.shape[-1] != t.shape[-2]
    if not t.numel():
        return False
    t = t.detach()
    n = t.shape[-1]
    tol = math.sqrt(torch.finfo(t.dtype).eps) * t.abs().amax() if t.is_floating_point() else 0
    rows = max(1, 2**22 // max(1, n * t[..., 0, 0].numel()))  # row blocks: no n x n temporaries beside the matrix
    for start in range(0, n, rows):
        part = t[..., start : start + rows, :]
        if bool(((part - t[..., :, start : start + rows].mT).abs() > tol).any()):
            return True
    return False


def _stored_nonsymmetric(op) -> bool:
    """Whether ``op``, a summand of a fallback sum, is one of linear_operator's operators that hold their matrix
    densely and hold one that is not symmetric (a ``TriangularLinearOperator``, a ``DenseLinearOperator`` of a
    non-symmetric matrix): linear_operator's solvers assume symmetry, and a sum with one was solved by a Cholesky
    factor of one triangle (3-10% off, silently). One ``O(n^2)`` read of a matrix that is ``n x n`` already."""
    from linear_operator.operators import TriangularLinearOperator

    if isinstance(op, TriangularLinearOperator):
        return _visibly_nonsymmetric(to_dense(op))
    if type(op) is DenseLinearOperator:
        return _visibly_nonsymmetric(op.tensor)
    return False


def _different_sides(op: InterpolatedLinearOperator) -> bool:
    """Whether an interpolated operator takes other rows than columns (``M[[1, 0]][:, [1, 2]]``): a square submatrix
    of a symmetric matrix that is in general not symmetric."""
    rows, cols = op.left_interp_indices, op.right_interp_indices
    if rows.shape[-2:] != cols.shape[-2:]:
        return True
    return not (bool((rows == cols).all()) and bool((op.left_interp_values == op.right_interp_values).all()))


def _hooked_svd(original):
    """``LinearOperator._svd``: of an operator known not to be symmetric (a layout or batch sum of products over two
    partitions, :func:`_known_nonsymmetric`), the dense SVD with a warning; linear_operator's takes the absolute
    eigenvalues of a symmetric eigendecomposition, which reads one triangle (singular values 2-4% off, silently)."""

    @functools.wraps(original)
    def _svd(self):
        if _known_nonsymmetric(self):
            return dense_svd(self, "that is not symmetric", "it holds an operator that is not symmetric")
        return original(self)

    _svd._bma_gp_original = original
    return _svd


# set while a warned generic path of a _WarnsWhenFactorised runs: the Cholesky factor that path takes (of the operator
# linear_operator's autograd functions rebuild from its representation: another object) is part of what its warning
# already announced, and says nothing again
_ANNOUNCED: contextvars.ContextVar[bool] = contextvars.ContextVar("_bma_gp_announced", default=False)


@contextlib.contextmanager
def _raised(flag: contextvars.ContextVar[bool]):
    """``flag`` set for the extent of the block (and put back after it)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def _announced():
    return _raised(_ANNOUNCED)


def _generic_path(what: str) -> str:
    """What linear_operator does for ``what`` where a fallback operator has no closed form (for its warning)."""
    if what == "sqrt_inv_matmul":
        return "linear_operator's contour-integral quadrature (CG and MINRES: iterative and approximate, at every size)"
    return "linear_operator's generic path (dense Cholesky up to max_cholesky_size, CG and Lanczos beyond)"


class _WarnsWhenFactorised(TorchIndexing):
    """Solves, log-determinants and roots that say with a :class:`ClosedFormFallbackWarning` that they take
    linear_operator's generic path (products stay silent); ``_warn(what)`` words it.

    linear_operator's solvers (Cholesky, CG, Lanczos) assume a symmetric matrix. Where a part is known not to be
    symmetric (:meth:`_nonsymmetric`), solves and log-determinants factorise the dense matrix with LU instead (with
    a warning that says so; torch.logdet's semantics: nan for a negative determinant), and roots raise."""

    def _warn(self, what: str) -> None:
        raise NotImplementedError

    def _say(self, what: str) -> None:
        """:meth:`_warn`, unless an enclosing call of this operator's already did (``logdet`` runs through
        linear_operator's ``inv_quad_logdet``: one warning, not two)."""
        if not _ANNOUNCED.get():
            self._warn(what)

    def _nonsymmetric(self) -> bool:
        return False

    def _why_nonsymmetric(self) -> str:
        return "it holds a product of block mean operators over two partitions, or one built with symmetric=False"

    def _warn_dense_lu(self, what: str) -> None:
        n = cast(LinearOperator, self).shape[-1]  # a mixin of LinearOperator subclasses
        warnings.warn(
            f"{what} of a {type(self).__name__} that is not symmetric ({self._why_nonsymmetric()}): no closed form, "
            "and linear_operator's solvers assume symmetry, so the dense n x n matrix "
            f"(n = {n}) is factorised with LU.",
            ClosedFormFallbackWarning,
            stacklevel=3,
        )

    def _warn_cholesky(self) -> None:
        self._say("cholesky")

    def _symmetric_after_all(self) -> bool:
        """Whether the dense matrix of an operator known to hold a non-symmetric part is symmetric all the same, to
        ``sqrt(eps)`` of its largest entry: linear_operator forms products that are, such as a Kronecker factor
        whitened as ``L^{-1} A L^{-T}``. Read only where the dense matrix is factorised anyway (``_symeig``,
        ``_cholesky``)."""
        dense = cast(LinearOperator, self).to_dense()
        tol = torch.finfo(dense.dtype).eps ** 0.5 * dense.abs().amax()
        return bool((dense - dense.mT).abs().amax() <= tol)

    def _no_root(self, what: str):
        raise ValueError(
            f"{what} of a {type(self).__name__} that is not symmetric ({self._why_nonsymmetric()}): a non-symmetric "
            "matrix has no such root, Cholesky factor or real spectrum (solve, logdet, inv_quad and svd factorise the "
            "dense matrix, with a warning)."
        )

    def solve(self, right_tensor, left_tensor=None):
        if self._nonsymmetric():
            check_rhs_dtype(right_tensor, "right_tensor", self.dtype)
            if left_tensor is not None:
                check_rhs_dtype(left_tensor, "left_tensor", self.dtype)
            self._warn_dense_lu("solve")
            vector = right_tensor.dim() == 1  # as a column: a batched S^{-1} v is a batch of columns
            res = torch.linalg.solve(self.to_dense(), right_tensor.unsqueeze(-1) if vector else right_tensor)
            if left_tensor is not None:
                res = left_tensor @ res
            return res.squeeze(-1) if vector else res
        self._say("solve")
        with _announced():
            return super().solve(right_tensor, left_tensor)

    @staticmethod
    def _lu_inv_quad(dense: Tensor, rhs: Tensor, reduce_inv_quad: bool) -> Tensor:
        """``b^T A^{-1} b`` per column of ``rhs`` (a vector: one column) by an LU solve with the dense matrix."""
        rhs = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
        res = (rhs * torch.linalg.solve(dense, rhs)).sum(-2)
        return res.sum(-1) if reduce_inv_quad else res

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        if self._nonsymmetric():
            if inv_quad_rhs is not None:
                check_rhs_dtype(inv_quad_rhs, "inv_quad_rhs", self.dtype)
            self._warn_dense_lu("inv_quad_logdet")
            dense = self.to_dense()
            inv_quad = torch.zeros((), dtype=self.dtype, device=self.device)
            if inv_quad_rhs is not None:
                inv_quad = self._lu_inv_quad(dense, inv_quad_rhs, reduce_inv_quad)
            return inv_quad, (torch.logdet(dense) if logdet else torch.zeros((), dtype=self.dtype, device=self.device))
        self._say("inv_quad_logdet")
        with _announced():
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)

    def inv_quad(self, inv_quad_rhs, reduce_inv_quad=True):
        # linear_operator's inv_quad solves with a Cholesky factor (or CG) of its own, past inv_quad_logdet
        if self._nonsymmetric():
            check_rhs_dtype(inv_quad_rhs, "inv_quad_rhs", self.dtype)
            self._warn_dense_lu("inv_quad")
            return self._lu_inv_quad(self.to_dense(), inv_quad_rhs, reduce_inv_quad)
        self._say("inv_quad")
        with _announced():
            return super().inv_quad(inv_quad_rhs, reduce_inv_quad)

    def logdet(self):
        if self._nonsymmetric():
            self._warn_dense_lu("logdet")
            return torch.logdet(self.to_dense())
        self._say("logdet")
        with _announced():
            return super().logdet()

    def root_decomposition(self, method=None):
        if self._nonsymmetric():
            self._no_root("root_decomposition")
        self._say("root_decomposition")
        with _announced():
            return super().root_decomposition(method)

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method=None):
        if self._nonsymmetric():
            self._no_root("root_inv_decomposition")
        self._say("root_inv_decomposition")
        with _announced():
            return super().root_inv_decomposition(initial_vectors, test_vectors, method)

    def _cholesky(self, upper=False):
        if self._nonsymmetric() and not self._symmetric_after_all():  # psd_safe_cholesky reads one triangle
            self._no_root("cholesky")
        # a Cholesky factor asked for itself (op.cholesky(), a MultivariateNormal's scale_tril: log_prob under
        # fast_computations(log_prob=False), rsample) is the dense matrix's: say so, as solve and logdet do on every
        # call (inside their own generic path it is part of what they announced)
        if not _ANNOUNCED.get():
            self._warn_cholesky()
        with _announced():
            return super()._cholesky(upper)

    def sqrt_inv_matmul(self, rhs, lhs=None):
        if self._nonsymmetric():
            self._no_root("sqrt_inv_matmul")
        self._say("sqrt_inv_matmul")
        with _announced():
            return super().sqrt_inv_matmul(rhs, lhs)

    def diagonalization(self, method=None):
        if self._nonsymmetric():
            self._no_root("diagonalization")
        return warned_diagonalization(self, super().diagonalization, method)

    def add_diagonal(self, diag):
        # linear_operator's AddedDiagLinearOperator around this operator solved it silently (by Cholesky, whatever its
        # symmetry): a fallback sum, which warns and knows a non-symmetric summand
        return _as_fallback(super().add_diagonal(diag))

    def __add__(self, other):
        # A + D, A + dense, A + tensor (and D + A, which linear_operator builds as AddedDiagLinearOperator(A, D) and
        # _routed_construction turns into A + D): a fallback sum, not linear_operator's plain sum, which solved by
        # Cholesky (of one triangle of a non-symmetric A) or CG without a word
        if adds_exactly(other) and not adds_exactly(self):
            return other.__add__(self)
        res = fallback_sum(self, other)  # (not linear_operator's sum: its add_low_rank took roots of this operator)
        if res is None:  # a number or a vector
            vector = torch.is_tensor(other) and other.dim() == 1  # added to every row: not symmetric
            if torch.is_tensor(other) and (vector or self._nonsymmetric()):
                # linear_operator's sum of the dense matrix was solved by Cholesky of one triangle (6.6% off), silently
                dense = cast(LinearOperator, self).to_dense() + other
                if dense.shape[-1] == dense.shape[-2]:
                    return FallbackDenseLinearOperator(dense)
            return _as_fallback(super().__add__(other))
        parts = [
            p for op in res.linear_ops for p in (op.linear_ops if type(op) is FallbackSumLinearOperator else (op,))
        ]
        return FallbackSumLinearOperator(*parts)

    def __radd__(self, other):
        return self.__add__(other)

    def _sum_batch(self, dim: int) -> LinearOperator:
        """The sum over batch dimension ``dim``, as a :class:`FallbackSumLinearOperator` of the batch entries where
        linear_operator's would drop the warning (its ``SumBatchLinearOperator`` and interpolated operators solve
        silently)."""
        res = super()._sum_batch(dim)  # type: ignore[misc]  # a mixin of LinearOperator subclasses
        if isinstance(res, _WarnsWhenFactorised):
            return res
        prefix = (slice(None),) * dim
        entries = [cast(LinearOperator, self)[(*prefix, i)] for i in range(cast(LinearOperator, self).shape[dim])]
        return entries[0] if len(entries) == 1 else FallbackSumLinearOperator(*entries)

    def _symeig(self, eigenvectors=False, return_evals_as_lazy=False):
        if self._nonsymmetric() and not self._symmetric_after_all():  # eigh reads one triangle: another spectrum
            self._no_root("a symmetric eigendecomposition")
        return dense_symeig(self, eigenvectors)  # warns; keeps negative eigenvalues (linear_operator clamps them)

    def _svd(self):
        if self._nonsymmetric():  # linear_operator's svd goes through the symmetric eigendecomposition
            return dense_svd(self, "that is not symmetric", self._why_nonsymmetric())
        return super()._svd()


class FallbackSumLinearOperator(_WarnsWhenFactorised, SumLinearOperator):
    """A sum of a block mean operator and a summand outside the closed-form family (an exact kernel, a dense
    matrix). It multiplies like any sum; its solves, log-determinants and roots take linear_operator's generic
    path, and say so with a :class:`ClosedFormFallbackWarning` when they run (a product, such as a posterior
    covariance that is only ever multiplied, stays silent)."""

    def _nonsymmetric(self) -> bool:
        found = self.__dict__.get("_bma_gp_nonsymmetric")
        if found is None:  # (one O(n^2) read of a stored matrix per operator, not per solve)
            found = self.__dict__["_bma_gp_nonsymmetric"] = any(
                _known_nonsymmetric(op) or _stored_nonsymmetric(op) for op in self.linear_ops
            )
        return found

    def _why_nonsymmetric(self) -> str:
        for op in self.linear_ops:
            if not _known_nonsymmetric(op) and _stored_nonsymmetric(op):
                return f"it holds a {type(op).__name__} whose matrix is not symmetric"
        return super()._why_nonsymmetric()

    def _warn(self, what: str) -> None:
        names = " + ".join(type(op).__name__ for op in self.linear_ops)
        why = (
            "one summand is not a block mean operator, a diagonal or a low-rank root, so this sum has no closed form"
            if len(self.linear_ops) > 1
            else "the matrix formed by an operation without a closed form (an elementwise product, say), which "
            "warned when it was formed"
        )
        hint = (
            " For a closed form, approximate the exact summand (wrap an exact kernel in BlockMeanKernel, or use "
            "ChunkedInducingPointKernel for SGPR: both sum with groupings in closed form); for exact values at this "
            "size, raise gpytorch.settings.max_cholesky_size past n (a dense Cholesky, not CG)."
            if len(self.linear_ops) > 1 and what != "sqrt_inv_matmul"
            else ""
        )
        warnings.warn(
            f"{what} of {names}: {why}; {_generic_path(what)} is used.{hint}",
            ClosedFormFallbackWarning,
            stacklevel=3,
        )

    def _preconditioner(self):
        """linear_operator's preconditioner for CG where one summand is a diagonal (the likelihood's noise): the
        pivoted-Cholesky one of ``AddedDiagLinearOperator(rest, diag)``, which linear_operator's sum builds where this
        one does not (past ``min_preconditioning_size`` points CG then ran unpreconditioned: predictive variances
        350x less accurate at n = 3000). Kept for this operator's lifetime, as linear_operator keeps its own."""
        diags = [op for op in self.linear_ops if isinstance(op, DiagLinearOperator)]
        rest = [op for op in self.linear_ops if not isinstance(op, DiagLinearOperator)]
        if len(diags) != 1 or not rest:
            return super()._preconditioner()
        added = self.__dict__.get("_bma_gp_added_diag")
        if added is None:
            with _raised(_ROUTING):  # linear_operator's own operators, not this module's routing back to this sum
                base = rest[0] if len(rest) == 1 else SumLinearOperator(*rest)
                added = AddedDiagLinearOperator(base, diags[0])
            self.__dict__["_bma_gp_added_diag"] = added
        return added._preconditioner()

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # a batch entry or a slice (mvn[..., a:b]) is a sum of the summands' parts: still no closed form, still warns
        return _as_fallback(super()._getitem(row_index, col_index, *batch_indices))

    def _mul_matrix(self, other):
        """The elementwise product, formed densely: this sum holds a dense summand (its matrix is ``n x n`` anyway), and
        linear_operator's product of the factors' roots took a jittered Cholesky root of the sum, which changed the
        product's entries (2.6e-8 of 1 in float64 for ``(GroupKernel + ScaleKernel(RBF)) * IndexKernel``, 0.53 nats of
        log-density at noise 1e-3, where GPyTorch's dense sum multiplies exactly). A diagonal ``other`` keeps
        linear_operator's diagonal product."""
        if isinstance(other, DiagLinearOperator):
            return super()._mul_matrix(other)
        return _dense_elementwise(self, other)


def _dense_elementwise(left: LinearOperator, right) -> LinearOperator:
    """``left * right`` formed densely, for a ``left`` whose dense matrix is formed anyway (a
    :class:`FallbackSumLinearOperator`), with a :class:`ClosedFormFallbackWarning`: where square and symmetric a
    :class:`FallbackSumLinearOperator` of the one dense matrix (so that its solves, log-determinants and roots, and
    those of the sums a likelihood makes of it, warn as well), a plain dense operator otherwise (a cross covariance)."""
    from bma_gp._warnings import warn_elementwise

    warn_elementwise(left, right)
    res = to_dense(left) * to_dense(right)
    if res.shape[-1] != res.shape[-2]:
        return DenseLinearOperator(res)
    if _known_nonsymmetric(left) or _known_nonsymmetric(right) or _visibly_nonsymmetric(res):
        # (a factor of linear_operator's that is not symmetric, TriangularLinearOperator or a dense matrix, shows in
        # the product formed here: M * Triangular was solved by Cholesky, 1-2% off)
        return FallbackDenseLinearOperator(res)  # a plain dense operator was solved by Cholesky (4-31% off, silently)
    return FallbackSumLinearOperator(DenseLinearOperator(res))


class FallbackDenseLinearOperator(_WarnsWhenFactorised, DenseLinearOperator):
    """A dense square matrix formed from an operator known not to be symmetric (the elementwise product of a product
    over two partitions, or of a block mean operator built with ``symmetric=False``, with another matrix): products
    exact and silent; ``solve``, ``logdet`` and ``inv_quad_logdet`` factorise it with LU and say so with a
    :class:`ClosedFormFallbackWarning` (linear_operator's dense operator took a Cholesky factor of one triangle);
    roots raise a ``ValueError``."""

    def _nonsymmetric(self) -> bool:
        return True

    def _why_nonsymmetric(self) -> str:
        return "it is formed from a matrix that is not symmetric"

    def _warn(self, what: str) -> None:  # only reached by the symmetric paths, which _nonsymmetric rules out
        warnings.warn(f"{what} of a {type(self).__name__}.", ClosedFormFallbackWarning, stacklevel=3)

    def _warn_cholesky(self) -> None:
        pass  # only a matrix that is symmetric after all gets here

    def _transpose_nonbatch(self):
        return FallbackDenseLinearOperator(self.tensor.mT)

    def _mul_constant(self, other):
        return FallbackMultipleLinearOperator(self, other)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        res = super()._getitem(row_index, col_index, *batch_indices)
        if type(res) is DenseLinearOperator and res.shape[-1] == res.shape[-2]:
            return FallbackDenseLinearOperator(res.tensor)
        return res


class FallbackIndexedLinearOperator(_WarnsWhenFactorised, InterpolatedLinearOperator):
    """Rows and columns of a block mean operator or sum other than one principal submatrix (``M[:, :m]``, a point
    repeated, different points on the two sides): linear_operator's interpolated operator, whose solves,
    log-determinants and roots take the generic path and say so with a :class:`ClosedFormFallbackWarning` when they
    run (products stay silent). A principal slice ``M[a:b, a:b]`` and the same distinct points on both sides
    (``M[idx][:, idx]``, :func:`_indexed_principal`) stay in closed form."""

    def _nonsymmetric(self) -> bool:
        """A part of a non-symmetric operator, or rows and columns that differ (``M[[1, 0]][:, [1, 2]]`` is square
        but not symmetric: linear_operator's Cholesky read one triangle of it, and its solve was wrong)."""
        return _known_nonsymmetric(self.base_linear_op) or _different_sides(self)

    def _why_nonsymmetric(self) -> str:
        if _known_nonsymmetric(self.base_linear_op):
            return f"rows and columns of a {type(self.base_linear_op).__name__} that is not symmetric"
        return "its rows and columns are different points, so the submatrix is in general not symmetric"

    def matmul(self, other):
        # linear_operator's interpolated product takes tensors only ("Can only unsqueeze batch dimensions of ..."
        # for an operator): a product operator, which multiplies exactly and warns when it is solved
        if isinstance(other, LinearOperator):
            _check_factor_size(self, other, "M[rows, cols] @ other")
            return FallbackMatmulLinearOperator(self, other)
        return super().matmul(other)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        # M[idx][:, idx] (rows, then the same columns): a principal submatrix, in the family again
        res = super()._getitem(row_index, col_index, *batch_indices)
        principal = _indexed_principal(res)
        return res if principal is None else principal

    def _warn(self, what: str) -> None:
        name = type(self.base_linear_op).__name__
        if isinstance(self.base_linear_op, _ClosedKroneckerSum):
            # no principal submatrix of a multitask Kronecker sum is in the family: the advice below would not help
            warnings.warn(
                f"{what} of rows and columns of a {name} (a multitask Kronecker sum with a block mean factor): no "
                "submatrix of it but whole tasks (every point of one task, mvn[..., j], or of several, mvn[..., S]) "
                "has a closed form here, a principal one (M[a:b, a:b], M[idx][:, idx]) included; "
                f"{_generic_path(what)} is used. Solve with the "
                "whole covariance (the model's full multitask output) and select points from the result to keep the "
                "closed forms.",
                ClosedFormFallbackWarning,
                stacklevel=3,
            )
            return
        warnings.warn(
            f"{what} of rows and columns of a {name} other than one principal slice: "
            f"this submatrix has no closed form here; {_generic_path(what)} is used. Index with one slice, or the "
            "same distinct points, "
            "on both sides (M[a:b, a:b], M[idx][:, idx], or mvn[..., a:b]) to keep the closed forms.",
            ClosedFormFallbackWarning,
            stacklevel=3,
        )

    def to_dense(self) -> Tensor:
        """The dense ``rows x cols`` submatrix, read from the base operator's entries (``_get_indices``): memory of the
        result's size. linear_operator's default multiplies the base by an identity of the smaller side, an
        ``n x min(rows, cols)`` intermediate (80 GB for a ``1000 x 1000`` block of an operator of ``n = 10^7``), which
        a dense solve of the submatrix also went through."""
        rows, cols = self.matrix_shape
        device = self.device
        grid = [
            torch.arange(size, device=device).view(-1, *([1] * (len(self.batch_shape) - i + 1)))
            for i, size in enumerate(self.batch_shape)
        ]
        row_index = torch.arange(rows, device=device).unsqueeze(-1)
        col_index = torch.arange(cols, device=device).unsqueeze(-2)
        return self._get_indices(row_index, col_index, *grid).contiguous()


class FallbackScaledLinearOperator(_WarnsWhenFactorised, ConstantMulLinearOperator):
    r"""A negative multiple :math:`c M` of a :class:`~bma_gp.BlockMeanSumLinearOperator` (its root ``U U^T`` cannot
    carry a negative factor) or of a noisy multitask Kronecker sum (:class:`BlockMeanSumKroneckerLinearOperator` and
    its siblings, whose closed form needs a positive definite noise): linear_operator's constant multiple. Products
    are exact; ``solve`` and the inverse quadratic form are :math:`M`'s closed forms divided by :math:`c`; the
    log-determinant is :math:`M`'s plus :math:`n \log |c|` (torch.logdet's semantics: NaN where
    :math:`c^n \det M < 0`, so for odd :math:`n` when :math:`M` is positive definite). Roots
    (``root_decomposition``, ``root_inv_decomposition``, ``sqrt_inv_matmul``, a Cholesky factor) raise a
    ``ValueError``: a negative definite matrix has no real root, and in a batch with factors of both signs the entries
    with ``c < 0`` have none (the class holds only multiples with some ``c < 0``; take the root of :math:`M`
    itself)."""

    def solve(self, right_tensor, left_tensor=None):
        res = self.base_linear_op.solve(right_tensor, left_tensor)
        c = self.expanded_constant.to(res.dtype)  # (*batch, 1, 1)
        if right_tensor.dim() == 1:  # a vector: (*batch, n), or (*batch, m) with a left tensor, as the base gives it
            return res / c.squeeze(-1)
        return res / c

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        if not logdet and inv_quad_rhs is None:
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        inv_quad, base_logdet = self.base_linear_op.inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        c = self.expanded_constant.squeeze(-1)  # (*batch, 1)
        if inv_quad_rhs is not None:
            inv_quad = inv_quad / (c.squeeze(-1) if reduce_inv_quad else c).to(inv_quad.dtype)
        if logdet:  # det(c M) = c^n det(M); M's logdet is NaN where det(M) < 0, so the sign of c^n decides
            c = c.squeeze(-1).to(base_logdet.dtype)
            n = self.shape[-1]
            value = base_logdet + n * c.abs().log()
            flips = (c < 0) & (n % 2 == 1)
            if bool((flips & base_logdet.isnan()).any()):  # c^n det(M) > 0 with det(M) < 0: not in the closed form
                self._warn("logdet")
                return inv_quad, torch.logdet(self.to_dense())
            base_logdet = torch.where(flips, torch.full_like(value, float("nan")), value)
        return inv_quad, base_logdet

    def inv_quad(self, inv_quad_rhs, reduce_inv_quad=True):
        # the mixin's (and linear_operator's) would take a Cholesky factor of c M, which a negative c makes
        # negative definite: M's closed form (with its checks of the right-hand side) divided by c instead
        inv_quad = self.base_linear_op.inv_quad(inv_quad_rhs, reduce_inv_quad=reduce_inv_quad)
        c = self.expanded_constant.squeeze(-1)  # (*batch, 1)
        return inv_quad / (c.squeeze(-1) if reduce_inv_quad else c).to(inv_quad.dtype)

    def logdet(self):
        return self.inv_quad_logdet(logdet=True)[1]

    def _sum_batch(self, dim: int) -> LinearOperator:
        """The sum over batch dimension ``dim``: with one factor ``c`` along it, ``c`` times the sum of the base
        operator's entries (closed form again); with factors that differ, the generic sum of the entries (warns).
        Factors that are equal by value but separate entries count as one only when no derivative is tracked through
        them: ``c`` taken from the first entry gave it the derivative of all of them, and the others none."""
        c = self._constant.expand(self.batch_shape)
        first = c.select(dim, 0)
        shared = c.shape[dim] == 1 or c.stride(dim) == 0  # one entry along dim (broadcast): exact for derivatives too
        tracked = (torch.is_grad_enabled() and c.requires_grad) or carries_tangent(c)
        if shared or (not tracked and bool((c == first.unsqueeze(dim)).all())):
            base = self.base_linear_op
            return base._expand_batch(self.batch_shape)._sum_batch(dim)._mul_constant(first)
        return super()._sum_batch(dim)

    def _negative_root(self, what: str) -> None:
        """``ValueError`` for a root of ``c S`` with every ``c < 0``: for a positive definite ``S`` (a covariance)
        ``c S`` is negative definite and has no real root; linear_operator's generic root clamped its negative
        eigenvalues and returned a zero matrix after a warning."""
        if bool((self._constant < 0).any()):
            # a ValueError only: linear_operator's generic root_decomposition catches the RuntimeError of a Cholesky
            # factor (NotPSDError) and clamps a symmetric eigendecomposition instead, which gave a zero root here
            raise ValueError(
                f"{what} of a negative multiple c S (c < 0) of a {type(self.base_linear_op).__name__}: for a positive "
                "definite S (a covariance) c S is negative definite and has no real root (linear_operator's generic "
                "path returned a zero root; in a batch, for the entries with c < 0). Take the root of S itself "
                "(S.root_decomposition(); c S = -(sqrt|c| R)(sqrt|c| R)^T), or negate S first where it is negative "
                "definite."
            )

    def root_decomposition(self, method=None):
        self._negative_root("root_decomposition")
        return super().root_decomposition(method)

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method=None):
        self._negative_root("root_inv_decomposition")
        return super().root_inv_decomposition(initial_vectors, test_vectors, method)

    # the private hooks linear_operator's wrappers call (BlockDiagLinearOperator, BatchRepeatLinearOperator, ...)
    def _root_decomposition(self):
        self._negative_root("root_decomposition")
        return super()._root_decomposition()

    def _root_inv_decomposition(self, initial_vectors=None, test_vectors=None):
        self._negative_root("root_inv_decomposition")
        return super()._root_inv_decomposition(initial_vectors, test_vectors)

    def sqrt_inv_matmul(self, rhs, lhs=None):
        self._negative_root("sqrt_inv_matmul")
        return super().sqrt_inv_matmul(rhs, lhs)

    def _cholesky(self, upper=False):
        # linear_operator's wrappers root a batch through its Cholesky factor (BlockDiagLinearOperator): a batch of
        # zero factors came back where one entry is negative definite
        self._negative_root("cholesky")
        return super()._cholesky(upper)

    def _mul_constant(self, other):
        # c (c' S) = (c c') S: the sum's own multiple (a sum again where c c' >= 0), not linear_operator's constant
        # multiple around this one, whose solves and eigenvalues took the generic path silently ((-S) * 0.9 had
        # eigenvalues [0, 0] for [-1.14, -0.69])
        return self.base_linear_op._mul_constant(self._constant * other)

    def _nonsymmetric(self) -> bool:
        return _known_nonsymmetric(self.base_linear_op)  # rows and columns of c S that differ, say

    def _why_nonsymmetric(self) -> str:
        return f"a multiple of a {type(self.base_linear_op).__name__} that is not symmetric"

    def _transpose_nonbatch(self):
        # c S with S symmetric is itself (ConstantMulLinearOperator's transpose forgot the class); a multiple of rows
        # and columns of S that differ ((-S)[r][:, c]) transposes its base
        if not _known_nonsymmetric(self.base_linear_op):
            return self
        return FallbackScaledLinearOperator(self.base_linear_op._transpose_nonbatch(), self._constant)

    def _warn(self, what: str) -> None:
        warnings.warn(
            f"{what} of a negative multiple of a {type(self.base_linear_op).__name__}: the sum's closed forms need a "
            f"nonnegative factor; {_generic_path(what)} is used. Solve with the sum itself and divide "
            "(M * c)^{-1} b = M^{-1} b / c.",
            ClosedFormFallbackWarning,
            stacklevel=3,
        )


class FallbackMatmulLinearOperator(_WarnsWhenFactorised, MatmulLinearOperator):
    """A matrix product ``A @ B`` with a block mean operator, sum or product as one factor and no closed form (a third
    partition, ``M @ S`` for a sum ``S``, a dense matrix or any other operator as the other factor): linear_operator's
    product operator. Products (``@ x``) are exact and silent. A product of two matrices is in general not symmetric,
    and linear_operator's solvers (Cholesky, CG) assume symmetry, so ``solve``, ``logdet`` and ``inv_quad_logdet``
    factorise the dense ``n x n`` matrix with LU, with a :class:`ClosedFormFallbackWarning` that says so (torch.logdet's
    semantics: NaN for a negative determinant); roots raise a ``ValueError``."""

    def _nonsymmetric(self) -> bool:
        return True

    def _warn_cholesky(self) -> None:
        pass  # only a product that is symmetric after all gets here: linear_operator's whitened Kronecker factors

    def _why_nonsymmetric(self) -> str:
        return (
            f"the product {type(self.left_linear_op).__name__} @ {type(self.right_linear_op).__name__}, which has no "
            "closed form here; a product of two matrices is in general not symmetric"
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        res = super()._getitem(row_index, col_index, *batch_indices)
        if type(res) is MatmulLinearOperator:  # rows and columns of a product: still a product of the factors' parts
            return FallbackMatmulLinearOperator(res.left_linear_op, res.right_linear_op)
        return res

    # ---- a product of a block mean operator and a diagonal (M D, D M, D M D): the factors' own closed forms
    def _closed_factors(self) -> tuple[LinearOperator, LinearOperator] | None:
        """``(A, B)`` where both factors of ``A @ B`` have closed-form solves and signed log-determinants
        (:func:`_closed_slogdet`): then ``(A B)^{-1} = B^{-1} A^{-1}`` and ``det(A B) = det A det B``, with no dense
        ``n x n`` LU (a user trial's ``M @ DiagLinearOperator(d)`` asked for 320 GB at n = 200,000)."""
        factors = (self.left_linear_op, self.right_linear_op)
        return factors if all(_has_closed_slogdet(f) for f in factors) else None

    def _closed_solve(self, factors, rhs: Tensor) -> Tensor:
        return factors[1].solve(factors[0].solve(rhs))

    def solve(self, right_tensor, left_tensor=None):
        factors = self._closed_factors()
        if factors is None:
            return super().solve(right_tensor, left_tensor)
        check_rhs(self.shape, right_tensor, "right_tensor", self.dtype)
        vector = right_tensor.dim() == 1
        res = self._closed_solve(factors, right_tensor.unsqueeze(-1) if vector else right_tensor)
        if left_tensor is not None:
            check_rhs_dtype(left_tensor, "left_tensor", self.dtype)
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    def _closed_inv_quad(self, factors, inv_quad_rhs: Tensor, reduce_inv_quad: bool) -> Tensor:
        check_rhs(self.shape, inv_quad_rhs, "inv_quad_rhs", self.dtype)
        vector = inv_quad_rhs.dim() == 1
        rhs = inv_quad_rhs.unsqueeze(-1) if vector else inv_quad_rhs
        res = (rhs * self._closed_solve(factors, rhs)).sum(-2)
        return res.sum(-1) if reduce_inv_quad or vector else res

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        factors = self._closed_factors()
        if factors is None:
            return super().inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)  # as the LU path gives for what was not asked
        inv_quad = zero if inv_quad_rhs is None else self._closed_inv_quad(factors, inv_quad_rhs, reduce_inv_quad)
        return inv_quad, (self.logdet() if logdet else zero)

    def inv_quad(self, inv_quad_rhs, reduce_inv_quad=True):
        factors = self._closed_factors()
        if factors is None:
            return super().inv_quad(inv_quad_rhs, reduce_inv_quad)
        return self._closed_inv_quad(factors, inv_quad_rhs, reduce_inv_quad)

    def logdet(self):
        if self._closed_factors() is None:
            return super().logdet()
        sign, logabs = _closed_slogdet(self)
        # torch.logdet's semantics, as the LU path had: NaN for a negative determinant, -inf for a zero one
        return torch.where(sign < 0, torch.full_like(logabs, float("nan")), logabs).to(self.dtype)

    def _mul_constant(self, other):
        return FallbackMultipleLinearOperator(self, other)


def _has_closed_slogdet(op) -> bool:
    """Whether :func:`_closed_slogdet` (and a closed-form solve) applies to ``op``."""
    if isinstance(op, (BlockMeanLinearOperator, DiagLinearOperator)):
        return True
    return isinstance(op, FallbackMatmulLinearOperator) and op._closed_factors() is not None


def _closed_slogdet(op) -> tuple[Tensor, Tensor]:
    """The sign and log-absolute determinant of a block mean operator, a diagonal, or a product of them.
    # shape: (*batch,), (*batch,)"""
    if isinstance(op, BlockMeanLinearOperator):
        return op.slogdet_parts()
    if isinstance(op, DiagLinearOperator):
        d = op._diagonal()
        return torch.sign(d).prod(-1), d.abs().log().sum(-1)
    left, right = (_closed_slogdet(f) for f in (op.left_linear_op, op.right_linear_op))
    dtype = torch.promote_types(left[1].dtype, right[1].dtype)
    return left[0].to(dtype) * right[0].to(dtype), left[1].to(dtype) + right[1].to(dtype)


class FallbackMultipleLinearOperator(_WarnsWhenFactorised, ConstantMulLinearOperator):
    """``c A`` for an operator ``A`` without closed forms that says so (a :class:`FallbackMatmulLinearOperator`, a
    :class:`FallbackMaskedLinearOperator`): linear_operator's constant multiple, which kept neither the warning nor
    the knowledge that ``A`` is not symmetric (``(S @ N) * 2`` was solved by a Cholesky factor of one triangle, 75%
    off, without a word). Its solves, log-determinants and roots are ``A``'s generic ones, with ``A``'s warning; a
    non-symmetric ``A`` is factorised with LU, as ``A`` itself is."""

    def _nonsymmetric(self) -> bool:
        return _known_nonsymmetric(self.base_linear_op)

    def _why_nonsymmetric(self) -> str:
        return self.base_linear_op._why_nonsymmetric()

    def _warn(self, what: str) -> None:
        self.base_linear_op._warn(what)

    def _warn_cholesky(self) -> None:
        self.base_linear_op._warn_cholesky()

    def _mul_constant(self, other):
        return FallbackMultipleLinearOperator(self.base_linear_op, self._constant * other)

    def _transpose_nonbatch(self):
        return FallbackMultipleLinearOperator(self.base_linear_op._transpose_nonbatch(), self._constant)


def _indexed_principal(op: FallbackIndexedLinearOperator) -> LinearOperator | None:
    """``op`` as the principal submatrix of its base where its rows and columns are the same distinct points in the
    same order (``M[idx][:, idx]``, ``M[perm][:, perm]``, the same positions in every batch entry), else None: a block
    mean operator or a sum of them restricted to those points (relabelled; a permutation permutes the labels) keeps
    its closed forms. Repeated points are no principal submatrix (the diagonal of a repeated pair is not ``lam``)."""
    base = op.base_linear_op
    tasks = isinstance(base, _ClosedKroneckerSum)  # whole tasks of a noisy multitask covariance (mvn[..., j])
    if not (tasks or isinstance(base, (BlockMeanLinearOperator, BlockMeanSumLinearOperator))):
        return None
    rows, cols = op.left_interp_indices, op.right_interp_indices
    if rows.shape != cols.shape or rows.shape[-1] != 1 or rows.shape[-2] == 0 or base.batch_shape != op.batch_shape:
        return None
    if not (bool((op.left_interp_values == 1).all()) and bool((op.right_interp_values == 1).all())):
        return None
    if not (rows is cols or torch.equal(rows, cols)):
        return None
    positions = shared_batch_entry(rows, 2)
    if positions is None:
        return None
    positions = positions.squeeze(-1)
    if torch.unique(positions).numel() != positions.numel():
        return None
    return base._whole_tasks(positions) if tasks else base._principal(positions)


def indexed_fallback(op: LinearOperator, row_index, col_index, *batch_indices) -> LinearOperator:
    """``op[rows, cols]`` as linear_operator's default indexing builds it, as a :class:`FallbackIndexedLinearOperator`
    (it keeps its class through further indexing)."""
    n_rows, n_cols = op.shape[-2:]
    rows = torch.arange(n_rows, dtype=torch.long, device=op.device).view(-1, 1).expand(*op.batch_shape, -1, 1)
    cols = torch.arange(n_cols, dtype=torch.long, device=op.device).view(-1, 1).expand(*op.batch_shape, -1, 1)
    one = torch.tensor(1.0, dtype=op.dtype, device=op.device)
    res = FallbackIndexedLinearOperator(op, rows, one.expand_as(rows), cols, one.expand_as(cols))
    return res._getitem(row_index, col_index, *batch_indices)


def empty_principal(op: LinearOperator, batch_shape: torch.Size) -> LinearOperator:
    """The principal submatrix of ``op`` over no points (``op[..., a:a, a:a]``): the ``0 x 0`` matrix, whose solve is
    empty and whose log-determinant is 0 (linear_operator's indexed operator divides by zero there)."""
    return DenseLinearOperator(torch.zeros(*batch_shape, 0, 0, dtype=op.dtype, device=op.device))


def masked_principal(base, row_mask, col_mask) -> LinearOperator | None:
    """``base[..., mask, :][..., :, mask]`` in the family, for the ``MaskedLinearOperator(base, mask, mask)`` that
    GPyTorch builds under ``gpytorch.settings.observation_nan_policy("mask")`` (the marginal likelihood and the mean
    cache drop the rows and columns of missing targets), or None where ``base`` is not a block mean operator or a sum
    of them, the masks differ or select no point. linear_operator's masked operator has no structure: its solves and
    log-determinants took a dense Cholesky up to ``max_cholesky_size`` and CG and Lanczos beyond, without a word."""
    if _is_lazy_block_mean(base):
        base = base.evaluate_kernel()
    if _known_nonsymmetric(base):
        # a product over two partitions, a block mean operator built with symmetric=False or a fallback made of one:
        # its masked submatrix is not symmetric, and linear_operator's masked operator solved it by a Cholesky factor
        # of one triangle (12.6% off, silently); the fallback factorises it with LU and says so
        return FallbackMaskedLinearOperator(base, row_mask, col_mask)
    if isinstance(base, _KroneckerOfBlockMean):
        # a MultitaskKernel model's Kronecker sum with missing targets: its principal submatrix has no closed form
        # here, and linear_operator's masked operator took CG and Lanczos past max_cholesky_size without a word
        return FallbackMaskedLinearOperator(base, row_mask, col_mask)
    tasks = _tasks_of_ours(base)
    if not (tasks or isinstance(base, (BlockMeanLinearOperator, BlockMeanSumLinearOperator))):
        return None
    masks = (row_mask, col_mask)
    if not all(torch.is_tensor(m) and m.dtype == torch.bool and m.shape == base.shape[-1:] for m in masks):
        return None
    if not (row_mask is col_mask or torch.equal(row_mask, col_mask)) or not bool(row_mask.any()):
        return None
    if tasks:
        # a batch-independent multi-output model's covariance with missing targets: the tasks as one block mean
        # operator over their blocks side by side, whose principal submatrix is closed form; other task layouts (sums
        # per task) keep linear_operator's masked operator, which now says so when it is factorised
        one = _tasks_as_one(base)
        if one is None:
            return FallbackMaskedLinearOperator(base, row_mask, col_mask)
        return one._principal(row_mask)
    return base._principal(row_mask)


def _tasks_as_one(layout) -> LinearOperator | None:
    r"""A block-diagonal or block-interleaved layout over a batch of ``t`` block mean operators or sums as one operator
    of the same kind over the ``t n`` rows: for every partition (``k`` blocks), task ``j``'s block ``b`` is block
    ``j k + b`` and ``B`` is block diagonal over the tasks (``t k x t k``, or ``t k`` values for a diagonal ``B``);
    ``lam``, ``d`` and the weights are the tasks' side by side, and a root is block diagonal over the tasks (``t n x t
    m``). The same matrix, whose principal submatrices (missing targets) are closed form. None for anything else (a
    batch beyond the tasks, a non-symmetric operator)."""
    base = _rescaled(layout.base_linear_op)
    if base.dim() != 3 or not getattr(base, "symmetric", True):
        return None
    interleaved = isinstance(layout, BlockInterleavedLinearOperator)
    t, n = base.shape[-3], base.shape[-1]

    def rows(x: Tensor) -> Tensor:  # (t, n, *rest) -> (t n, *rest), the layout's row order
        return (x.transpose(0, 1) if interleaved else x).reshape(t * n, *x.shape[2:])

    def side_by_side(partition: Partition) -> Partition:  # task j's block b is block j k + b
        k = partition.num_blocks
        labels = partition.labels.to(base.device)
        return Partition(rows((torch.arange(t, device=base.device) * k).unsqueeze(-1) + labels), num_blocks=t * k)

    def blocks(B: Tensor, k: int, diagonal: bool) -> Tensor:
        if diagonal:
            return B.expand(t, k).reshape(-1)
        return torch.block_diag(*B.expand(t, k, k).unbind(0))

    if type(base) is BlockMeanLinearOperator:
        k = base.partition.num_blocks
        lam = base.lam.expand(t, k).reshape(-1)
        b_diag = base._b_diag
        diagonal = b_diag is not None
        B = blocks(b_diag if b_diag is not None else base.B, k, diagonal)
        return BlockMeanLinearOperator(lam, B, side_by_side(base.partition), diagonal=diagonal)
    if type(base) is BlockMeanSumLinearOperator:
        full = base._expand_batch(base.batch_shape)
        parts = [side_by_side(p) for p in full.partitions]
        merged = [
            blocks(B, p.num_blocks, flag) for B, p, flag in zip(full._block_args, full.partitions, full.diagonal_blocks)
        ]
        weights = [None if w is None else rows(w.expand(t, n)) for w in full.weights]
        root = full.root
        if root is not None:  # block diagonal over the tasks: task j's rows take columns j m .. (j + 1) m
            m = root.shape[-1]
            wide = root.new_zeros(t, n, t, m)
            wide[torch.arange(t), :, torch.arange(t)] = root
            root = rows(wide.flatten(-2))
        return BlockMeanSumLinearOperator(
            rows(full.diag_values),
            *merged,
            partitions=parts,
            root=root,
            weights=weights,
            diagonal=list(full.diagonal_blocks),
        )
    return None


class FallbackMaskedLinearOperator(_WarnsWhenFactorised, MaskedLinearOperator):
    """linear_operator's masked operator (the rows and columns of observed targets, ``observation_nan_policy("mask")``)
    over a layout of the tasks with no closed form for its principal submatrix (a batch of sums per task, or a
    ``MultitaskKernel`` model's Kronecker sum with a block mean factor): its solves, log-determinants and roots take
    the generic path and say so with a :class:`ClosedFormFallbackWarning`."""

    def _nonsymmetric(self) -> bool:
        return _known_nonsymmetric(self.base) or not torch.equal(self.row_mask, self.col_mask)

    def _why_nonsymmetric(self) -> str:
        if _known_nonsymmetric(self.base):
            return f"rows and columns of a {type(self.base).__name__} that is not symmetric"
        return "its row and column masks differ"

    def _warn(self, what: str) -> None:
        why = (
            "a Kronecker sum with a block mean factor (a MultitaskKernel model), whose masked rows and columns have no "
            "closed form here"
            if isinstance(self.base, _KroneckerOfBlockMean)
            else "the tasks' operators are sums, whose masked layout has no closed form here"
        )
        warnings.warn(
            f"{what} of the observed rows and columns (missing targets, observation_nan_policy('mask')) of a "
            f"{type(self.base).__name__}: {why}; {_generic_path(what)} is used.",
            ClosedFormFallbackWarning,
            stacklevel=3,
        )

    def _mul_constant(self, other):
        return FallbackMultipleLinearOperator(self, other)


def _hooked_masked_new(original):
    """``MaskedLinearOperator.__new__`` that returns :func:`masked_principal` where there is one (Python then skips
    ``MaskedLinearOperator.__init__``, the result being no instance of it)."""

    @functools.wraps(original)
    def __new__(cls, *args, **kwargs):
        if len(args) == 3 and not kwargs and not issubclass(cls, FallbackMaskedLinearOperator):
            res = masked_principal(*args)
            if res is not None:
                return res
        return original(cls) if original is object.__new__ else original(cls, *args, **kwargs)

    __new__._bma_gp_original = original
    return __new__


def _hooked_interpolated_new(original):
    """``InterpolatedLinearOperator.__new__``: rows and columns of a block mean operator, sum, product or fallback
    built directly (``InterpolatedLinearOperator(M, idx, ones, idx, ones)``, or by another linear_operator wrapper) as
    the principal submatrix in the family where they are one (:func:`_indexed_principal`), else a
    :class:`FallbackIndexedLinearOperator`, which warns when it is solved and factorises a non-symmetric submatrix
    with LU. linear_operator's interpolated operator solved such a submatrix by Cholesky without a word (5% off for
    a product over two partitions)."""

    @functools.wraps(original)
    def __new__(cls, *args, **kwargs):
        if cls is InterpolatedLinearOperator and (args or "base_linear_op" in kwargs):
            base = args[0] if args else kwargs["base_linear_op"]
            # (an evaluated operator: a lazily evaluated kernel tensor is indexed through its inputs, and GPyTorch reads
            # its entries through an interpolated operator around it)
            if (_is_ours(base) and not _is_lazy_kernel(base)) or isinstance(base, _WarnsWhenFactorised):
                res = object.__new__(FallbackIndexedLinearOperator)
                res.__init__(*args, **kwargs)  # (Python runs __init__ once more on it: an InterpolatedLinearOperator)
                principal = _indexed_principal(res)
                return res if principal is None else principal
        return original(cls) if original is object.__new__ else original(cls, *args, **kwargs)

    __new__._bma_gp_original = original
    return __new__


# set while a sum or constant multiple built directly is routed through the hooked ``+`` and ``_mul_constant``: the
# constructions those make themselves (linear_operator's own sums, where no closed form applies) are left as they are
_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("_bma_gp_routing", default=False)


#: linear_operator's generic sums and multiples whose direct construction around a block mean operator is routed
#: (``PsdSumLinearOperator``, a sum known to be positive semidefinite, inherits ``SumLinearOperator``'s hooks)
_GENERIC_CLASSES = (SumLinearOperator, PsdSumLinearOperator, AddedDiagLinearOperator, ConstantMulLinearOperator)


def _routed_construction(cls, args: tuple, kwargs: dict) -> LinearOperator | None:
    """What ``cls(*args, **kwargs)`` means for linear_operator's generic ``SumLinearOperator``,
    ``AddedDiagLinearOperator`` and ``ConstantMulLinearOperator`` built directly around a block mean operator
    (``AddedDiagLinearOperator(M, DiagLinearOperator(d))``, ``ConstantMulLinearOperator(M, c)``), or ``None`` (then
    linear_operator's own). These solved by CG and Lanczos without a word (a user trial: log-determinants 27-350 nats
    off, solves 23-39% off) where ``M + D`` and ``M * c`` reach the closed forms; now they are ``args[0] + args[1] +
    ...`` and ``M._mul_constant(c)``: the closed form, or a sum that says when it leaves it. The arguments are taken
    as linear_operator's ``__init__`` takes them (tensors as dense operators, ``constant=`` by keyword, a constant
    of one entry as a number); an ``AddedDiagLinearOperator`` given its own ``preconditioner_override`` (for CG) is
    left as it is."""
    if _ROUTING.get() or cls not in _GENERIC_CLASSES:
        return None
    if cls is ConstantMulLinearOperator:
        # (base_linear_op, constant), by position or keyword; anything else is linear_operator's to refuse. Read
        # directly: every ScaleKernel output and constant multiple of linear_operator's own comes through here
        if len(args) + len(kwargs) != 2 or set(kwargs) - {"base_linear_op", "constant"}:
            return None
        base = args[0] if args else kwargs.get("base_linear_op")
        constant = args[1] if len(args) > 1 else kwargs.get("constant")
        base = _whole_or_itself(base)  # a multiple of M.root_decomposition(): of M
        kronecker = _kronecker_of_ours(base)
        if not kronecker and (not isinstance(base, LinearOperator) or not _is_ours(base)):
            return None
        base = base.evaluate_kernel() if _is_lazy_block_mean(base) else base
        if not torch.is_tensor(constant):
            constant = torch.tensor(constant, dtype=base.dtype, device=base.device)
        if constant.numel() == 1 and constant.dim() > len(base.batch_shape):
            constant = constant.reshape(())  # linear_operator's multiple keeps the base's shape
        if kronecker:
            return _scaled_kronecker(base, constant)
        with _raised(_ROUTING):
            return base._mul_constant(constant)
    if cls is AddedDiagLinearOperator:
        if set(kwargs) - {"preconditioner_override"} or kwargs.get("preconditioner_override") is not None:
            return None
    elif kwargs:
        return None
    if not args or not all(isinstance(a, (LinearOperator, Tensor)) for a in args):
        return None
    terms = [a if isinstance(a, LinearOperator) else DenseLinearOperator(a) for a in args]
    terms = [_whole_or_itself(a) for a in terms]  # M.root_decomposition().add_diagonal(d): M + D
    if len(terms) == 2 and any(isinstance(a, _ClosedKroneckerSum) for a in terms):
        # SumLinearOperator(M (x) K + I (x) Sigma, D): the sum's closed form with D where it has one (checked before
        # the routing flag, which would keep linear_operator's own addition inside it); else announced, below
        kron, diag = terms if isinstance(terms[0], _ClosedKroneckerSum) else terms[::-1]
        if isinstance(diag, DiagLinearOperator):
            folded = cast(_ClosedKroneckerSum, kron)._plus_diagonal(diag)
            if folded is not None:
                return folded
    if not any(
        _is_ours(a) or _holds_ours(a) or isinstance(a, (_WarnsWhenFactorised, _ClosedKroneckerSum)) for a in terms
    ):
        # AddedDiagLinearOperator(R1 + R2, D), SumLinearOperator(R1, R2, D): closed form too
        leaves = [_root_leaves(a) for a in terms]
        if not (all(ok for _, ok in leaves) and sum(c for c, _ in leaves) >= 2 and _one_matrix_size(terms)):
            return None
        with _raised(_ROUTING):
            total = terms[0]
            for term in terms[1:-1]:
                total = total + term
            return _low_rank_closed_form(total, terms[-1])
    with _raised(_ROUTING):
        res = terms[0].evaluate_kernel() if len(terms) == 1 and _is_lazy_block_mean(terms[0]) else terms[0]
        for term in terms[1:]:
            res = res + term
        return res


def _unrouted(original):
    """``original`` (linear_operator's ``__add__``, ``add_diagonal``, ...) with the sums and multiples it builds left
    as linear_operator builds them: the hooks around it route its result themselves (a lazily evaluated kernel
    plus a diagonal stays unevaluated, for an approximate GP that reads only its diagonal)."""

    @functools.wraps(original)
    def call(*args, **kwargs):  # on every operator sum: the token directly, not a generator context manager
        token = _ROUTING.set(True)
        try:
            return original(*args, **kwargs)
        finally:
            _ROUTING.reset(token)

    return call


def _hooked_generic_new(original):
    """``__new__`` of linear_operator's generic sums and constant multiples: :func:`_routed_construction` where it
    applies. Python calls ``__init__`` on what ``__new__`` returns when it is an instance of the class asked for (a
    :class:`FallbackSumLinearOperator` is a ``SumLinearOperator``): the result is marked as built, and
    :func:`_hooked_generic_init` leaves it as it is."""

    @functools.wraps(original)
    def __new__(cls, *args, **kwargs):
        res = _routed_construction(cls, args, kwargs)
        if res is not None:
            if isinstance(res, cls):
                res.__dict__["_bma_gp_built"] = True
            return res
        return original(cls) if original is object.__new__ else original(cls, *args, **kwargs)

    __new__._bma_gp_original = original
    return __new__


def _hooked_generic_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if self.__dict__.pop("_bma_gp_built", False):
            return
        original(self, *args, **kwargs)

    __init__._bma_gp_original = original
    return __init__


def _as_fallback(res):
    """``res``, a sum that contains a :class:`FallbackSumLinearOperator`, as one (flattened) such sum."""
    if isinstance(res, FallbackSumLinearOperator):
        return res
    if isinstance(res, AddedDiagLinearOperator):
        inner = res._linear_op
        ops = inner.linear_ops if isinstance(inner, SumLinearOperator) else (inner,)
        return FallbackSumLinearOperator(*ops, res._diag_tensor)
    if type(res) is SumLinearOperator:
        return FallbackSumLinearOperator(*res.linear_ops)
    return res


def fallback_sum(left, right) -> LinearOperator | None:
    """``left + right`` as a :class:`FallbackSumLinearOperator` when both are operators or dense matrices whose shapes
    broadcast (a row ``(1, n)``, a column ``(n, 1)``, other batch dimensions: both are expanded to the common shape,
    as a dense sum is), else None."""
    if isinstance(right, Tensor) and right.dim() < 2:
        return None  # a number or a vector: not a matrix sum
    if not isinstance(right, (Tensor, LinearOperator)) or isinstance(right, ZeroLinearOperator):
        return None
    if isinstance(left, ZeroLinearOperator):
        return None
    try:
        shape = torch.broadcast_shapes(left.shape, right.shape)
    except RuntimeError:
        return None
    if shape[-2:] != left.shape[-2:]:
        return None  # the sum would be wider than the operator: not a square matrix of its size
    if isinstance(right, Tensor):
        right = DenseLinearOperator(right.expand(shape))
    elif right.shape != shape:
        right = right.expand(*shape)
    if left.shape != shape:
        left = left.expand(*shape)
    return FallbackSumLinearOperator(left, right)


# ---------------------------------------------------------------------------- hooks
class _BlockMeanTasks(TorchIndexing, PicklesWithoutCache):
    """The block-diagonal operator of a batch of block mean operators or sums, one per task (a batch-independent
    multi-output model's ``MultitaskMultivariateNormal.from_batch_mvn`` covariance plus a diagonal noise): ``solve``,
    ``inv_quad``, ``inv_quad_logdet`` and the roots are the batch's closed forms, applied task by task
    (linear_operator's own take a dense Cholesky of every task's ``n x n`` matrix, or Lanczos). Products are
    linear_operator's, which already go through the batch. A sum over a batch dimension sums the tasks' operators
    (closed form where theirs is); indexing keeps the layout for batch indices and for slices of whole points
    (interleaved) or whole tasks (block-diagonal), and gives a :class:`FallbackIndexedLinearOperator` (which warns
    when factorised) otherwise."""

    base_linear_op: LinearOperator
    _plain: type

    def _whole_slices(self, row_index, col_index) -> tuple[slice, slice] | None:
        """``(rows, cols)`` of the tasks' operators that the slices ``row_index``, ``col_index`` of this one take, when
        they keep the layout; else None."""
        raise NotImplementedError

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            return super()._getitem(row_index, col_index, *batch_indices)  # type: ignore[misc]
        blocks = cast(LinearOperator, self)
        if all(
            isinstance(index, slice) and not range(*index.indices(size))
            for index, size in ((row_index, blocks.shape[-2]), (col_index, blocks.shape[-1]))
        ):  # no rows and no columns (mvn[..., a:a]): a layout over no tasks or points cannot be solved
            return empty_principal(blocks, torch.empty(blocks.batch_shape)[batch_indices].shape)
        whole = self._whole_slices(row_index, col_index)
        if whole is not None:
            return self._indexed_tasks(*whole, *batch_indices)
        return indexed_fallback(cast(LinearOperator, self), row_index, col_index, *batch_indices)

    def _indexed_tasks(self, rows: slice, cols: slice, *batch_indices) -> LinearOperator:
        raise NotImplementedError

    def _sum_batch(self, dim: int) -> LinearOperator:
        # the base's batch is this operator's, then the tasks: dim (>= 0, a batch dimension) is the same there
        return type(cast(LinearOperator, self))(self.base_linear_op.sum(dim))

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        check_floating(right_tensor, "right_tensor")
        check_floating(left_tensor, "left_tensor")
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        blocks = cast(LinearOperator, self)
        res = blocks._remove_batch_dim(self.base_linear_op.solve(blocks._add_batch_dim(rhs)))
        if vector:
            res = res.squeeze(-1)
        return res if left_tensor is None else left_tensor @ res

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """``tr(R^T K^{-1} R)`` (or its diagonal, ``reduce_inv_quad=False``) from the tasks' closed-form solves:
        linear_operator's takes a dense Cholesky factor of every task's ``n x n`` matrix. A vector ``R`` is one
        column, as in linear_operator."""
        blocks = cast(LinearOperator, self)
        if not blocks.is_square:
            raise RuntimeError(
                "inv_quad only operates on (batches of) square (positive semi-definite) LinearOperators. "
                f"Got a {type(self).__name__} of size {blocks.shape}."
            )
        rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        try:
            _matmul_broadcast_shape(blocks.shape, rhs.shape)
        except RuntimeError:
            raise RuntimeError(
                f"LinearOperator (size={blocks.shape}) cannot be multiplied with right-hand-side Tensor "
                f"(size={inv_quad_rhs.shape})."
            ) from None
        res = (rhs * self.solve(rhs)).sum(-2)
        return res.sum(-1) if reduce_inv_quad else res

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """The tasks' closed forms, with linear_operator's block-diagonal semantics: the inverse quadratic form over
        all rows (:meth:`inv_quad`) and the sum of the tasks' log-determinants; ``None`` for a term not asked for (as
        linear_operator's block operators of a dense batch give, whose own path reshapes a batch's scalar zero)."""
        inv_quad = None if inv_quad_rhs is None else self.inv_quad(inv_quad_rhs, reduce_inv_quad=reduce_inv_quad)
        logdet_res = self.base_linear_op.logdet().sum(-1) if logdet else None
        return inv_quad, logdet_res

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        return RootLinearOperator(self._plain(self.base_linear_op.root_decomposition(method=method).root))

    # add_diagonal (and add_jitter) and a multiple (* c): linear_operator's BlockLinearOperator methods, hooked by
    # install() for every layout of block mean operators (_hooked_tasks_add_diagonal, _hooked_tasks_mul_constant)

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method: str | None = None):
        root = self.base_linear_op.root_inv_decomposition(method=method).root
        return RootLinearOperator(self._plain(root))


class BlockMeanInterleavedLinearOperator(_BlockMeanTasks, BlockInterleavedLinearOperator):
    """The covariance of a batch-independent multi-output model over block mean or group kernels, in the layout of
    ``MultitaskMultivariateNormal.from_batch_mvn`` (points outer, tasks inner): linear_operator's
    ``BlockInterleavedLinearOperator`` of a batch of :class:`~bma_gp.BlockMeanLinearOperator` or
    :class:`~bma_gp.BlockMeanSumLinearOperator`, one per task.

    ``solve``, ``root_decomposition``, ``root_inv_decomposition`` and ``add_diagonal`` (a per-task noise, as a
    ``MultitaskGaussianLikelihood(rank=0)`` adds it) are the tasks' closed forms, applied task by task; slices of
    whole points, batch indices and sums over a batch dimension keep this layout; other indices give a
    :class:`~bma_gp.FallbackIndexedLinearOperator`, which warns where it is factorised."""

    _plain = BlockInterleavedLinearOperator

    def _whole_slices(self, row_index, col_index) -> tuple[slice, slice] | None:
        # rows i T .. j T are the points i .. j of every task
        t = self.base_linear_op.shape[-3]
        found = []
        for index, size in ((row_index, self.shape[-2]), (col_index, self.shape[-1])):
            if not isinstance(index, slice):
                return None
            start, stop, step = index.indices(size)
            if step != 1 or start % t or stop % t or stop < start:
                return None
            found.append(slice(start // t, stop // t))
        return found[0], found[1]

    def _indexed_tasks(self, rows: slice, cols: slice, *batch_indices) -> LinearOperator:
        return type(self)(self.base_linear_op._getitem(rows, cols, *batch_indices, slice(None)))


class BlockMeanBlockDiagLinearOperator(_BlockMeanTasks, BlockDiagLinearOperator):
    """The same covariance as :class:`BlockMeanInterleavedLinearOperator` in the layout of
    ``from_batch_mvn(..., interleaved=False)`` (tasks outer, points inner): linear_operator's
    ``BlockDiagLinearOperator`` of a batch of block mean operators or sums, with the same closed forms task by task;
    slices that keep whole tasks on both sides keep this layout."""

    _plain = BlockDiagLinearOperator

    def _whole_slices(self, row_index, col_index) -> tuple[slice, slice] | None:
        # rows a n .. b n are the tasks a .. b (linear_operator's BlockLinearOperator read them as the interleaved
        # layout's points: wrong entries); only the same whole tasks on both sides keep the layout
        n = self.base_linear_op.shape[-1]
        if not isinstance(row_index, slice) or row_index != col_index:
            return None
        start, stop, step = row_index.indices(self.shape[-2])
        if step != 1 or start % n or stop % n:
            return None
        return slice(start // n, stop // n), slice(start // n, stop // n)

    def _indexed_tasks(self, rows: slice, cols: slice, *batch_indices) -> LinearOperator:
        return type(self)(self.base_linear_op._getitem(slice(None), slice(None), *batch_indices, rows))


class _KroneckerOfBlockMean:
    """A Kronecker sum with a block mean factor (``MultitaskKernel(BlockMeanKernel(...))`` or around a ``GroupKernel``,
    plus a ``MultitaskGaussianLikelihood``'s noise): linear_operator's operator, whose Cholesky factor (what its solves
    and log-determinant take up to ``max_cholesky_size``) is the dense ``n x n`` one; it says so with a
    :class:`ClosedFormFallbackWarning`. ``_beyond`` says what happens above ``max_cholesky_size``."""

    _beyond = ""

    def _cholesky(self, upper: bool | None = False) -> LinearOperator:
        from linear_operator import settings as lo_settings

        from bma_gp._kronecker import announced

        n = cast(LinearOperator, self).shape[-1]
        if not announced():  # a warned fallback (BlockMeanKroneckerAddedDiagLinearOperator) said so already
            warnings.warn(
                f"cholesky of a {type(self).__name__} (n = {n}), a Kronecker sum with a block mean factor (a "
                "MultitaskKernel around a BlockMeanKernel or GroupKernel): linear_operator factorises its dense n x n "
                f"matrix up to gpytorch.settings.max_cholesky_size ({lo_settings.max_cholesky_size.value()}). "
                + self._beyond,
                ClosedFormFallbackWarning,
                stacklevel=3,
            )
        return super()._cholesky(upper=upper)  # type: ignore[misc]


class _ClosedKroneckerSum(_KroneckerOfBlockMean):
    """Solves, inverse quadratic forms and log-determinant of a Kronecker sum with a block mean factor in closed form
    (:mod:`bma_gp._kronecker`) where :meth:`_closed` finds its structure; linear_operator's path otherwise, announced
    once with a :class:`ClosedFormFallbackWarning` that says why (:meth:`_no_closed_form_reason`)."""

    def __init__(self, *args, **kwargs):
        # built by the routed construction of linear_operator's generic class (AddedDiagLinearOperator(A, D) is this
        # sum plus D, already initialised): Python calls __init__ again with the generic class's arguments
        if self.__dict__.pop("_bma_gp_built", False):
            return
        super().__init__(*args, **kwargs)

    def _closed(self):
        raise NotImplementedError

    def _no_closed_form_reason(self) -> str:
        raise NotImplementedError

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        """Batch indexing keeps the sum (each term indexed, the closed form read again); rows and columns taken out
        of it are a :class:`FallbackIndexedLinearOperator`, whose solves warn (linear_operator's sum of the indexed
        terms, a plain ``SumLinearOperator``, solved them by CG past ``max_cholesky_size`` without a word)."""
        if _is_noop_index(row_index) and _is_noop_index(col_index):
            ops = cast(SumLinearOperator, self).linear_ops
            return type(self)(*(op._getitem(row_index, col_index, *batch_indices) for op in ops))
        return indexed_fallback(cast(LinearOperator, self), row_index, col_index, *batch_indices)

    def _whole_tasks(self, positions: Tensor) -> LinearOperator | None:
        r"""The principal submatrix over ``positions`` (distinct) where they are every point of some tasks ``S``, in
        the layout's order (what ``mvn[..., j]`` and ``mvn[..., S]`` of a ``MultitaskMultivariateNormal`` take): for one
        task ``j`` the block mean operator :math:`\sum_q K_q[j, j] M_q + D_{jj} I_n` over the shared partition, for
        several the same Kronecker sum with the task factors :math:`K_q[S, S]` and the noise :math:`D[S, S]` (a
        :class:`BlockMeanLCMLinearOperator`); ``None`` for any other points or where the sum has no closed form
        (then the indexed fallback, which warns). linear_operator's indexed sum took CG (session 30: a warned
        fallback)."""
        closed = self._closed()
        if closed is None or positions.dim() != 1 or positions.numel() % closed.n:
            return None
        n, t, s = closed.n, closed.t, positions.numel() // closed.n
        points = torch.arange(n, device=positions.device)
        if closed.data_first:  # point-major (interleaved): position i t + j
            grid = positions.view(n, s)
            S = grid[0]
            expected = points[:, None] * t + S[None, :]
        else:  # task-major: position j n + i
            grid = positions.view(s, n)
            S = torch.div(grid[:, 0], n, rounding_mode="floor")
            expected = S[:, None] * n + points[None, :]
        if not (bool(((S >= 0) & (S < t)).all()) and torch.equal(grid, expected)):
            return None
        op = cast(LinearOperator, self)
        Ks = [K[..., S, :][..., :, S].to(op.dtype) for K in closed.Ks]
        D = closed.D[..., S, :][..., :, S].to(op.dtype)
        if s == 1:
            batch = torch.broadcast_shapes(op.batch_shape, *(M.batch_shape for M in closed.Ms))
            res: LinearOperator | None = None
            for M, K in zip(closed.Ms, Ks, strict=True):
                term = M._expand_batch(batch) if M.batch_shape != batch else M
                term = term._mul_constant(K[..., 0, 0].expand(batch))
                res = term if res is None else res + term
            assert res is not None
            return res.add_diagonal(D[..., 0, :].expand(*batch, 1))
        terms = [
            KroneckerProductLinearOperator(
                *((M, DenseLinearOperator(K)) if closed.data_first else (DenseLinearOperator(K), M))
            )
            for M, K in zip(closed.Ms, Ks, strict=True)
        ]
        eye = ConstantDiagLinearOperator(torch.ones(*D.shape[:-2], 1, dtype=op.dtype, device=op.device), diag_shape=n)
        noise = (eye, DenseLinearOperator(D)) if closed.data_first else (DenseLinearOperator(D), eye)
        return BlockMeanLCMLinearOperator(*terms, KroneckerProductLinearOperator(*noise))

    @contextlib.contextmanager
    def _fallback(self, what: str):
        """Run linear_operator's path for ``what``, announced once (its inner Cholesky then stays quiet)."""
        from bma_gp._kronecker import announcing

        with announcing() as outer:
            if not outer:
                size = cast(LinearOperator, self).shape[-1]
                warnings.warn(
                    f"{what} of a {type(self).__name__} (size {size}), a Kronecker sum with a block mean factor: no "
                    f"closed form, since {self._no_closed_form_reason()}.",
                    ClosedFormFallbackWarning,
                    stacklevel=4,
                )
            yield

    def _plus_diagonal(self, diag: DiagLinearOperator) -> LinearOperator | None:
        """This sum plus ``diag`` in closed form, or ``None`` where the sum with it has none."""
        raise NotImplementedError

    def _mul_constant(self, other):
        """``other * A`` for a positive constant: every term scaled, the likelihood's noise ``I_n (x) D`` (a
        two-factor Kronecker product, a ``KroneckerProductDiagLinearOperator`` under ``rank=0``) in its first factor,
        so that it stays a Kronecker product that the closed form reads (``MultivariateNormal * c`` scales its
        covariance so). linear_operator wrapped it in a ``ConstantMulLinearOperator`` (or, for ``rank=0``, made it a
        plain diagonal, whose entries carry gradients in training): the warned fallback, and for a
        ``MultitaskKernel`` under ``rank >= 1`` an ``AttributeError`` inside linear_operator's Kronecker sum.

        A batch of constants broader than the sum's batch scales the sum expanded to it (views of its factors, the
        closed form per entry; linear_operator's ``mul`` handed it to ``_mul_matrix``, which formed the dense
        ``n t x n t`` matrix of every entry without a word). A negative constant gives a
        :class:`FallbackScaledLinearOperator`, whose solves and log-determinant are this sum's closed forms divided
        by ``c`` (and whose roots raise: a negative definite matrix has none); zero or NaN raise a ``ValueError``
        that names ``c`` (they failed later, in a Cholesky factor or an ``AttributeError``, without naming it)."""
        op = cast(LinearOperator, self)
        c = other if torch.is_tensor(other) else torch.as_tensor(other, dtype=op.dtype, device=op.device)
        if c.dim() > 0:
            shape = torch.broadcast_shapes(op.batch_shape, c.shape)
            if shape != op.batch_shape:
                return op._expand_batch(shape)._mul_constant(c.expand(shape))
        if c.numel() == 0:
            return super()._mul_constant(other)
        if bool((c > 0).all()):
            return type(self)(*(_scaled_term(term, c) for term in cast(SumLinearOperator, self).linear_ops))
        if bool((c < 0).any()) and not bool((c == 0).any() or c.isnan().any()):
            return FallbackScaledLinearOperator(op, c)
        zero = bool((c == 0).any())
        where = " in some batch entries" if c.dim() else ""
        raise ValueError(
            f"c * A with the constant c {'zero' if zero else 'NaN'}{where}, for A a {type(self).__name__} (a noisy "
            "multitask covariance): c A is then "
            + ("the zero matrix, singular" if zero else "NaN")
            + ", with no solve, log-determinant or root. The closed form of c A needs c > 0 (a negative c is solved "
            "through A, (c A)^{-1} b = A^{-1} b / c). Multiply by a positive constant (a ScaleKernel's outputscale "
            "stays positive), or leave the term out of the model instead of multiplying it by 0."
        )

    def _mul_matrix(self, other):
        # A * c with c of shape (*batch, 1, 1) whose batch is not the sum's (linear_operator's mul takes only a batch
        # equal to the operator's for a constant): the constant multiple, the sum expanded to the broadcast batch
        constants = batch_constants(other)
        if constants is not None:
            return self._mul_constant(constants)
        return super()._mul_matrix(other)

    def _closed_solve(self, closed, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        res = closed.solve(rhs.unsqueeze(-1) if vector else rhs).to(rhs.dtype)
        return res.squeeze(-1) if vector else res

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        check_floating(right_tensor, "right_tensor")
        check_floating(left_tensor, "left_tensor")
        closed = self._closed()
        if closed is None:
            with self._fallback("solve"):
                return super().solve(right_tensor, left_tensor)  # type: ignore[misc]
        res = self._closed_solve(closed, right_tensor)
        return res if left_tensor is None else left_tensor @ res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):
        closed = None if num_tridiag else self._closed()
        if closed is None:
            with self._fallback("solve"):
                return super()._solve(rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)  # type: ignore[misc]
        return self._closed_solve(closed, rhs)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        closed = self._closed()
        if closed is None:
            with self._fallback("inv_quad"):
                return super().inv_quad(inv_quad_rhs, reduce_inv_quad=reduce_inv_quad)  # type: ignore[misc]
        rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        res = (rhs * self._closed_solve(closed, rhs)).sum(-2)
        return res.sum(-1) if reduce_inv_quad else res

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool | None = False, reduce_inv_quad=True):
        closed = self._closed()
        if closed is None:
            with self._fallback("inv_quad_logdet"):
                return super().inv_quad_logdet(inv_quad_rhs, logdet=logdet, reduce_inv_quad=reduce_inv_quad)  # type: ignore[misc]
        factors = closed.factors()
        inv_quad = None
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            inv_quad = (rhs * closed.solve(rhs, factors).to(rhs.dtype)).sum(-2)
            if reduce_inv_quad:
                inv_quad = inv_quad.sum(-1)
        logdet_res = self._closed_logdet(closed, factors) if logdet else None
        return inv_quad, logdet_res

    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        r""":math:`A^{-1/2} R` with the symmetric inverse square root, or (:math:`L A^{-1/2} R`,
        :math:`\operatorname{diag}(L A^{-1} L^\top)`), in closed form
        (:meth:`~bma_gp._kronecker.KroneckerBlockMean.inverse_sqrt_matmul`). linear_operator's contour-integral
        quadrature (CG and MINRES) ran here without a word (a user trial: 1.6e-6 off by default, 0.4-0.6 under
        ``max_cg_iterations(1)``); where the sum has no closed form it still does, announced."""
        check_floating(rhs, "rhs")
        check_floating(lhs, "lhs")
        closed = self._closed()
        if closed is None:
            with self._fallback("sqrt_inv_matmul"):
                return super().sqrt_inv_matmul(rhs, lhs)  # type: ignore[misc]
        return closed_sqrt_inv_matmul(closed, rhs, lhs)

    def logdet(self) -> Tensor:
        closed = self._closed()
        if closed is None:
            with self._fallback("logdet"):
                return super().logdet()  # type: ignore[misc]
        return self._closed_logdet(closed)

    def _closed_root(self, closed, inverse: bool) -> LinearOperator:
        """The closed-form square root (:class:`~bma_gp._kronecker.KroneckerRoot`, ``n t x n t``, applied by its
        products), after the small factorisations are checked here: a matrix that is not positive definite raises at
        the call, not at the root's first product."""
        from bma_gp._kronecker import KroneckerRoot, KroneckerRootProduct

        with torch.no_grad():
            closed.factors()
        return KroneckerRootProduct(KroneckerRoot(cast(LinearOperator, self), inverse=inverse))

    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        r""":math:`A = R R^\top` with the closed-form square root of :mod:`bma_gp._kronecker`
        (:meth:`~bma_gp._kronecker.KroneckerBlockMean.root_matmul`: ``O(n t (t + c) + (k t)^2 c)`` per product with
        ``c`` columns, nothing ``n x n``; ``method`` is checked and ignored); linear_operator's path, announced, where
        there is no closed form. linear_operator took every factor's eigendecomposition (an explicit ``n x n``
        eigenvector matrix of ``M``) or a dense Cholesky."""
        from bma_gp._closed_roots import check_root_method

        closed = self._closed()
        if closed is None:
            with self._fallback("root_decomposition"):
                return super().root_decomposition(method=method)  # type: ignore[misc]
        check_root_method("root_decomposition", method)
        return self._closed_root(closed, inverse=False)

    @cached(name="root_inv_decomposition")
    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method: str | None = None):
        r""":math:`A^{-1} = R R^\top` in closed form (:mod:`bma_gp._kronecker`; the arguments are checked and ignored),
        linear_operator's path (announced) where there is none: Lanczos above ``max_cholesky_size``, a dense Cholesky
        below."""
        from bma_gp._closed_roots import check_root_method

        closed = self._closed()
        if closed is None:
            with self._fallback("root_inv_decomposition"):
                return super().root_inv_decomposition(  # type: ignore[misc]
                    initial_vectors=initial_vectors, test_vectors=test_vectors, method=method
                )
        check_root_method("root_inv_decomposition", method)
        return self._closed_root(closed, inverse=True)

    def _root_decomposition(self):
        # linear_operator's hook (its wrappers call it on the operator they wrap)
        if self._closed() is None:
            return super()._root_decomposition()
        return self.root_decomposition().root

    def _root_inv_decomposition(self, initial_vectors=None, test_vectors=None):
        if self._closed() is None:
            return super()._root_inv_decomposition(initial_vectors, test_vectors)
        return self.root_inv_decomposition().root

    def _logdet(self) -> Tensor:
        closed = self._closed()
        if closed is None:
            with self._fallback("logdet"):
                return super()._logdet()  # type: ignore[misc]
        return self._closed_logdet(closed)

    def _closed_logdet(self, closed, factors: tuple | None = None) -> Tensor:
        return closed.logdet(factors).to(cast(LinearOperator, self).dtype)


class BlockMeanKroneckerAddedDiagLinearOperator(_ClosedKroneckerSum, KroneckerProductAddedDiagLinearOperator):
    """``KroneckerProductAddedDiagLinearOperator`` with a block mean factor: ``M (x) K + I (x) D`` with a per-task
    noise ``D`` (``MultitaskGaussianLikelihood(rank=0)``, with or without its global noise, ``add_diagonal(c)``)
    solves and takes its log-determinant in closed form (:mod:`bma_gp._kronecker`, ``O(n t (t + c) + (k t)^3)``,
    nothing ``n x n``) at every size, and so are its roots (``root_decomposition``, ``root_inv_decomposition``: draws
    and ``fast_pred_var``); linear_operator took every factor's eigendecomposition (an explicit ``n x n``
    eigenvector matrix of ``M``) above ``max_cholesky_size`` and a dense Cholesky below. Other diagonals (a per-point
    noise) and other products keep linear_operator's path, with a :class:`ClosedFormFallbackWarning`."""

    _beyond = (
        "Its solves and log-determinant are closed form under a per-task noise (MultitaskGaussianLikelihood(rank=0)); "
        "an explicit Cholesky factor is dense."
    )

    def _closed(self):
        from bma_gp._kronecker import kronecker_block_mean

        return kronecker_block_mean(self)

    def _no_closed_form_reason(self) -> str:
        from bma_gp._kronecker import no_closed_form_reason

        return no_closed_form_reason(self)

    def __add__(self, other):
        if isinstance(other, (LinearOperator, Tensor)) and not isinstance(other, DiagLinearOperator):
            # a matrix that is not a diagonal (SumLinearOperator(op, dense) is routed here): linear_operator's
            # AddedDiagLinearOperator.__add__ kept this class around Sum(M (x) K, other), whose Kronecker paths then
            # took that sum for a Kronecker product (a log-determinant past max_cholesky_size raised); a sum that
            # warns when it is factorised, as a Kronecker sum with a task-coupling noise gives
            fallback = fallback_sum(self, other)
            if fallback is not None:
                return fallback
        # linear_operator's adds a constant diagonal into a plain KroneckerProductAddedDiagLinearOperator
        return _announced_kronecker(super().__add__(other))

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        return _announced_kronecker(super().add_diagonal(diag))

    def _plus_diagonal(self, diag: DiagLinearOperator) -> LinearOperator | None:
        res = type(self)(self.linear_op, self.diag_tensor + diag)
        return res if res._closed() is not None else None


class BlockMeanSumKroneckerLinearOperator(_ClosedKroneckerSum, SumKroneckerLinearOperator):
    """``SumKroneckerLinearOperator`` with a block mean factor: ``M (x) K + I (x) D`` with a noise ``D`` that couples
    the tasks (``MultitaskGaussianLikelihood(rank >= 1)``: ``F F^T``, plus the global noise) solves and takes its
    log-determinant in closed form (:mod:`bma_gp._kronecker`, the same split as
    :class:`BlockMeanKroneckerAddedDiagLinearOperator` with ``lam_i K + D`` per block) at every size, and so are its
    roots. linear_operator
    factorised the dense ``n t x n t`` matrix up to ``max_cholesky_size`` (warned), and beyond it whitened the sum by
    an inverse root of ``D``: exact while ``t <= max_cholesky_size``, by Lanczos below that (``max_cholesky_size(0)``:
    the marginal log-likelihood 16-19% off at ``n = 3000-6000``, ``t = 3``, silently; an ``IndexError`` for a
    singular ``D``, ``rank < t`` without the global noise). Other sums
    keep linear_operator's path, with a :class:`ClosedFormFallbackWarning`."""

    _beyond = (
        "Its solves and log-determinant are closed form for M (x) K + I (x) D with any t x t noise D "
        "(MultitaskGaussianLikelihood of any rank); an explicit Cholesky factor is dense."
    )

    def _closed(self):
        from bma_gp._kronecker import kronecker_sum_block_mean

        return kronecker_sum_block_mean(self)

    def _no_closed_form_reason(self) -> str:
        from bma_gp._kronecker import no_closed_form_sum_reason

        return no_closed_form_sum_reason(self)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``A + diag``: folded into the noise's task factor (``D + diag``) where ``diag`` is the same at every point
        within a task (``add_jitter``, a scalar, a per-task vector), keeping the closed form; otherwise the sum with
        ``diag``, which announces its fallback. linear_operator's ``AddedDiagLinearOperator`` around this sum solved
        by CG and Lanczos, silently."""
        diag_op = super().add_diagonal(diag)._diag_tensor  # linear_operator's shape checks and diagonal operator
        return self + diag_op

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            folded = self._plus_diagonal(other)
            if folded is not None:
                return folded
        return super().__add__(other)

    def _plus_diagonal(self, diag: DiagLinearOperator) -> LinearOperator | None:
        """This sum with ``diag`` folded into its noise, ``M (x) K + I_n (x) (c D + E)`` (``E`` the diagonal's
        per-task values, ``c I_n`` the noise's data factor), or ``None`` where there is no closed form for it (the
        sum has none, or the diagonal differs between the points of a task)."""
        from bma_gp._kronecker import _block_mean_product, _identity_scale, _task_noise

        if self._closed() is None or diag.shape[-2:] != self.shape[-2:]:
            return None  # no closed form, or a diagonal of another size (linear_operator's addition refuses it)
        terms = list(self.linear_ops)
        pos = next(i for i, term in enumerate(terms) if _block_mean_product(term) is not None)
        M, _, index = cast(tuple, _block_mean_product(terms[pos]))
        noise = terms[1 - pos]
        n, t = M.shape[-1], noise.linear_ops[1 - index].shape[-1]
        extra = _task_noise(diag, n, t, index == 0)
        scale = _identity_scale(noise.linear_ops[index], n)
        if extra is None or scale is None:
            return None
        task_noise = to_dense(noise.linear_ops[1 - index]) * scale.unsqueeze(-1) + torch.diag_embed(extra)
        if task_noise.shape[:-2] != self.batch_shape:  # a diagonal with more batch dimensions than the sum
            return None
        eye = ConstantDiagLinearOperator(torch.ones_like(scale.expand(*self.batch_shape, 1)), diag_shape=n)
        factors = (eye, DenseLinearOperator(task_noise))
        terms[1 - pos] = KroneckerProductLinearOperator(*(factors if index == 0 else factors[::-1]))
        return BlockMeanSumKroneckerLinearOperator(*terms)


class BlockMeanLCMLinearOperator(_ClosedKroneckerSum, SumLinearOperator):
    r"""The covariance of an ``LCMKernel`` over block mean or group kernels (``ScaleKernel``\ s around them included)
    plus a ``MultitaskGaussianLikelihood``'s noise: :math:`\sum_q M_q \otimes K_q + I_n \otimes D`, a sum of
    Kronecker products whose block mean factors :math:`M_q` share one partition (equal labels), and a noise ``D`` of
    any rank. Its solves, log-determinant, ``inv_quad_logdet`` and roots are closed form (:mod:`bma_gp._kronecker`:
    block :math:`i`'s within-block deviations see :math:`\sum_q \lambda_{q,i} K_q + D`, the block means
    :math:`\sum_q C_q \otimes K_q + I_k \otimes D`; nothing ``n t x n t``), the same as
    :class:`BlockMeanKroneckerAddedDiagLinearOperator`'s for one term. linear_operator's generic sum factorised the
    dense matrix up to ``max_cholesky_size`` and took CG and Lanczos beyond it. Block mean factors over different
    partitions, a term that is not such a product, a per-point noise, or no noise at all (the prior alone) keep that
    generic path, with a :class:`ClosedFormFallbackWarning` that says why."""

    _beyond = (
        "Its solves and log-determinant are closed form for sum_q M_q (x) K_q + I (x) D with the M_q over one "
        "partition; an explicit Cholesky factor is dense."
    )

    def _closed(self):
        from bma_gp._kronecker import kronecker_terms_block_mean

        return kronecker_terms_block_mean(self.linear_ops, self.batch_shape)

    def _no_closed_form_reason(self) -> str:
        from bma_gp._kronecker import no_closed_form_terms_reason

        return no_closed_form_terms_reason(self.linear_ops)

    def _plus_diagonal(self, diag: DiagLinearOperator) -> LinearOperator | None:
        res = BlockMeanLCMLinearOperator(*self.linear_ops, diag)
        return res if res._closed() is not None else None

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``A + diag`` as one more term of the sum (closed form where ``diag`` is the same at every point within a
        task: ``add_jitter``, a scalar, a per-task vector; announced otherwise)."""
        res = super().add_diagonal(diag)  # linear_operator's shape checks and diagonal operator
        return self + res._diag_tensor if isinstance(res, AddedDiagLinearOperator) else res

    def __add__(self, other):
        terms = _lcm_terms(other, cast(LinearOperator, self).shape)
        if terms is not None:
            return BlockMeanLCMLinearOperator(*self.linear_ops, *terms)
        return super().__add__(other)


def _scaled_term(term: LinearOperator, constant: Tensor) -> LinearOperator:
    """``constant * term`` for a term of a Kronecker sum with block mean factors: a two-factor Kronecker product
    that is not a block mean one (the likelihood's noise ``I_n (x) D``) keeps its class, the constant in its first
    factor; every other term is scaled as linear_operator scales it."""
    from bma_gp._kronecker import _block_mean_product

    if isinstance(term, KroneckerProductLinearOperator) and len(term.linear_ops) == 2:
        if _block_mean_product(term) is None:
            first, second = term.linear_ops
            if isinstance(first, ConstantDiagLinearOperator):
                # linear_operator's ConstantDiagLinearOperator._mul_constant multiplies its (*batch, 1) values by a
                # (*batch) constant unaligned: (*batch, *batch), a ValueError for a batch of constants
                scaled = first.diag_values * constant.unsqueeze(-1)
                return type(term)(ConstantDiagLinearOperator(scaled, diag_shape=first.diag_shape), second)
            return type(term)(first._mul_constant(constant), second)
    return term._mul_constant(constant)


def _lcm_terms(other, shape: torch.Size) -> tuple | None:
    """The terms that ``other`` adds to a :class:`BlockMeanLCMLinearOperator` of ``shape``: its own Kronecker sum's
    terms, a two-factor Kronecker product (another ``LCMKernel`` term, a rank >= 1 noise) or a diagonal (a rank-0
    noise, jitter), all of the same shape; ``None`` for anything else (then the sum is linear_operator's generic one,
    which announces its fallback)."""
    if not isinstance(other, LinearOperator) or other.shape != shape:
        return None
    if isinstance(other, (BlockMeanLCMLinearOperator, BlockMeanSumKroneckerLinearOperator)):
        return tuple(other.linear_ops)
    if isinstance(other, BlockMeanKroneckerAddedDiagLinearOperator):
        return (other._linear_op, other._diag_tensor)
    if isinstance(other, DiagLinearOperator):
        return (other,)
    if isinstance(other, KroneckerProductLinearOperator) and len(other.linear_ops) == 2:
        return (other,)
    return None


def _kronecker_of_ours(op) -> bool:
    return isinstance(op, KroneckerProductLinearOperator) and any(_is_ours(factor) for factor in op.linear_ops)


def _scaled_kronecker(kron, constant: Tensor) -> LinearOperator | None:
    """``c (M (x) K)`` as ``M (x) (c K)`` for a Kronecker product with a symmetric block mean factor ``M``
    (``ScaleKernel(MultitaskKernel(BlockMeanKernel(...)))``), so that the likelihood's noise makes it a Kronecker sum
    with its closed forms; None for other products or constants (linear_operator's ``ConstantMulLinearOperator``,
    whose sums are solved by CG and whose prediction formed the ``n t x n t`` inverse root)."""
    from bma_gp._kronecker import _block_mean_product

    product = _block_mean_product(kron)
    if product is None:
        return None
    M, task, index = product
    # (a constant of one entry is a 0-d tensor by now); ScaleKernel's (*batch, 1, 1) is the batch's constants
    c = constant.reshape(constant.shape[:-2]) if constant.dim() >= 2 and constant.shape[-2:] == (1, 1) else constant
    if c.dim() > len(kron.batch_shape):
        return None
    with _raised(_ROUTING):
        task = task._mul_constant(c.to(task.dtype))
    return KroneckerProductLinearOperator(*((M, task) if index == 0 else (task, M)))


def _announced_kronecker(res):
    """linear_operator's Kronecker sum ``res`` as its subclass that warns on a dense Cholesky factor; a plain sum of
    Kronecker products with a block mean factor among them (an ``LCMKernel`` of three or more terms, which
    linear_operator's ``SumLinearOperator`` solved by CG without a word) as a :class:`BlockMeanLCMLinearOperator`."""
    if type(res) is SumLinearOperator:
        terms = [op for term in res.linear_ops for op in (_lcm_terms(term, res.shape) or (None,))]
        if all(term is not None for term in terms) and any(_kronecker_of_ours(term) for term in terms):
            return BlockMeanLCMLinearOperator(*terms)
        return res
    if type(res) is KroneckerProductAddedDiagLinearOperator:
        return BlockMeanKroneckerAddedDiagLinearOperator(*res.linear_ops)
    if type(res) is SumKroneckerLinearOperator:
        from bma_gp._kronecker import _block_mean_product

        if all(_block_mean_product(term) is not None for term in res.linear_ops):
            # two terms of an LCMKernel: the sum that the likelihood's noise (and further terms) join
            return BlockMeanLCMLinearOperator(*res.linear_ops)
        return BlockMeanSumKroneckerLinearOperator(*res.linear_ops)
    return res


def _hooked_kron_add_diagonal(original):
    """``KroneckerProductLinearOperator.add_diagonal``: with a block mean factor (``Kron(M, K).add_diagonal(c)``,
    ``add_jitter``) the :class:`BlockMeanKroneckerAddedDiagLinearOperator` that ``Kron(M, K) + diagonal`` gives, with
    its closed forms; linear_operator built its plain operator (a silent dense Cholesky, or ``M``'s ``n x n``
    eigenvectors)."""

    @functools.wraps(original)
    def add_diagonal(self, diag):
        res = original(self, diag)
        return _announced_kronecker(res) if _kronecker_of_ours(self) else res

    add_diagonal._bma_gp_original = original
    return add_diagonal


def closed_sqrt_inv_matmul(closed, rhs: Tensor, lhs: Tensor | None):
    """linear_operator's ``sqrt_inv_matmul(rhs, lhs)`` from a :class:`~bma_gp._kronecker.KroneckerBlockMean`'s
    symmetric inverse square root: :math:`A^{-1/2} R`, or (:math:`L A^{-1/2} R`, :math:`diag(L A^{-1} L^T)`)."""
    if lhs is None:
        vector = rhs.dim() == 1
        res = closed.inverse_sqrt_matmul(rhs.unsqueeze(-1) if vector else rhs).to(rhs.dtype)
        return res.squeeze(-1) if vector else res
    lhs_root = closed.inverse_sqrt_matmul(lhs.mT).to(lhs.dtype).mT  # L A^{-1/2} (A^{-1/2} symmetric)
    return lhs_root @ rhs, lhs_root.pow(2).sum(-1)


def _hooked_kron_sqrt_inv_matmul(original):
    """``KroneckerProductLinearOperator.sqrt_inv_matmul`` with a block mean factor: ``(M (x) K)^{-1/2} R`` in closed
    form for a symmetric ``M`` and a ``t x t`` ``K`` (the split of :mod:`bma_gp._kronecker` with no noise); other
    products of ours take linear_operator's contour-integral quadrature, announced. It ran that quadrature (CG and
    MINRES) without a word (a user trial: 1.3e-5 to 2.5e-4 off by default, 0.63 under ``max_cg_iterations(1)``)."""

    @functools.wraps(original)
    def sqrt_inv_matmul(self, rhs, lhs=None):
        if not _kronecker_of_ours(self):
            return original(self, rhs, lhs)
        from bma_gp._kronecker import KroneckerBlockMean, _block_mean_product, _symmetric

        check_floating(rhs, "rhs")
        check_floating(lhs, "lhs")
        product = _block_mean_product(self)
        if product is None:
            warnings.warn(
                f"sqrt_inv_matmul of a KroneckerProductLinearOperator (size {self.shape[-1]}) with a block mean factor "
                "that is not one symmetric BlockMeanLinearOperator times one other factor: no closed form. "
                "linear_operator's contour-integral quadrature (CG and MINRES: iterative, approximate) is used.",
                ClosedFormFallbackWarning,
                stacklevel=2,
            )
            return original(self, rhs, lhs)
        M, task, index = product
        K = _symmetric(task, M.core_dtype)
        D = torch.zeros(*self.batch_shape, *K.shape[-2:], dtype=K.dtype, device=K.device)
        closed = KroneckerBlockMean((M,), (K,), D, index == 0, self.batch_shape)
        return closed_sqrt_inv_matmul(closed, rhs, lhs)

    sqrt_inv_matmul._bma_gp_original = original
    return sqrt_inv_matmul


def _hooked_kron_logdet(original):
    r"""``KroneckerProductLinearOperator._logdet`` with a block mean factor:
    :math:`\log\det(A_1 \otimes \dots \otimes A_m) = \sum_i (N / n_i) \log\det A_i` from each factor's own
    signed log-determinant (a block mean factor's closed form; the product's sign is each factor's to the power of
    its multiplicity, and torch.logdet's semantics follow: NaN only where the product's determinant is negative), for
    ``logdet()`` and ``inv_quad_logdet(logdet=True)``. linear_operator took every factor's eigenvectors
    (``diagonalization``), ``n x n`` for a block mean factor: a user trial's ``Kron(M, 3 x 3)`` at n = 200,000 asked
    for 40 GB; it also clamped eigenvalues below 1e-7."""

    @functools.wraps(original)
    def _logdet(self):
        if not _kronecker_of_ours(self):
            return original(self)
        size = self.shape[-1]
        sign, logabs = None, None
        for factor in self.linear_ops:
            # each factor's sign to the power of its multiplicity: an even power of a negative determinant is positive
            # (torch.logdet's semantics for the product: NaN only where its determinant is negative)
            if _has_closed_slogdet(factor):
                s_i, l_i = _closed_slogdet(factor)
            else:  # a small dense task factor, say (linear_operator took its eigendecomposition)
                s_i, l_i = torch.linalg.slogdet(factor.to_dense())
            power = size // factor.shape[-1]
            s_i = s_i.pow(power) if power % 2 else s_i.abs()
            l_i = l_i * power
            sign = s_i if sign is None else sign * s_i.to(sign.dtype)
            logabs = l_i if logabs is None else logabs + l_i.to(logabs.dtype)
        res = torch.where(sign < 0, torch.full_like(logabs, float("nan")), logabs).to(self.dtype)
        return res.expand(self.batch_shape) if res.shape != self.batch_shape else res

    _logdet._bma_gp_original = original
    return _logdet


def _hooked_kron_solve(original):
    """``KroneckerProductLinearOperator.solve`` with a block mean factor: each factor's solve (a block mean factor's
    closed form) at any size. linear_operator's ``solve`` took a dense Cholesky of every factor up to
    ``max_cholesky_size`` (announced for the block mean factor; its closed form is the factor's own solve)."""

    @functools.wraps(original)
    def solve(self, right_tensor, left_tensor=None):
        if not _kronecker_of_ours(self):
            return original(self, right_tensor, left_tensor)
        check_rhs(self.shape, right_tensor, "right_tensor", self.dtype)
        vector = right_tensor.dim() == 1
        res = self._solve(right_tensor.unsqueeze(-1) if vector else right_tensor)
        if left_tensor is not None:
            check_rhs_dtype(left_tensor, "left_tensor", self.dtype)
            res = left_tensor @ res
        return res.squeeze(-1) if vector else res

    solve._bma_gp_original = original
    return solve


def _hooked_kron_inv_quad_logdet(original):
    r"""``KroneckerProductLinearOperator.inv_quad_logdet`` with a block mean factor: :math:`R^\top A^{-1} R` from the
    factors' solves (:func:`_hooked_kron_solve`) and the log-determinant from theirs (:func:`_hooked_kron_logdet`),
    at any size (linear_operator's took dense Cholesky factors up to ``max_cholesky_size``)."""

    @functools.wraps(original)
    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        if not _kronecker_of_ours(self):
            return original(self, inv_quad_rhs, logdet, reduce_inv_quad)
        inv_quad = None if inv_quad_rhs is None else _kron_inv_quad(self, inv_quad_rhs, reduce_inv_quad)
        return inv_quad, (self._logdet() if logdet else None)

    inv_quad_logdet._bma_gp_original = original
    return inv_quad_logdet


def _kron_inv_quad(kron, inv_quad_rhs: Tensor, reduce_inv_quad: bool) -> Tensor:
    r""":math:`R^\top A^{-1} R` of a Kronecker product from its factors' solves, as linear_operator shapes it."""
    check_rhs(kron.shape, inv_quad_rhs, "inv_quad_rhs", kron.dtype)
    vector = inv_quad_rhs.dim() == 1
    rhs = inv_quad_rhs.unsqueeze(-1) if vector else inv_quad_rhs
    inv_quad = (rhs * kron._solve(rhs)).sum(-2)  # (*batch, columns)
    return inv_quad.sum(-1) if reduce_inv_quad or vector else inv_quad


def _hooked_kron_inv_quad(original):
    """``KroneckerProductLinearOperator.inv_quad`` with a block mean factor: :func:`_kron_inv_quad` at any size."""

    @functools.wraps(original)
    def inv_quad(self, inv_quad_rhs, reduce_inv_quad=True):
        if not _kronecker_of_ours(self):
            return original(self, inv_quad_rhs, reduce_inv_quad)
        return _kron_inv_quad(self, inv_quad_rhs, reduce_inv_quad)

    inv_quad._bma_gp_original = original
    return inv_quad


def _hooked_kron_sum_new(original):
    """``__new__`` of linear_operator's ``KroneckerProductAddedDiagLinearOperator`` and ``SumKroneckerLinearOperator``:
    built directly around a Kronecker product with a block mean factor
    (``KroneckerProductAddedDiagLinearOperator(Kron(M, K), DiagLinearOperator(d))``), the subclass that ``Kron(M, K) +
    diagonal`` gives (:func:`_announced_kronecker`): its closed forms, or linear_operator's path with a
    :class:`ClosedFormFallbackWarning`. A user trial: built directly, a per-point noise was solved by CG without a
    word (solves 18-21% off, log-determinants 3.6 nats off)."""

    @functools.wraps(original)
    def __new__(cls, *args, **kwargs):
        plain = original(cls) if original is object.__new__ else original(cls, *args, **kwargs)
        if cls not in (KroneckerProductAddedDiagLinearOperator, SumKroneckerLinearOperator) or not any(
            _kronecker_of_ours(a) for a in args
        ):
            return plain
        cls.__init__(plain, *args, **kwargs)  # linear_operator's checks of the arguments, and its operator
        res = _announced_kronecker(plain)
        if res is not plain and isinstance(res, cls):
            res.__dict__["_bma_gp_built"] = True  # initialised: _ClosedKroneckerSum.__init__ leaves it as it is
        return res

    __new__._bma_gp_original = original
    return __new__


def _scaled_ours(op) -> bool:
    """A constant multiple (linear_operator's ``ConstantMulLinearOperator``) of a block mean operator or sum."""
    return isinstance(op, ConstantMulLinearOperator) and _is_ours(op.base_linear_op)


def _tasks_of_ours(op) -> bool:
    """A block-diagonal or block-interleaved operator over a batch of block mean operators (a batch-independent
    multi-output model's covariance), or over a constant multiple of them (``W * c`` for a negative ``c`` and a batch
    of sums, or a layout built around a ``ConstantMulLinearOperator``)."""
    from bma_gp._independent_cat import IndependentCatLinearOperator

    return isinstance(op, (BlockDiagLinearOperator, BlockInterleavedLinearOperator)) and (
        _is_ours(op.base_linear_op)
        or _scaled_ours(op.base_linear_op)
        or isinstance(op, _BlockMeanTasks)
        or isinstance(op.base_linear_op, IndependentCatLinearOperator)  # from_independent_mvns of block means
    )


def _rescaled(base: LinearOperator) -> LinearOperator:
    """``base``, with a plain ``ConstantMulLinearOperator`` of a block mean operator or sum taken as that operator's
    own multiple (:meth:`_mul_constant`: a block mean operator again, a sum again for a nonnegative constant), which
    has the closed forms the generic multiple lacks."""
    if type(base) is ConstantMulLinearOperator and isinstance(
        base.base_linear_op, (BlockMeanLinearOperator, BlockMeanSumLinearOperator)
    ):
        c = base._constant
        return base.base_linear_op._mul_constant(c.expand(base.batch_shape) if c.dim() else c)
    return base


def add_to_tasks(blocks, other) -> LinearOperator | None:
    """``blocks + other`` for a block-diagonal or block-interleaved operator over a batch of block mean operators and
    a diagonal ``other`` (``MultitaskGaussianLikelihood`` with ``rank=0``): the same layout over the batch plus each
    task's part of the diagonal, in closed form; None for any other ``other``, and where the batch plus the diagonal
    is neither in the family nor one of the fallbacks that warn when factorised (a negative multiple of a batch of
    sums plus noise is linear_operator's ``AddedDiagLinearOperator``, whose dense Cholesky would run silently): the
    caller then builds a :class:`FallbackSumLinearOperator`."""
    if not isinstance(other, DiagLinearOperator) or other.shape[-2:] != blocks.shape[-2:]:
        return None
    base = _rescaled(blocks.base_linear_op)
    t, n = base.shape[-3], base.shape[-1]
    interleaved = isinstance(blocks, BlockInterleavedLinearOperator)
    if isinstance(other, ConstantDiagLinearOperator):  # one value for every task: stays a constant per batch entry
        noise: LinearOperator = ConstantDiagLinearOperator(other.diag_values.unsqueeze(-2), diag_shape=n)
    else:
        d = other.diagonal()  # (*batch, n t), point-major when interleaved, task-major otherwise
        d = d.reshape(*d.shape[:-1], n, t).mT if interleaved else d.reshape(*d.shape[:-1], t, n)
        noise = DiagLinearOperator(d)
    summed = base + noise
    from bma_gp._independent_cat import IndependentCatLinearOperator

    if not (_is_ours(summed) or isinstance(summed, (_WarnsWhenFactorised, IndependentCatLinearOperator))):
        return None
    cls = BlockMeanInterleavedLinearOperator if interleaved else BlockMeanBlockDiagLinearOperator
    return cls(summed)


def _hooked_tasks_add_diagonal(original):
    """``add_diagonal`` (and so ``add_jitter``) of linear_operator's block-diagonal and block-interleaved operators:
    over a batch of block mean operators, the closed-form layout that ``W + DiagLinearOperator(d)`` gives
    (:func:`add_to_tasks`), or a :class:`FallbackSumLinearOperator` (which warns when factorised) where the batch plus
    the diagonal has no closed form. linear_operator's returned an ``AddedDiagLinearOperator``, whose solves and
    log-determinant took a dense Cholesky of the whole ``t n x t n`` matrix without a word. Its checks and expansion
    of ``diag`` (a vector, one value per batch entry, a scalar) are kept: the routing starts from its result."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def add_diagonal(self, diag):
        res = unrouted(self, diag)
        if _tasks_of_ours(self) and isinstance(res, AddedDiagLinearOperator):
            routed = add_to_tasks(self, res._diag_tensor)
            if routed is None:
                routed = fallback_sum(self, res._diag_tensor)
            if routed is not None:
                return routed
        return res

    add_diagonal._bma_gp_original = original
    return add_diagonal


def _hooked_tasks_mul_constant(original):
    """``_mul_constant`` (``W * c``, ``c * W``) of linear_operator's block-diagonal and block-interleaved operators
    over a batch of block mean operators or sums: the same layout over the batch's own multiples (a block mean
    operator again; a sum again for ``c >= 0``, else its :class:`FallbackScaledLinearOperator`). linear_operator's
    wraps the batch in a generic ``ConstantMulLinearOperator``, so that ``(W * c) + D`` left the closed forms for a
    silent dense Cholesky, the solves of ``(W + D) * c`` a dense Cholesky of every task, and a constant per batch entry
    (shape ``(*batch,)``) broadcast against the tasks' dimension and raised. ``c`` is one value for the layout or one
    per batch entry of it, the same for all its tasks."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def _mul_constant(self, other):
        from bma_gp._independent_cat import IndependentCatLinearOperator

        base = self.base_linear_op
        if isinstance(self, (BlockDiagLinearOperator, BlockInterleavedLinearOperator)) and isinstance(
            base, (BlockMeanLinearOperator, BlockMeanSumLinearOperator, IndependentCatLinearOperator)
        ):
            c = other if torch.is_tensor(other) else torch.tensor(other, dtype=base.dtype, device=base.device)
            if c.dim() > 0:  # (*batch) of the layout: the base's batch is (*batch, t)
                c = c.unsqueeze(-1)
            return type(self)(base._mul_constant(c))
        return unrouted(self, other)

    _mul_constant._bma_gp_original = original
    return _mul_constant


def adds_exactly(op) -> bool:
    """Whether ``op`` is a covariance whose own ``__add__`` keeps exact solves with anything added to it (a predictive
    covariance, ``_adds_exactly``): ``other + op`` is then ``op + other``, as the sum commutes (``D + pred`` was
    linear_operator's ``AddedDiagLinearOperator``, a block mean operator plus ``pred`` a fallback sum)."""
    return isinstance(op, LinearOperator) and bool(getattr(type(op), "_adds_exactly", False))


def _hooked_add(original):
    unrouted = _unrouted(original)

    @functools.wraps(original)
    def __add__(self, other):
        if adds_exactly(other) and not adds_exactly(self):
            return other.__add__(self)
        whole = _root_of_ours(self)
        if whole is not None:  # M.root_decomposition() + D: M + D
            return whole + other
        whole = _root_of_ours(other)
        if whole is not None and isinstance(self, LinearOperator):
            return self + whole
        if isinstance(other, LinearOperator) and (
            isinstance(self, FallbackSumLinearOperator) or isinstance(other, FallbackSumLinearOperator)
        ):  # a fallback sum plus anything (noise, say) is still one: it keeps its warning
            return _as_fallback(unrouted(self, other))
        if isinstance(other, _WarnsWhenFactorised) and not isinstance(self, _WarnsWhenFactorised):
            # D + c M, D + M[r][:, c], X + (S @ N): no closed form, a sum that warns (and knows a non-symmetric
            # summand) when solved, as in the other order
            return other.__radd__(self)
        if isinstance(other, LinearOperator) and (_tasks_of_ours(self) or _tasks_of_ours(other)):
            res = add_to_tasks(self, other) if _tasks_of_ours(self) else add_to_tasks(other, self)
            if res is not None:
                return res
            fallback = fallback_sum(self, other)  # a noise that couples the tasks: no closed form, warns when solved
            if fallback is not None:
                return fallback
        if _low_rank_sum(self, other) and not _lazy_roots(self, other):
            res = _low_rank_closed_form(self, other)  # two or more low-rank roots and diagonals: Woodbury
            if res is not None:
                return res
        if _lazy_roots(self, other):
            # two low-rank roots, one of them an inducing-point kernel's (the sum of two such kernels): a plain sum,
            # which the closed forms read as two roots; linear_operator's add_low_rank took a Lanczos inverse root of
            # the first, silently
            return SumLinearOperator(self, other)
        involved = _is_ours(other) or _is_lazy_block_mean(self) or _holds_ours(self)
        # an inducing-point kernel's root plus a GPyTorch ConstantKernel's matrix (their AdditiveKernel evaluates the
        # sum itself, inside a ScaleKernel): a root and a one-block term, closed form
        involved = involved or _root_and_constant(self, other) or _root_and_constant(other, self)
        if involved and isinstance(other, LinearOperator):
            res = add_structured(self, other)
            if res is not None:
                return res
            evaluated = self.evaluate_kernel() if _is_lazy_block_mean(self) else self
            if isinstance(evaluated, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator)) and isinstance(
                other, DiagLinearOperator
            ):  # a group kernel (or IndexKernel) times an inducing-point kernel is a low-rank root: plus noise, the
                # sum with that root, in closed form (linear_operator's low-rank-plus-diagonal operator factorised its
                # capacitance in the operator's dtype: float32 multitask SGPR variances 500x off)
                return closed_form(evaluated + other)
            fallback = fallback_sum(self, other)
            if fallback is not None:
                return fallback
        elif isinstance(other, DiagLinearOperator) and _is_lazy_root(self):
            res = add_lazy_root(self, other)
            if res is not None:
                return res
        if isinstance(other, BlockMeanLCMLinearOperator) and _lcm_terms(self, other.shape) is not None:
            return other + self  # Kron(M, K) + (an LCMKernel's sum): the sum's own addition, which keeps its terms
        if _kronecker_of_ours(self) or _kronecker_of_ours(other):
            return _announced_kronecker(unrouted(self, other))
        if isinstance(self, DiagLinearOperator) and isinstance(other, _ClosedKroneckerSum):
            # D + (M (x) K + I (x) Sigma): the sum's own addition, which folds a diagonal that is the same at every
            # point of a task into its noise (the closed form) and announces any other
            return other + self
        if isinstance(other, LinearOperator) and (
            isinstance(self, _KroneckerOfBlockMean) or isinstance(other, _KroneckerOfBlockMean)
        ):
            # an LCMKernel's sum of Kronecker products with block mean factors, plus the likelihood's noise:
            # linear_operator's AddedDiagLinearOperator factorised it densely up to max_cholesky_size and took CG and
            # Lanczos beyond, silently (a user trial: 1.6 nats off at 1,000 rows); no closed form, so a sum that warns
            res = unrouted(self, other)
            return _as_fallback(res) if type(res) in (SumLinearOperator, AddedDiagLinearOperator) else res
        if isinstance(other, RootLinearOperator) and _IN_BLOCK_MEAN_PRODUCT.get() and _scaled_dense(self):
            # a dense matrix plus a root (a LinearKernel's) inside a product kernel with a block mean, group or task
            # factor (between the new points of a batch of test sets whose ids differ, where a group kernel's matrix
            # is dense): linear_operator's add_low_rank took a root of the dense matrix (a jittered Cholesky, Lanczos
            # past max_cholesky_size: variances up to 86% off, silently); a plain sum, which the product forms densely
            return SumLinearOperator(self, other)
        return unrouted(self, other)

    __add__._bma_gp_original = original
    return __add__


def _root_and_constant(root, constant) -> bool:
    """Whether ``root`` is a low-rank root (an inducing-point kernel's, evaluated or lazy) and ``constant`` GPyTorch's
    ``ConstantKernel`` matrix (an expanded constant): their sum is a closed-form one."""
    is_root = _is_lazy_root(root) or isinstance(root, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator))
    return is_root and isinstance(constant, LinearOperator) and _expanded_constant(constant) is not None


def _lazy_roots(left, right) -> bool:
    """Whether ``left`` and ``right`` are both ``U U^T`` roots of the same shape, one of them held as its inputs
    (:class:`~bma_gp._lazy_root.LazyRoot`, an inducing-point kernel's), or both of low rank."""
    if not (isinstance(left, RootLinearOperator) and isinstance(right, RootLinearOperator)):
        return False
    if left.shape != right.shape:
        return False
    if isinstance(left.root, LazyRoot) or isinstance(right.root, LazyRoot):
        return True
    # two low-rank roots (GPyTorch's InducingPointKernels summed): linear_operator's add_low_rank factorised the first
    # densely (an n x n Cholesky, or Lanczos past max_cholesky_size) while the kernel was evaluated
    return all(isinstance(op, LowRankRootLinearOperator) and op.root.shape[-1] < op.shape[-1] for op in (left, right))


def _root_leaves(op) -> tuple[int, bool]:
    """``(roots, ok)``: the number of low-rank roots in ``op`` and whether every summand of it (through plain sums,
    added diagonals and linear_operator's root-plus-diagonal operator) is a low-rank root (``U U^T`` with fewer
    columns than rows, or an inducing-point kernel's lazy root) or a diagonal."""
    if isinstance(op, (DiagLinearOperator, ZeroLinearOperator)):  # (also ConstantDiagLinearOperator)
        return 0, True
    if isinstance(op, LowRankRootAddedDiagLinearOperator):
        parts = (op._linear_op, op._diag_tensor)
    elif isinstance(op, SumLinearOperator) and not isinstance(op, _WarnsWhenFactorised):  # also AddedDiag...
        parts = op.linear_ops
    elif isinstance(op, RootLinearOperator):
        root = op.root
        return 1, isinstance(root, LazyRoot) or (
            isinstance(op, LowRankRootLinearOperator) and root.shape[-1] < op.shape[-1]
        )
    else:
        return 0, False
    count = 0
    for part in parts:
        roots, ok = _root_leaves(part)
        if not ok:
            return 0, False
        count += roots
    return count, True


def _low_rank_closed_form(left, right) -> LinearOperator | None:
    """``left + right`` (:func:`_low_rank_sum`) as this package's sum with the roots side by side, where its per-point
    diagonal is positive (what its closed forms divide by; one host read). Else ``None``: linear_operator's own sum,
    as before (a matrix with a zero on the diagonal that the roots make positive definite is still solved there)."""
    res = add_structured(left, right)
    if not isinstance(res, BlockMeanSumLinearOperator):
        return None
    d = res.diag_values.detach()
    if d.is_meta:
        return res
    # Woodbury divides by d: a d_i tiny against the matrix's diagonal (the roots' row norms) loses what rounding
    # keeps of it (d_i = 1e-12 beside roots of size 1: solves 2e-5 off; 1e-40: 7e22 off, silently), where a dense
    # Cholesky of the same well-conditioned matrix is exact. Such a sum stays linear_operator's
    floor = math.sqrt(torch.finfo(core_dtype(d.dtype)).eps) * res._diagonal().detach().abs().amax(-1, keepdim=True)
    return res if bool((d > floor).all()) else None


def _one_matrix_size(ops) -> bool:
    """Whether the operators are matrices of one size whose batch shapes broadcast (a batch of roots plus one
    diagonal: linear_operator's sum of them expands the diagonal when it rebuilds itself, and a rebuild must not
    change the class, so the first sum is routed as its rebuild would be)."""
    try:
        torch.broadcast_shapes(*(op.batch_shape for op in ops))
    except RuntimeError:
        return False
    return all(op.shape[-2:] == ops[0].shape[-2:] for op in ops)


def _low_rank_sum(left, right) -> bool:
    """Whether ``left + right`` is two or more low-rank roots plus diagonals, of one shape (:func:`_root_leaves`):
    ``(R1 + R2) + D``, ``R1 + (R2 + D)``, ``D + (R1 + R2)``. Their sum has a closed form (Woodbury with the roots
    side by side); linear_operator's ``AddedDiagLinearOperator`` / ``SumLinearOperator`` of them factorised the
    ``n x n`` matrix densely, or ran CG and Lanczos past ``max_cholesky_size``, without a word."""
    if not (isinstance(left, LinearOperator) and isinstance(right, LinearOperator)):
        return False
    if not _one_matrix_size([left, right]):
        return False
    roots_left, ok_left = _root_leaves(left)
    if not ok_left:
        return False
    roots_right, ok_right = _root_leaves(right)
    return ok_right and roots_left + roots_right >= 2


def _in_matmul_family(op) -> bool:
    """Whether a factor of a matrix product is one of this package's operators (or a fallback made of them)."""
    return _is_ours(op) or _holds_ours(op) or isinstance(op, _WarnsWhenFactorised)


def _times_constant_diagonal(left, right) -> LinearOperator | None:
    """``c I @ M`` or ``M @ c I`` for a block mean operator or sum ``M``: ``c M``, in closed form (linear_operator's
    Kronecker solves whiten each factor by the noise's factors, ``ConstantDiagLinearOperator``s for a
    ``MultitaskKernel`` under a ``MultitaskGaussianLikelihood``); None otherwise."""
    for diag, op in ((left, right), (right, left)):
        if (
            isinstance(diag, ConstantDiagLinearOperator)
            and isinstance(op, (BlockMeanLinearOperator, BlockMeanSumLinearOperator))
            and diag.shape[-1] == op.shape[-1]
        ):
            return op._mul_constant(diag.diag_values.squeeze(-1))
    return None


def _hooked_matmul(original):
    """``LinearOperator.matmul``: a product of two operators, one of them this package's (``M @ S``,
    ``DenseLinearOperator(A) @ M``, a third partition), is a :class:`FallbackMatmulLinearOperator`, whose solves
    warn and use LU, not a silent ``MatmulLinearOperator`` (whose solvers assume symmetry). Products with tensors
    and products of other operators are linear_operator's own."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def matmul(self, other):
        scaled = _times_constant_diagonal(self, other)
        if scaled is not None:
            return scaled
        if isinstance(other, LinearOperator) and (_in_matmul_family(self) or _in_matmul_family(other)):
            _matmul_broadcast_shape(self.shape, other.shape)
            return FallbackMatmulLinearOperator(self, other)
        return unrouted(self, other)

    matmul._bma_gp_original = original
    return matmul


def _scaled_low_rank(op, constants: Tensor) -> LinearOperator | None:
    r"""``c U U^T`` (``+ c D``) for one constant per batch entry, ``c`` of shape ``(*batch)``: the root scaled by
    :math:`\sqrt{c}`, a ``(*batch, n, m)`` low-rank root again. linear_operator takes such a constant for one only when
    it has the operator's batch shape; a ``ScaleKernel(batch_shape=(t,))`` around an unbatched SGPR kernel
    (``ChunkedInducingPointKernel``, GPyTorch's ``InducingPointKernel``) reached its elementwise product, which formed
    the dense ``(t, n, n)`` matrix, and the sums with group kernels and noise then lost their closed forms. Only for
    positive constants outside :mod:`torch.func` transforms: a negative constant has no real square root and the
    derivative of :math:`\sqrt{c}` at 0 is infinite, so those take linear_operator's product, as they do without
    this package (None)."""
    from linear_operator import to_dense

    from bma_gp.kernels.chunked_inducing_point_kernel import _RootWithDiagonal

    if functorch_wrapped(constants) or not bool((constants > 0).all()):
        # a torch.func transform (vmap: no test of values), or a constant that is 0 (the derivative of sqrt(c) there
        # is infinite: a NaN gradient where linear_operator's product gives U U^T) or negative (no real square root):
        # linear_operator's own product, as without this package (a sum with a block mean operator then warns)
        return None
    low_rank = op._linear_op if isinstance(op, LowRankRootAddedDiagLinearOperator) else op
    root = low_rank.root
    root = root.materialize() if isinstance(root, LazyRoot) else to_dense(root)
    dtype = torch.promote_types(root.dtype, constants.dtype)  # as torch's product promotes (float32 root, float64 c)
    factor = constants.to(dtype)
    root = root.to(dtype) * factor.sqrt()[..., None, None]
    known = getattr(low_rank, "_known_diagonal", None)
    scaled: LinearOperator = (  # the diagonal summed with U, scaled as U U^T is
        _RootWithDiagonal(root, known * factor[..., None])
        if isinstance(low_rank, _RootWithDiagonal) and known is not None
        else LowRankRootLinearOperator(root)
    )
    if isinstance(op, LowRankRootAddedDiagLinearOperator):
        return LowRankRootAddedDiagLinearOperator(
            scaled, DiagLinearOperator(op._diag_tensor._diagonal() * factor[..., None])
        )
    return scaled


def _hooked_root_diag_mul_constant(original):
    """``LowRankRootAddedDiagLinearOperator._mul_constant``: linear_operator's asks ``if other > 0``, which raised
    "Boolean value of Tensor with more than one value is ambiguous" for one constant per batch entry (the test
    covariance of a batch ``ScaleKernel`` around an SGPR kernel in eval mode, whose inputs are expanded to the batch).
    Nonnegative constants scale the root by their square roots; others take linear_operator's negative branch."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def _mul_constant(self, other):
        if not (torch.is_tensor(other) and other.dim() > 0):
            return unrouted(self, other)
        if bool((other >= 0).all()):
            scaled = _scaled_low_rank(self, other)
            if scaled is not None:
                return scaled
        # a negative constant, or a zero one (the root's square-root scaling has an infinite derivative there): the
        # generic multiple of the root plus the scaled diagonal (a user trial: None was returned for a 0)
        root = ConstantMulLinearOperator(self._linear_op, other)
        return AddedDiagLinearOperator(root, self._diag_tensor._mul_constant(other))

    _mul_constant._bma_gp_original = original
    return _mul_constant


def _scales_lazily(op) -> bool:
    """Whether ``op`` is a covariance the package's predictions read in structured form and a batch of constants
    should keep lazy: a group kernel's test-by-training covariance (:class:`BlockCrossLinearOperator`), a low-rank
    product (an inducing-point kernel's), or a plain sum of such terms and block mean operators."""
    from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator

    if isinstance(op, (BlockCrossLinearOperator, MatmulLinearOperator)) or (
        _is_ours(op) and not _is_lazy_block_mean(op)
    ):
        return True
    if adds_exactly(op):  # a predictive covariance: one constant per batch entry keeps its exact solves
        return True
    return type(op) is SumLinearOperator and all(_scales_lazily(term) for term in op.linear_ops)


# set while GPyTorch's ProductKernel with a block mean or group kernel among its factors evaluates (its forward,
# bma_gp.kernels.sum_prediction_strategy): the products it forms there of constant multiples of dense matrices are
# formed densely; linear_operator's own products elsewhere are left as they are
_IN_BLOCK_MEAN_PRODUCT: contextvars.ContextVar[bool] = contextvars.ContextVar("_bma_gp_product", default=False)


def block_mean_product():
    """The extent of a product kernel's evaluation with a block mean or group kernel among its factors."""
    return _raised(_IN_BLOCK_MEAN_PRODUCT)


def _hooked_identity_mul_matrix(original):
    """``IdentityLinearOperator._mul_matrix``: linear_operator's returns the other factor unchanged, which is the
    elementwise product only for a diagonal; for this package's operators and predictive covariances (whose ``I * A``
    was ``A``, wrong off the diagonal) the diagonal of ``A``, times the identity's batch of ones."""

    @functools.wraps(original)
    def _mul_matrix(self, other):
        if (
            isinstance(other, LinearOperator)
            and not isinstance(other, DiagLinearOperator)
            and (_is_ours(other) or adds_exactly(other) or isinstance(other, _WarnsWhenFactorised))
            and other.shape[-1] == other.shape[-2]
        ):
            return DiagLinearOperator(other.evaluate_kernel()._diagonal() * self._diagonal())
        return original(self, other)

    _mul_matrix._bma_gp_original = original
    return _mul_matrix


def _hooked_mul_matrix(original):
    """``LinearOperator._mul_matrix`` (the elementwise product ``A * B``, ``A.mul(B)``): when a factor is a lazily
    evaluated kernel tensor with a block mean or group kernel, or the other factor is a block mean operator, the block
    mean operator's own ``_mul_matrix``: a closed form for two of them (over the intersection of their partitions) or
    a diagonal, else its :class:`ClosedFormFallbackWarning`. linear_operator's evaluates a lazy kernel tensor and
    multiplies the roots of both factors without a word (a dense ``n x n`` Cholesky for a GPyTorch Hadamard multitask
    model, ``covar_module(x).mul(task_covar_module(i))``, and for ``GroupKernel()(g).mul(BlockMeanKernel(...)(x))``,
    which is a block mean operator)."""

    unrouted = _unrouted(original)

    def own(op) -> bool:
        return isinstance(op, (BlockMeanLinearOperator, BlockMeanSumLinearOperator))

    @functools.wraps(original)
    def _mul_matrix(self, other):
        constants = batch_constants(other)
        if constants is not None and isinstance(self, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator)):
            scaled = _scaled_low_rank(self, constants)
            if scaled is not None:
                return scaled
        if constants is not None and (
            _scales_lazily(self) or (_IN_BLOCK_MEAN_PRODUCT.get() and _task_lookup(self) is not None)
        ):
            # one constant per batch entry, in a batch that broadcasts against the operator's rather than equals it (a
            # ScaleKernel with batch_shape=(S,) around an unbatched kernel, at test inputs (b, 1, q, d)): the lazy
            # constant multiple that linear_operator's mul gives for equal batches, where its _mul_matrix multiplied the
            # test-by-training covariance densely and the prediction left its closed form
            shape = torch.broadcast_shapes(self.batch_shape, constants.shape)
            operand = self if shape == self.batch_shape else self._expand_batch(shape)
            return operand._mul_constant(constants.expand(shape))
        if (
            constants is None
            and isinstance(other, LinearOperator)
            and not isinstance(other, DiagLinearOperator)
            and not isinstance(self, DiagLinearOperator)
            and (_known_nonsymmetric(self) or _known_nonsymmetric(other))
        ):
            if isinstance(other, BlockMeanProductLinearOperator) and not isinstance(
                self, BlockMeanProductLinearOperator
            ):
                return other._mul_matrix(self)  # its own rules (dense: formed, warned; other operators: refused)
            # X * A for an A known not to be symmetric (a fallback made of one, in either order): the dense product,
            # which warns and solves with LU; linear_operator's dense product was solved by Cholesky (0.4-5% off)
            return _dense_elementwise(self, other)
        inducing = isinstance(other, LinearOperator) and _is_inducing(self)  # (a torch.equal of the inputs: once)
        if inducing or (isinstance(other, LinearOperator) and _is_inducing(other)):
            root, factor = (self, other) if inducing else (other, self)
            root, factor = root.evaluate_kernel(), factor.evaluate_kernel()
            res = root_times_block_mean(root, factor)
            if res is not None:
                return res
            # no root of the product (task ids that differ across a batch of test sets, a task matrix that is not
            # positive definite, a per-point part, another kernel): exact entries, not linear_operator's product of
            # roots (a jittered Cholesky, Lanczos past max_cholesky_size: variances up to 99% off, without a word)
            return _dense_elementwise(root, factor)
        if isinstance(other, LinearOperator) and (
            _is_lazy_block_mean(self) or _is_lazy_block_mean(other) or (not own(self) and own(other))
        ):
            left, right = self.evaluate_kernel(), other.evaluate_kernel()
            res = None
            if own(left):
                res = left._mul_matrix(right)
            elif own(right):  # the elementwise product commutes
                res = right._mul_matrix(left)
            elif isinstance(left, FallbackSumLinearOperator) and not isinstance(right, DiagLinearOperator):
                res = _dense_elementwise(left, right)  # exact entries, not a product of jittered roots
            elif isinstance(right, FallbackSumLinearOperator) and not isinstance(left, DiagLinearOperator):
                res = _dense_elementwise(right, left)
            if res is not None:
                if isinstance(res, BlockMeanLinearOperator) and _is_lazy_kernel(self) and _is_lazy_kernel(other):
                    # a prior GPyTorch cannot ask a kernel for its strategy (no LazyEvaluatedKernelTensor): marked for
                    # bma_gp.kernels.task_prediction_strategy, which gives it the block mean strategy
                    res._bma_gp_kernel_product = True
                return res
        if isinstance(other, LinearOperator) and _IN_BLOCK_MEAN_PRODUCT.get():
            left, right = self.evaluate_kernel(), other.evaluate_kernel()
            if _scaled_dense(left) or _scaled_dense(right):
                # c D, a ScaleKernel around a covariance held densely (a BlockMeanKernel's between new points): a dense
                # matrix, which linear_operator multiplies densely only when it is a DenseLinearOperator itself, and
                # otherwise through roots of both factors (a jittered Cholesky, Lanczos past max_cholesky_size: a user
                # trial's predictive variances of ScaleKernel(GroupKernel * BlockMeanKernel) * IndexKernel at 1000 new
                # points were up to 100% off). Its product is as dense as the factor already is: exact entries. So is
                # a sum of such matrices ((ScaleKernel(BlockMeanKernel) + GroupKernel) * IndexKernel between the new
                # points of a batch of test sets whose ids differ: Lanczos, silently)
                return DenseLinearOperator(left.to_dense() * right.to_dense())
        if isinstance(other, LinearOperator) and (adds_exactly(self) or adds_exactly(other)):
            # a predictive covariance times a matrix: linear_operator's MulLinearOperator of the roots of both factors
            # (a jittered Cholesky, Lanczos past max_cholesky_size: the root of pred * I was 69% off, silently). Times
            # a diagonal it is the diagonal of products; otherwise exact entries, formed densely with a warning
            pred, factor = (self, other) if adds_exactly(self) else (other, self)
            if isinstance(factor, DiagLinearOperator) and pred.shape[-1] == pred.shape[-2]:
                return DiagLinearOperator(pred._diagonal() * factor._diagonal())
            return _dense_elementwise(pred, factor)
        if (
            isinstance(other, LinearOperator)
            and isinstance(self, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator))
            and self.batch_shape != other.batch_shape
        ):
            # a low-rank root this module scaled by a batch of constants (_scaled_low_rank: a batched ScaleKernel
            # around GPyTorch's InducingPointKernel) times an unbatched factor: linear_operator's product takes roots
            # of both factors and refuses roots of different batch shapes, where GPyTorch's own scaled operator went
            # through; the factors broadcast to one batch first
            shape = torch.broadcast_shapes(self.batch_shape, other.batch_shape)
            left = self if self.batch_shape == shape else self._expand_batch(shape)
            right = other if other.batch_shape == shape else other._expand_batch(shape)
            return unrouted(left, right)
        return unrouted(self, other)

    _mul_matrix._bma_gp_original = original
    return _mul_matrix


def _is_inducing(op) -> bool:
    """A ``ChunkedInducingPointKernel``'s covariance among one set of inputs, lazily evaluated (training or eval mode),
    evaluated in training (:func:`_is_lazy_root`), or a low-rank operator evaluated inside a product kernel with a
    block mean, group or inducing-point factor (the product kernel's forward, :func:`block_mean_product`)."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor

    from bma_gp.kernels import ChunkedInducingPointKernel

    if isinstance(op, LazyEvaluatedKernelTensor):
        if not isinstance(op.kernel, ChunkedInducingPointKernel):
            return False
        return op.x1 is op.x2 or (op.x1.shape == op.x2.shape and torch.equal(op.x1, op.x2))
    if _IN_BLOCK_MEAN_PRODUCT.get() and isinstance(op, (LowRankRootLinearOperator, LowRankRootAddedDiagLinearOperator)):
        return True  # evaluated inside a product kernel with such a factor (GPyTorch evaluates its factors eagerly)
    return _is_lazy_root(op)


def root_times_block_mean(root, other) -> LinearOperator | None:
    r"""An inducing-point kernel's ``U U^T`` (training: a :class:`~bma_gp.kernels._rbf_gram.LazyRootOperator`; eval:
    GPyTorch's ``U U^T + diag(c)``, its diagonal correction) times a block mean operator elementwise
    (``ChunkedInducingPointKernel * IndexKernel``, a multitask SGPR): with the task matrix :math:`C = L L^\top`
    (positive definite, any number of tasks, batched or not) and no per-point part (:math:`\lambda = 0`), the low-rank
    root :math:`R_{a, (i, \rho)} = U_{ai} L_{x_a \rho}` of rank ``m k_X`` (plus :math:`\operatorname{diag}(c \cdot
    C_{x_a x_a})`), which sums with groupings take in closed form; else ``None``, and the callers form the product
    densely with exact entries (:func:`_dense_elementwise`)."""
    from bma_gp.block_mean_sum_linear_operator import as_block_mean_factor, rows_times_root
    from bma_gp.kernels._rbf_gram import LazyRootOperator

    diag = None
    if isinstance(root, LowRankRootAddedDiagLinearOperator):
        diag, root = root._diag_tensor.diagonal(dim1=-2, dim2=-1), root._linear_op
    if not isinstance(root, LowRankRootLinearOperator):
        return None
    X = as_block_mean_factor(other)
    if X is None or not X.symmetric or X.shape[-1] != root.shape[-1] or bool(X.lam.ne(0).any()):
        return None
    C = X._b_sym()  # batched where the test inputs are (a batch of test sets): a batch of roots
    factor, info = torch.linalg.cholesky_ex(C)
    if not bool((info == 0).all()):
        return None
    U = (root._formed() if isinstance(root, LazyRootOperator) else root).root.to_dense()
    res = LowRankRootLinearOperator(rows_times_root(U, factor.index_select(-2, X.partition.labels)))
    return res if diag is None else res + DiagLinearOperator(diag * X.diagonal())


def unscaled(op):
    """``op`` without the constant multiples around it (``ConstantMulLinearOperator``s, at any depth: nested
    ``ScaleKernel``s)."""
    while isinstance(op, ConstantMulLinearOperator):
        op = op.base_linear_op
    return op


def _scaled_dense(op) -> bool:
    """Whether ``op`` is a dense matrix, or one times constants (a ``DenseLinearOperator`` under
    :func:`unscaled`), or linear_operator's plain sum of such matrices (its summands held densely already), roots
    ``R R^T`` among them (a ``LinearKernel``'s, no larger than the dense summand beside it)."""
    op = unscaled(op)
    if type(op) is SumLinearOperator:
        parts = [unscaled(part) for part in op.linear_ops]
        return any(_scaled_dense(part) for part in parts) and all(
            _scaled_dense(part) or isinstance(part, RootLinearOperator) for part in parts
        )
    return isinstance(op, DenseLinearOperator)


def _has_dense_summand(kernel) -> bool:
    """Whether ``kernel`` (a sum, possibly scaled) has a summand with no block mean, group or inducing-point kernel in
    it (an RBF kernel, say), which makes the evaluated matrix a dense one. Products and other kernels are not looked
    into: they evaluate as before."""
    from gpytorch.kernels import AdditiveKernel, InducingPointKernel, ScaleKernel

    if isinstance(kernel, ScaleKernel):
        return _has_dense_summand(kernel.base_kernel)
    if isinstance(kernel, AdditiveKernel):
        return any(
            _has_dense_summand(part)
            if isinstance(part, (ScaleKernel, AdditiveKernel))
            else not (_involves_block_mean(part) or isinstance(part, InducingPointKernel))
            for part in kernel.kernels
        )
    return False


def _hooked_add_diagonal(original):
    """``add_diagonal`` (and ``add_jitter``) of a lazily evaluated kernel tensor with a block mean or group kernel:
    the evaluated operator's, closed form. Where a summand is outside the family (``RBFKernel() + GroupKernel()``)
    the evaluated matrix is dense anyway: the lazy tensor plus the diagonal as a
    :class:`FallbackSumLinearOperator`, which warns when it is factorised and keeps the kernel unevaluated for what
    needs only its diagonal or products (an approximate GP's ``data_data_covar.add_jitter()`` then ``.diagonal()``,
    where evaluating formed the ``n x n`` matrix: 10 GB at n = 50,000)."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def add_diagonal(self, diag):
        if _is_lazy_block_mean(self):
            if not _has_dense_summand(self.kernel):
                return self.evaluate_kernel().add_diagonal(diag)
            res = unrouted(self, diag)
            if isinstance(res, AddedDiagLinearOperator):
                return FallbackSumLinearOperator(self, res._diag_tensor)
            return res
        return unrouted(self, diag)

    add_diagonal._bma_gp_original = original
    return add_diagonal


def _hooked_sum_add_diagonal(original):
    """``add_diagonal`` of a plain ``SumLinearOperator`` that holds a block mean operator: the closed form when
    every term has one, else a :class:`FallbackSumLinearOperator` (which warns), not a silent generic sum."""

    unrouted = _unrouted(original)

    @functools.wraps(original)
    def add_diagonal(self, diag):
        res = unrouted(self, diag)
        if isinstance(res, AddedDiagLinearOperator) and _low_rank_sum(self, res._diag_tensor):
            routed = _low_rank_closed_form(self, res._diag_tensor)  # low-rank roots plus the diagonal: closed form
            if routed is not None:
                return routed
        if _holds_ours(self) and isinstance(res, AddedDiagLinearOperator):
            routed = add_structured(self, res._diag_tensor)
            return routed if routed is not None else FallbackSumLinearOperator(*self.linear_ops, res._diag_tensor)
        return res

    add_diagonal._bma_gp_original = original
    return add_diagonal


def _hooked_evaluated(original, name):
    """``name`` of a lazily evaluated kernel tensor: with a block mean or group kernel, the evaluated operator's own
    (closed-form) method; linear_operator's default would run Lanczos on its products (a rank-100 root of a
    random-intercept covariance with 300 groups reproduced 3% of it)."""

    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        if _is_lazy_block_mean(self):
            return getattr(self.evaluate_kernel(), name)(*args, **kwargs)
        return original(self, *args, **kwargs)

    hooked._bma_gp_original = original
    return hooked


def _hooked_added_diag_evaluate_kernel(original):
    """``AddedDiagLinearOperator.evaluate_kernel``: linear_operator rebuilds the operator from its representation and
    reads the rebuilt one's ``_linear_op`` and ``_diag_tensor``; where that rebuild is routed (an evaluated sum with a
    fallback or block mean summand plus a diagonal becomes the package's sum, say a
    :class:`FallbackSumLinearOperator`), the rebuilt operator is that sum, evaluated already. It raised
    ``AttributeError`` (no ``_linear_op``), for plain GPyTorch models too: ``InducingPointKernel + ConstantKernel +
    RBFKernel`` failed in ``ExactMarginalLogLikelihood``."""

    @functools.wraps(original)
    def evaluate_kernel(self):
        rebuilt = self.representation_tree()(*self.representation())
        if isinstance(rebuilt, AddedDiagLinearOperator):
            return rebuilt._linear_op + rebuilt._diag_tensor
        return rebuilt

    evaluate_kernel._bma_gp_original = original
    return evaluate_kernel


def install() -> None:
    """Route sums that involve block mean operators to the closed forms (idempotent)."""
    from gpytorch.lazy import LazyEvaluatedKernelTensor
    from linear_operator.operators import (
        DenseLinearOperator,
        KroneckerProductLinearOperator,
        LowRankRootLinearOperator,
        TriangularLinearOperator,
    )

    classes = [
        LinearOperator,
        AddedDiagLinearOperator,
        DenseLinearOperator,
        DiagLinearOperator,
        ConstantDiagLinearOperator,
        LowRankRootAddedDiagLinearOperator,
        LowRankRootLinearOperator,
        SumLinearOperator,
        ZeroLinearOperator,
        TriangularLinearOperator,
        KroneckerProductLinearOperator,
        LazyEvaluatedKernelTensor,
    ]
    for cls in classes:
        method = cls.__dict__.get("__add__")
        if method is not None and not hasattr(method, "_bma_gp_original"):
            cls.__add__ = _hooked_add(method)
    method = KroneckerProductLinearOperator.__dict__["add_diagonal"]
    if not hasattr(method, "_bma_gp_original"):
        KroneckerProductLinearOperator.add_diagonal = _hooked_kron_add_diagonal(method)
    method = KroneckerProductLinearOperator.__dict__.get("sqrt_inv_matmul", LinearOperator.sqrt_inv_matmul)
    if not hasattr(method, "_bma_gp_original"):
        KroneckerProductLinearOperator.sqrt_inv_matmul = _hooked_kron_sqrt_inv_matmul(method)
    for name, hook in (
        ("_logdet", _hooked_kron_logdet),
        ("inv_quad_logdet", _hooked_kron_inv_quad_logdet),
        ("inv_quad", _hooked_kron_inv_quad),
        ("solve", _hooked_kron_solve),
    ):
        method = KroneckerProductLinearOperator.__dict__.get(name) or getattr(LinearOperator, name)
        if not hasattr(method, "_bma_gp_original"):
            setattr(KroneckerProductLinearOperator, name, hook(method))
    method = AddedDiagLinearOperator.__dict__["evaluate_kernel"]
    if not hasattr(method, "_bma_gp_original"):
        AddedDiagLinearOperator.evaluate_kernel = _hooked_added_diag_evaluate_kernel(method)
    if not hasattr(LinearOperator.matmul, "_bma_gp_original"):  # subclasses reach it through super().matmul
        LinearOperator.matmul = _hooked_matmul(LinearOperator.matmul)
    method = LowRankRootAddedDiagLinearOperator._mul_constant
    if not hasattr(method, "_bma_gp_original"):
        LowRankRootAddedDiagLinearOperator._mul_constant = _hooked_root_diag_mul_constant(method)
    if not hasattr(LinearOperator._mul_matrix, "_bma_gp_original"):  # also LazyEvaluatedKernelTensor's (inherited)
        LinearOperator._mul_matrix = _hooked_mul_matrix(LinearOperator._mul_matrix)
    from linear_operator.operators import IdentityLinearOperator

    if not hasattr(IdentityLinearOperator._mul_matrix, "_bma_gp_original"):
        IdentityLinearOperator._mul_matrix = _hooked_identity_mul_matrix(IdentityLinearOperator._mul_matrix)
    method = LazyEvaluatedKernelTensor.__dict__.get("add_diagonal", None)
    if method is None:
        LazyEvaluatedKernelTensor.add_diagonal = _hooked_add_diagonal(LinearOperator.add_diagonal)
    elif not hasattr(method, "_bma_gp_original"):
        LazyEvaluatedKernelTensor.add_diagonal = _hooked_add_diagonal(method)
    if not hasattr(SumLinearOperator.add_diagonal, "_bma_gp_original"):
        SumLinearOperator.add_diagonal = _hooked_sum_add_diagonal(SumLinearOperator.add_diagonal)
    # the task layouts (BlockDiagLinearOperator, BlockInterleavedLinearOperator) of a batch of block mean operators:
    # add_diagonal / add_jitter and W * c reach the closed forms that W + DiagLinearOperator(d) reaches
    from linear_operator.operators.block_linear_operator import BlockLinearOperator

    if not hasattr(BlockLinearOperator.add_diagonal, "_bma_gp_original"):
        BlockLinearOperator.add_diagonal = _hooked_tasks_add_diagonal(BlockLinearOperator.add_diagonal)
    if not hasattr(BlockLinearOperator._mul_constant, "_bma_gp_original"):
        BlockLinearOperator._mul_constant = _hooked_tasks_mul_constant(BlockLinearOperator._mul_constant)
    # observation_nan_policy("mask"): the principal submatrix at the observed points, again in the family
    from linear_operator.operators import MaskedLinearOperator

    original_new = MaskedLinearOperator.__new__
    if not hasattr(original_new, "_bma_gp_original"):
        MaskedLinearOperator.__new__ = _hooked_masked_new(original_new)
    if not hasattr(LinearOperator._svd, "_bma_gp_original"):
        LinearOperator._svd = _hooked_svd(LinearOperator._svd)
    original_new = InterpolatedLinearOperator.__dict__.get("__new__", object.__new__)
    if not hasattr(original_new, "_bma_gp_original"):
        InterpolatedLinearOperator.__new__ = _hooked_interpolated_new(original_new)
    # sums and constant multiples built directly (AddedDiagLinearOperator(M, D), ConstantMulLinearOperator(M, c)):
    # the closed forms that M + D and M * c reach, not linear_operator's silent CG
    for cls in (SumLinearOperator, AddedDiagLinearOperator, ConstantMulLinearOperator):
        original_new = cls.__dict__.get("__new__", object.__new__)
        if not hasattr(original_new, "_bma_gp_original"):
            cls.__new__ = _hooked_generic_new(original_new)
        original_init = cls.__dict__["__init__"]
        if not hasattr(original_init, "_bma_gp_original"):
            cls.__init__ = _hooked_generic_init(original_init)
    for cls in (KroneckerProductAddedDiagLinearOperator, SumKroneckerLinearOperator):
        original_new = cls.__dict__.get("__new__", object.__new__)
        if not hasattr(original_new, "_bma_gp_original"):
            cls.__new__ = _hooked_kron_sum_new(original_new)
    # the others reach the evaluated operator already; zero_mean_mvn_samples ran linear_operator's contour integral
    # quadrature on the lazy tensor under ciq_samples(True), and so did sqrt_inv_matmul (session 37: a MultitaskKernel
    # around a BlockMeanKernel, 0.55 off under max_cg_iterations(1), without a word)
    for name in ("root_decomposition", "root_inv_decomposition", "zero_mean_mvn_samples", "sqrt_inv_matmul"):
        method = getattr(LazyEvaluatedKernelTensor, name)
        if not hasattr(method, "_bma_gp_original"):
            setattr(LazyEvaluatedKernelTensor, name, _hooked_evaluated(method, name))
    # from_independent_mvns: a batch concatenation of block mean covariances, solved member by member
    from bma_gp._independent_cat import install as install_independent_cat

    install_independent_cat()
    # GPyTorch's leave-one-out objective: diag(K^{-1}) and K^{-1}(y - m) in closed form, not through a dense Cholesky
    from bma_gp._leave_one_out import install as install_leave_one_out

    install_leave_one_out()
    # kernel sums (AdditiveKernel) with a group or block mean kernel: the posterior at the training inputs too
    from bma_gp.kernels.sum_prediction_strategy import install as install_prediction

    install_prediction()
    # batch-independent multi-output models (from_batch_mvn) on block mean kernels: predicted task by task
    from bma_gp.kernels.task_prediction_strategy import install as install_task_prediction

    install_task_prediction()
    # a GroupKernel(rank=r) over many groups inside a MultitaskKernel: one block mean factor, not a sum
    from bma_gp.kernels.group_kernel import install as install_group_kernel

    install_group_kernel()
    # GPyTorch's lazily_evaluate_kernels blocks, scoped to the thread that enters them (another thread's evaluation
    # made this one's kernels eager and its predictions GPyTorch's default ones)
    from bma_gp._flag_scope import install as install_flag_scope

    install_flag_scope()
    # ScaleKernel(ConstantKernel()): the scaled constant held expanded (one value), not an n x n tensor, so that its
    # sum with a group or block mean kernel (covar_module = ScaleKernel(ConstantKernel()) + GroupKernel(k)) is closed
    from gpytorch.kernels import ScaleKernel

    method = ScaleKernel.__dict__["forward"]
    if not hasattr(method, "_bma_gp_original"):
        ScaleKernel.forward = _hooked_scale_forward(method)
    # BlockMeanKernel's lazily_evaluate_kernels(False) warning: tell GPyTorch's own evaluation from the user's setting
    from bma_gp.kernels.block_mean_kernel import install as install_lazy_mark

    install_lazy_mark()
