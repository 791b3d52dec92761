r"""Block sums of any gpytorch kernel matrix, by row chunks, checkpointed one chunk at a time.

Forward evaluates ``kernel(x[a:b], x)`` chunk by chunk under ``no_grad`` and reduces each
chunk into :math:`T = P^\top K P` and :math:`d = P^\top \operatorname{diag}(K)` at once.
The diagonal :math:`k(x_i, x_i)` comes from ``kernel(x[a:b], x[a:b], diag=True)``: in a chunk
``x1`` is not ``x2``, so gpytorch's distances there are not exactly zero on the diagonal (about
:math:`\sqrt{\epsilon}`, which a Matern-1/2 kernel turns into an error of that size).
Backward re-evaluates each chunk with autograd on and pulls the incoming gradient on
:math:`(T, d)`, spread over the chunk's entries, back through it. Memory is
:math:`O(n \cdot \text{chunk})` in both passes. The rows are sorted by block, so the
reduction over columns is a segment sum.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from gpytorch import settings as gpt_settings
from gpytorch.kernels import (
    AdditiveKernel,
    CosineKernel,
    GridInterpolationKernel,
    InducingPointKernel,
    Kernel,
    MaternKernel,
    PeriodicKernel,
    PiecewisePolynomialKernel,
    ProductKernel,
    RBFKernel,
    RQKernel,
    ScaleKernel,
    SpectralMixtureKernel,
)
from linear_operator import to_dense
from torch import Tensor

from bma_gp._autograd import first_order_only, reverse_mode_only, unbatched_backward
from bma_gp._kernel_sums.plan import KernelSumsPlan, all_reduce, chunk_ranges, progress
from bma_gp._precision import core_dtype

__all__ = [
    "GenericKernelSums",
    "centred_inputs",
    "check_parameters",
    "evaluate",
    "kernel_parameters",
    "translation_invariant",
]


def evaluate(kernel: Kernel, x1: Tensor, x2: Tensor) -> Tensor:
    """The dense matrix ``kernel(x1, x2)``."""
    with gpt_settings.lazily_evaluate_kernels(False):
        return to_dense(kernel(x1, x2))


def evaluate_diag(kernel: Kernel, x: Tensor, batch_shape: torch.Size) -> Tensor:
    """The exact diagonal ``k(x_i, x_i)``: ``x`` is passed as both inputs, so distances are zero. ``batch_shape`` is
    that of the kernel's values on ``x`` (the chunk's values). # shape: (*batch_shape, c)"""
    return kernel_diagonal(kernel, x, x, batch_shape)


def kernel_diagonal(kernel: Kernel, x1: Tensor, x2: Tensor, batch_shape: torch.Size | None = None) -> Tensor:
    """``kernel(x1, x2, diag=True)`` as a dense tensor of shape ``(*batch_shape, t)``, with ``x1`` and ``x2`` expanded
    to ``batch_shape`` (the batch shape of the kernel's values on them; found from one ``1 x 1`` evaluation when not
    given) first.

    GPyTorch's ``Kernel.__call__(diag=True)`` takes a result of shape ``(b, t)`` for unbatched inputs of ``t`` rows
    to be a ``t x t`` matrix when ``b == t``, and returns its diagonal, of shape ``(b,)``: a batch kernel (``batch_shape
    =(b,)``) over unbatched inputs of exactly ``b`` points gave a wrong diagonal (a chunk of ``b`` rows in the block
    sums, ``b`` test points in a prediction)."""
    same = x2 is x1
    if batch_shape is None:
        if not x1.shape[-2]:  # no point to evaluate the batch shape on (and no diagonal to take wrongly)
            with gpt_settings.lazily_evaluate_kernels(False):
                return to_dense(kernel(x1, x2, diag=True))
        batch_shape = evaluate(kernel, x1[..., :1, :], x2[..., :1, :]).shape[:-2]
    if x1.shape[:-2] != batch_shape:
        x1 = x1.expand(*batch_shape, *x1.shape[-2:])
    x2 = x1 if same else (x2 if x2.shape[:-2] == batch_shape else x2.expand(*batch_shape, *x2.shape[-2:]))
    try:
        with gpt_settings.lazily_evaluate_kernels(False):
            res = to_dense(kernel(x1, x2, diag=True))
    except (RuntimeError, ValueError, NotImplementedError) as error:
        # some GPyTorch kernels' diag mode fails where their full evaluation works (ProductStructureKernel wraps
        # its diagonal in a DenseLinearOperator): the diagonal of full evaluations of row chunks, O(t c) work
        try:
            return _diagonal_of_chunks(kernel, x1, x2)
        except Exception:
            raise error from None
    if res.shape != (*batch_shape, x1.shape[-2]):
        res = _diagonal_of_chunks(kernel, x1, x2)
        if res.shape != (*batch_shape, x1.shape[-2]):
            raise RuntimeError(
                f"{type(kernel).__name__}(x1, x2) gave values of batch shape {tuple(res.shape[:-1])} for "
                f"{x1.shape[-2]} points of batch shape {tuple(batch_shape)}; expected {tuple(batch_shape)}."
            )
    return res


def _grid_interpolated(kernel: Kernel) -> bool:
    """Whether ``kernel`` holds a ``GridInterpolationKernel`` (KISS-GP), whose grid follows the inputs of each call:
    its ``diag=True`` values on a chunk's rows alone differ from the diagonal of the matrix on all rows (2.6e-5)."""
    return any(isinstance(m, GridInterpolationKernel) for m in kernel.modules())


def _chunk_diagonal(kernel: Kernel, x_chunk: Tensor, values: Tensor, offset: int, own: bool) -> Tensor:
    """The diagonal entries of the chunk ``values = kernel(x_chunk, x)`` whose rows start at ``offset``: from the
    exact diagonal evaluation (:func:`evaluate_diag`; the chunk's own are off by ~sqrt(eps)), but with ``own`` (a
    kernel whose values depend on the whole call's inputs, :func:`_grid_interpolated`) the chunk's own, which are the
    matrix's."""
    if own:
        return torch.diagonal(values, offset=offset, dim1=-2, dim2=-1)
    return evaluate_diag(kernel, x_chunk, values.shape[:-2])


def _shares_graph(kernel: Kernel) -> bool:
    """Whether evaluations of ``kernel`` may share a part of the autograd graph (an eval-mode
    ``InducingPointKernel`` caches the root of its inducing points' covariance with the graph it was made with)."""
    return any(isinstance(m, InducingPointKernel) and not m.training for m in kernel.modules())


#: rows per full evaluation where a kernel's diag mode fails (:func:`_diagonal_of_chunks`)
DIAGONAL_CHUNK_ROWS = 256


def _diagonal_of_chunks(kernel: Kernel, x1: Tensor, x2: Tensor) -> Tensor:
    """``k(x1_i, x2_i)`` as the diagonals of ``kernel(x1[a:b], x2[a:b])`` over chunks of :data:`DIAGONAL_CHUNK_ROWS`
    rows: exact, for kernels whose ``diag=True`` mode fails or disagrees with their full evaluation."""
    t = x1.shape[-2]
    parts = [
        torch.diagonal(
            evaluate(kernel, x1[..., a : a + DIAGONAL_CHUNK_ROWS, :], x2[..., a : a + DIAGONAL_CHUNK_ROWS, :]),
            dim1=-2,
            dim2=-1,
        )
        for a in range(0, t, DIAGONAL_CHUNK_ROWS)
    ]
    return torch.cat(parts, dim=-1)


class _Bound:
    """``kernel`` called with the tensors ``bound`` in place of its named parameters (``functional_call``)."""

    def __init__(self, kernel: Kernel, bound: dict[str, Tensor]):
        self.kernel, self.bound = kernel, bound

    def __call__(self, x1: Tensor, x2: Tensor, **kwargs: Any):
        return torch.func.functional_call(self.kernel, self.bound, (x1, x2), kwargs)


#: GPyTorch kernels whose values depend on ``x1 - x2`` only (exact classes: a subclass may override ``forward``)
_TRANSLATION_INVARIANT = (
    CosineKernel,
    MaternKernel,
    PeriodicKernel,
    PiecewisePolynomialKernel,
    RBFKernel,
    RQKernel,
    SpectralMixtureKernel,
)


def translation_invariant(kernel: Kernel) -> bool:
    """Whether ``kernel`` is built from :data:`_TRANSLATION_INVARIANT` kernels by scaling, sums and products."""
    if type(kernel) is ScaleKernel:
        return translation_invariant(kernel.base_kernel)
    if type(kernel) in (AdditiveKernel, ProductKernel):
        return all(translation_invariant(child) for child in kernel.kernels)
    return type(kernel) in _TRANSLATION_INVARIANT


def centred_inputs(kernel: Kernel, x: Tensor) -> Tensor:
    """``x`` minus its (constant) column means when ``kernel`` only sees differences of inputs, else ``x``.

    A chunk is ``kernel(x[a:b], x)`` with unequal inputs, where GPyTorch's distances (``torch.cdist``, through
    ``|x1|^2 + |x2|^2 - 2 x1 x2`` without centring) lose what the offset of ``x`` squares: a ``PeriodicKernel`` on
    float32 decimal years (1958-2001) was off by 0.5 in the block means, where ``kernel(x, x)`` (centred by
    GPyTorch) is accurate. Values and gradients are unchanged in exact arithmetic.
    """
    if not translation_invariant(kernel):
        return x
    return x - x.detach().mean(-2, keepdim=True)


def entry_factor(kernel: Kernel, num_dims: int) -> int:
    """How many numbers per kernel entry the largest intermediate tensor of ``kernel``'s forward holds: GPyTorch's
    ``PeriodicKernel`` works on one difference per input dimension (``d x c x n``) and ``SpectralMixtureKernel`` on
    one per mixture and dimension (``Q x c x n x d``); the other kernels on about one. The generic engine divides its
    chunk by this factor, so that a chunk's memory stays near its budget (a spectral mixture of 10 components in
    5 dimensions took 13 GB at n = 6000 with a chunk sized for the kernel values alone)."""
    factor = 1
    for k in (kernel, *kernel.sub_kernels()):
        dims = len(k.active_dims) if k.active_dims is not None else num_dims
        if isinstance(k, SpectralMixtureKernel):
            factor = max(factor, k.num_mixtures * dims)
        elif isinstance(k, PeriodicKernel):
            factor = max(factor, dims)
    return factor


def kernel_parameters(kernel: Kernel) -> list[Tensor]:
    """The kernel's parameters, each once."""
    seen, out = set(), []
    for p in kernel.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def check_parameters(kernel: Kernel, x: Tensor, params: list[Tensor]) -> None:
    """Raise when the kernel's values depend on a tensor needing a gradient that is not in ``params``.

    :class:`GenericKernelSums` evaluates the kernel without a graph and differentiates only ``x`` and
    ``params`` in backward, so such a tensor (a module the kernel calls but does not register, a tensor
    stored as a plain attribute) would silently get no gradient. One entry is evaluated with a graph
    and the graph's leaves are compared with ``params``.
    """
    with torch.enable_grad():
        probe = evaluate(kernel, x.detach()[..., :1, :], x.detach()[..., :1, :])
    if probe.grad_fn is None:
        return
    known = {id(p) for p in params}
    # a parameter that is not a leaf (torch.func.functional_call with computed values, a MAML inner step's
    # theta - lr g): the graph above it is the caller's, and backward's gradient for it flows there
    made = {p.grad_fn for p in params if p.grad_fn is not None}
    seen: set[Any] = set()
    stack: list[Any] = [probe.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made:
            continue
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that needs a gradient
        if leaf is not None and id(leaf) not in known:
            raise ValueError(
                f"the kernel's values depend on a tensor of shape {tuple(leaf.shape)} that needs a gradient but is "
                f"not one of {type(kernel).__name__}'s parameters, so kernel_block_mean could not differentiate it. "
                "Register it on the kernel (an nn.Parameter, or the module holding it as a submodule), or apply "
                "the transformation to the inputs before the kernel (pass net(x) as x)."
            )
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def _segment_sum(values: Tensor, lengths: Tensor) -> Tensor:
    """Sum the last dimension of ``values`` over consecutive runs of the given lengths.

    The leading dimensions are flattened first: ``segment_reduce`` is many times slower with
    lengths of three or more dimensions than with a (stride-0) two-dimensional one.
    """
    lead = values.shape[:-1]
    flat = values.reshape(-1, values.shape[-1])
    out = torch.segment_reduce(flat, "sum", lengths=lengths.expand(flat.shape[0], lengths.numel()), axis=1)
    return out.view(*lead, lengths.numel())


def _ranges(plan: KernelSumsPlan) -> list[tuple[int, int]]:
    """This rank's row chunks, never one chunk of all the rows.

    ``kernel(x, x)`` is not ``kernel(x[a:b], x)``: on equal inputs GPyTorch kernels may return structured operators
    (``LinearKernel``: a ``RootLinearOperator``), and linear_operator adds a dense matrix and a root by taking a root
    decomposition of the dense one, so ``ScaleKernel(RBFKernel()) + LinearKernel()`` was Cholesky-factorised
    (``n x n``, with jitter, ``NotPSDError`` in float32). Two chunks of different length never compare equal.
    """
    if plan.chunk is None:
        raise ValueError("the generic engine needs plan.chunk, the rows per chunk; kernel_block_mean sets it.")
    start, stop = plan.rows
    chunk = plan.chunk
    if chunk >= stop - start == plan.x.shape[-2] > 1:
        chunk = (stop - start + 1) // 2
    return chunk_ranges(start, stop, chunk)


@reverse_mode_only("kernel_block_mean (the generic engine)")
class GenericKernelSums(torch.autograd.Function):
    """``(T, d)`` of ``kernel(x, x)`` by row chunks; backward re-evaluates each chunk.

    With a process group each rank reduces its own rows; the sums are all-reduced in
    forward, and the gradients of the hyperparameters and of ``x`` in backward, so every
    rank ends with the full (identical) gradient.
    """

    @staticmethod
    def forward(ctx: Any, plan: KernelSumsPlan, kernel: Kernel, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        k = plan.num_blocks
        grid = _grid_interpolated(kernel)
        with torch.no_grad():
            # the shapes and dtype of the sums come from a one-entry evaluation (a rank may have no rows)
            probe = evaluate(kernel, x[..., :1, :], x[..., :1, :])
            acc = core_dtype(probe.dtype)
            sums = probe.new_zeros(*probe.shape[:-2], k, k, dtype=acc)
            diag = probe.new_zeros(*probe.shape[:-2], k, dtype=acc)
            for a, b in progress(_ranges(plan), plan.show_progress, "kernel block sums"):
                values = evaluate(kernel, x[..., a:b, :], x)  # (*batch, c, n)
                rows = plan.labels[a:b]
                # summed in acc: float32 running sums of nearly equal values drift all the same way, and
                # lam = d / s - B_ii magnifies that (a long lengthscale)
                sums.index_add_(sums.dim() - 2, rows, _segment_sum(values.to(acc), plan.sizes))
                # the chunk's diagonal entries, off by ~sqrt(eps), replaced by the exact ones in T and d
                inexact = torch.diagonal(values, offset=a, dim1=-2, dim2=-1)
                exact = _chunk_diagonal(kernel, x[..., a:b, :], values, a, grid)
                torch.diagonal(sums, dim1=-2, dim2=-1).index_add_(-1, rows, (exact - inexact).to(acc))
                diag.index_add_(diag.dim() - 1, rows, exact.to(acc))
            if plan.group is not None:
                sums, diag = all_reduce([sums, diag], plan.group)
        ctx.plan, ctx.kernel = plan, kernel
        ctx.save_for_backward(x, *params)
        return sums, diag  # in core_dtype: kernel_block_mean rounds to the kernel's dtype only after the means

    @staticmethod
    @unbatched_backward("kernel_block_mean (the generic engine)")
    @first_order_only("kernel_block_mean (the generic engine)")
    def backward(ctx: Any, grad_sums: Tensor, grad_diag: Tensor) -> tuple[Tensor | None, ...]:
        plan, kernel = ctx.plan, ctx.kernel
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        # the kernel is evaluated again with the tensors forward saw: under torch.func.functional_call (or
        # another reparametrisation) those are not the module's own parameters any more once forward returned,
        # and the kernel's own would give values of other parameters and a gradient of 0 for the ones asked for
        named = list(kernel.named_parameters())
        if len(named) != len(params):
            raise RuntimeError(
                f"kernel_block_mean: {type(kernel).__name__} has {len(named)} parameters in backward but had "
                f"{len(params)} in forward; do not add or remove kernel parameters between forward and backward."
            )
        own = all(p is q for p, (_, q) in zip(params, named))
        ev = kernel if own else cast(Kernel, _Bound(kernel, {name: p for (name, _), p in zip(named, params)}))
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grads: list[Tensor | None] = [None] * (len(wanted) + int(need_x))
        plan_shares_graph, grid = _shares_graph(kernel), _grid_interpolated(kernel)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(need_x)
            inputs = [params[i] for i in wanted] + ([x_in] if need_x else [])
            for a, b in progress(_ranges(plan), plan.show_progress, "kernel block sums (backward)"):
                if not inputs:
                    continue
                values = evaluate(ev, x_in[..., a:b, :], x_in)
                diag_values = _chunk_diagonal(cast(Kernel, ev), x_in[..., a:b, :], values, a, grid)
                rows = plan.labels[a:b]
                # dL/dK for this chunk: the k x k gradient spread over its entries (c x n, never n x n); the
                # diagonal entries come from the exact diagonal evaluation, as in forward
                grad_sums_v = grad_sums.to(values.dtype)
                weight = grad_sums_v.index_select(-2, rows).index_select(-1, plan.labels)
                weight = weight.expand_as(values).clone() if weight.shape != values.shape else weight
                torch.diagonal(weight, offset=a, dim1=-2, dim2=-1).zero_()
                weight_diag = torch.diagonal(grad_sums_v, dim1=-2, dim2=-1).index_select(-1, rows)
                weight_diag = weight_diag + grad_diag.to(values.dtype).index_select(-1, rows)
                objective = (values * weight).sum() + (diag_values * weight_diag).sum()
                # a part of the graph shared by the chunks (an eval-mode InducingPointKernel's cached root of its
                # inducing points' covariance) must outlive the first chunk's gradient
                pieces = torch.autograd.grad(objective, inputs, allow_unused=True, retain_graph=plan_shares_graph)
                del values, diag_values, objective, weight  # (retained: the chunk's graph goes with them)
                for j, g in enumerate(pieces):
                    total = grads[j]
                    if g is not None:
                        grads[j] = g if total is None else total + g
        full = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        if plan.group is not None and full:
            full = all_reduce(full, plan.group)
        out_params: list[Tensor | None] = [None] * len(params)
        for j, i in enumerate(wanted):
            out_params[i] = full[j]
        grad_x = full[-1] if need_x else None
        return (None, None, grad_x, *out_params)
