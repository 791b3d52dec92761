"""GPyTorch's SGPR kernel with its ``n x m`` root computed in row chunks: the same numbers, a fraction of the memory.

:class:`gpytorch.kernels.InducingPointKernel` forms the root ``U = K(x, Z) L^{-T}`` of its low-rank
covariance in one piece. Autograd then keeps every ``n x m`` intermediate of the base kernel (distances,
exponentials, the kernel matrix) for the backward pass, and the SGPR trace term squares ``U`` once more.
At ``n = 10^6`` and ``m = 256`` in float32 each of these is 1 GB.

:class:`ChunkedInducingPointKernel` computes ``U`` and the row sums of ``U**2`` (the diagonal the trace
term needs) one block of rows at a time, written into one ``n x m`` result. The forward
pass keeps no graph; the backward pass recomputes one block's kernel at a time and differentiates it.
The price is one more evaluation of the base kernel per training step. For ``RBFKernel`` and
``ScaleKernel(RBFKernel)``, the kernel of most SGPR models, the backward pass is written out by hand
(:mod:`bma_gp.kernels._rbf_root`): two ``c x m x m`` GEMMs and a few elementwise passes per block instead of
autograd through every step of GPyTorch's distance computation.

In training, with an RBF base kernel, ``U`` is not formed at all: the kernel returns its root as its inputs
(:class:`~bma_gp.kernels._rbf_gram.RBFRootFactor`). Added to a noise diagonal and to group kernels it becomes a
closed-form :class:`~bma_gp.BlockMeanSumLinearOperator` that asks the root for ``U^T D^{-1} U``, ``U^T D^{-1} y`` and
the block sums of ``D^{-1} U`` (one pass over row blocks, one more for the gradients), and the SGPR trace term
reads its sum from the same Gram matrix. Anything else asked of the operator forms ``U`` as above. Evaluation
mode keeps the formed root, which the prediction strategy caches.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
from gpytorch import settings
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import InducingPointKernel
from linear_operator import to_dense
from linear_operator.operators import (
    DiagLinearOperator,
    LowRankRootAddedDiagLinearOperator,
    LowRankRootLinearOperator,
    MatmulLinearOperator,
)
from linear_operator.utils.cholesky import psd_safe_cholesky
from torch import Tensor

from bma_gp._autograd import first_order_only, reverse_mode_only
from bma_gp._broadcast import shared_batch_entry
from bma_gp._kernel_sums.generic import kernel_diagonal
from bma_gp.kernels._kept import KeptByInput, version_key
from bma_gp.kernels._rbf_gram import LazyRootOperator, RBFRootFactor, TraceTerm
from bma_gp.kernels._rbf_root import rbf_parts, rbf_root

__all__ = ["ChunkedInducingPointKernel"]

#: Bytes of one row block's kernel matrix (the recomputed intermediates are a few times this).
CHUNK_BYTES = 2**24


class _RootWithDiagonal(LowRankRootLinearOperator):
    """``U U^T`` whose diagonal was summed while ``U`` was formed (the trace term reads it without another
    ``n x m`` pass). Operators derived from it (indexing, batch expansion) are plain
    ``LowRankRootLinearOperator``s that compute their own diagonal."""

    def __init__(self, root: Tensor, diagonal: Tensor | None = None):
        super().__init__(root)
        self._known_diagonal = diagonal

    def _diagonal(self) -> Tensor:
        if self._known_diagonal is not None and self._known_diagonal.shape == self.shape[:-1]:
            return self._known_diagonal
        return super()._diagonal()


def _same_up_to_rounding(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) differ by at most a few units of rounding of their largest entry: the
    same kernel matrix evaluated on two paths, not one evaluated at other parameters."""
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().amax() <= 16 * torch.finfo(a.dtype).eps * a.abs().amax())


def _whole_rows_only(kernel) -> bool:
    """Whether ``kernel`` holds a :class:`~bma_gp.BlockMeanKernel`, whose values at a training row depend on every
    training row, so that it cannot be evaluated a block of rows at a time."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    return any(isinstance(module, BlockMeanKernel) for module in kernel.modules())


def _bound_data_versions(kernel) -> tuple[tuple[int, int], ...]:
    """``(id, data_version)`` of every :class:`~bma_gp.BlockMeanKernel` in ``kernel`` (its training inputs and
    partition, which its values depend on besides its parameters)."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel

    return tuple((id(m), m.data_version) for m in kernel.modules() if isinstance(m, BlockMeanKernel))


def _root_block(kernel, x: Tensor, inducing: Tensor, inv_root: Tensor) -> tuple[Tensor, Tensor]:
    root = to_dense(kernel(x, inducing)) @ inv_root
    return root, root.square().sum(-1)


def _fill_blocks(kernel, rows: int, x: Tensor, inducing: Tensor, inv_root: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, rowsum(U**2))`` without a graph, one row block at a time into preallocated results."""
    n = x.shape[-2]
    if n <= rows:
        return _root_block(kernel, x, inducing, inv_root)
    root = diag = None
    for start in range(0, n, rows):
        block, block_diag = _root_block(kernel, x.narrow(-2, start, min(rows, n - start)), inducing, inv_root)
        if root is None or diag is None:
            root = block.new_empty(*block.shape[:-2], n, block.shape[-1])
            diag = block_diag.new_empty(*block_diag.shape[:-1], n)
        root.narrow(-2, start, block.shape[-2]).copy_(block)
        diag.narrow(-1, start, block.shape[-2]).copy_(block_diag)
    assert root is not None and diag is not None
    return root, diag


@reverse_mode_only("ChunkedInducingPointKernel (its chunked root)")
class _ChunkedRoot(torch.autograd.Function):
    """``(U, rowsum(U**2))`` with ``U = K(x, Z) L^{-T}``: the forward keeps no graph; the backward recomputes
    one row block at a time and differentiates it (``x``, ``Z``, ``L^{-T}`` and the base kernel's parameters)."""

    @staticmethod
    def forward(ctx, kernel, rows: int, params: tuple, x: Tensor, inducing: Tensor, inv_root: Tensor, *flat_params):
        with torch.no_grad():
            root, diag = _fill_blocks(kernel, rows, x, inducing, inv_root)
        ctx.kernel, ctx.rows, ctx.params = kernel, rows, params
        ctx.save_for_backward(x, inducing, inv_root)
        return root, diag

    @staticmethod
    @first_order_only("ChunkedInducingPointKernel")
    def backward(ctx, grad_root: Tensor | None, grad_diag: Tensor | None):
        x, inducing, inv_root = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        n = x.shape[-2]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(needs[0]), inducing.detach().requires_grad_(needs[1])]
            leaves.append(inv_root.detach().requires_grad_(needs[2]))
            targets = [t for t, need in zip([*leaves, *ctx.params], needs) if need]
            totals: list[Tensor | None] = [None] * len(targets)
            for start in range(0, n, ctx.rows):
                c = min(ctx.rows, n - start)
                block, block_diag = _root_block(ctx.kernel, leaves[0].narrow(-2, start, c), leaves[1], leaves[2])
                outputs, grads = [], []
                if grad_root is not None:
                    outputs.append(block)
                    grads.append(grad_root.narrow(-2, start, c))
                if grad_diag is not None:
                    outputs.append(block_diag)
                    grads.append(grad_diag.narrow(-1, start, c))
                if not outputs or not targets:
                    break
                pieces = torch.autograd.grad(outputs, targets, grads, allow_unused=True)
                for i, piece in enumerate(pieces):
                    if piece is None:
                        continue
                    if targets[i] is leaves[0]:  # only this block's rows of x
                        total = totals[i]
                        if total is None:
                            total = totals[i] = torch.zeros_like(x)
                        total.narrow(-2, start, c).add_(piece.narrow(-2, start, c))
                    else:
                        total = totals[i]
                        totals[i] = piece if total is None else total.add_(piece)
        res: list[Tensor | None] = []
        it = iter(totals)
        for need in needs:
            res.append(next(it) if need else None)
        return (None, None, None, *res)


class ChunkedInducingPointKernel(InducingPointKernel):
    r"""A drop-in :class:`gpytorch.kernels.InducingPointKernel` (same arguments, parameters, added loss term
    and predictions) whose root :math:`U = K_{xZ} L^{-\top}` is computed ``chunk_rows`` rows at a time.

    With gradients, the autograd graph holds ``U`` and the inputs rather than every ``n x m`` intermediate of
    the base kernel; the backward pass recomputes and differentiates one row block at a time. Summed with
    :class:`~bma_gp.GroupKernel` or :class:`~bma_gp.BlockMeanKernel` the result is the same closed-form
    :class:`~bma_gp.BlockMeanSumLinearOperator` as with GPyTorch's class.

    Inputs are taken in the dtypes GPyTorch's class takes: any that promotes to the kernel's dtype (that of its
    inducing points and base kernel parameters), so float32, float16 or integer inputs of a float64 kernel give float64
    values. Inputs in a wider dtype than the kernel's (float64 inputs of a float32 kernel), on which GPyTorch's class
    fails in a matrix product, raise a ``TypeError`` that names them.

    Args:
        base_kernel, inducing_points, likelihood, active_dims: as for GPyTorch's ``InducingPointKernel``.
        chunk_rows: rows per block; default: about 16 MB of kernel matrix per block.
    """

    #: Use the hand-written RBF root (:mod:`bma_gp.kernels._rbf_root`) when the base kernel is ``RBFKernel`` or
    #: ``ScaleKernel(RBFKernel)``, and in training keep the root as its inputs (:mod:`bma_gp.kernels._rbf_gram`);
    #: ``False`` forms ``U`` and differentiates every base kernel by recomputation under autograd.
    analytic_rbf: bool = True

    def __init__(self, base_kernel, inducing_points, likelihood, active_dims=None, chunk_rows: int | None = None):
        if chunk_rows is not None:  # any integer (a NumPy one, a one-element integer tensor), as chunk_size= takes
            is_bool = isinstance(chunk_rows, bool) or (torch.is_tensor(chunk_rows) and chunk_rows.dtype == torch.bool)
            try:
                if is_bool:
                    raise TypeError
                chunk_rows = operator.index(chunk_rows)
            except TypeError:
                raise TypeError(f"chunk_rows must be a positive int or None, got {type(chunk_rows).__name__}") from None
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None (the default), got {chunk_rows}")
        if chunk_rows is not None and _whole_rows_only(base_kernel):
            raise ValueError(
                f"chunk_rows={chunk_rows} cannot be honoured: base_kernel contains a BlockMeanKernel, whose value at a "
                "training row depends on the whole training set (a chunk of train_x is new points to it, which gives "
                "the exact base kernel, not the block means). Its rows are always evaluated at once; leave chunk_rows "
                "out (None)."
            )
        super().__init__(base_kernel, inducing_points, likelihood, active_dims=active_dims)
        self.chunk_rows = chunk_rows

    def __deepcopy__(self, memo):
        # GPyTorch's __deepcopy__ builds a new kernel, which is in training mode whatever this one's mode (a copied
        # model in eval mode then raised "x1 should equal x2 in training mode") and holds this kernel's likelihood
        # rather than the copy's (the copy's trace term read, and trained, the original's noise)
        copied = super().__deepcopy__(memo)
        memo[id(self)] = copied
        copied.likelihood = copy.deepcopy(self.likelihood, memo)
        copied.chunk_rows = self.chunk_rows
        copied.analytic_rbf = self.analytic_rbf
        copied.training = self.training
        # the copy's K_ZZ and its inverse root are formed afresh: GPyTorch's copy holds the very tensors this kernel
        # cached in eval mode, and the copied model has no prediction strategy whose hyperparameter check would clear
        # them, so that a hyperparameter changed on the copy in eval mode predicted with the original's K_ZZ
        copied._clear_cache()
        return copied

    def _apply(self, fn, *args, **kwargs):
        # GPyTorch caches K_ZZ and its inverse root in eval mode as plain attributes, which Module._apply does not
        # convert: after model.double() (or .to(device)) the root was formed against the old dtype's inverse root
        # and failed with "expected m1 and m2 to have the same dtype"
        self._clear_cache()
        return super()._apply(fn, *args, **kwargs)

    @property
    def _inducing_inv_root(self) -> Tensor:
        # GPyTorch keeps the inverse root of K_ZZ in eval mode with its autograd graph, which the first gradient of a
        # prediction frees: a second prediction's backward pass (optimising test inputs, as an acquisition function
        # does) failed with "Trying to backward through the graph a second time". With autograd on it is formed
        # afresh (an m x m Cholesky, as in training) and kept only when formed without a graph.
        if self.training or not torch.is_grad_enabled():
            return super()._inducing_inv_root
        mat = to_dense(self.base_kernel(self.inducing_points, self.inducing_points))
        cached = getattr(self, "_cached_kernel_mat", None)
        if cached is not None and cached.shape == mat.shape and _same_up_to_rounding(cached, mat):
            # the values of K_ZZ that a prediction without gradients formed (and the training root it keeps), the
            # graph of this evaluation: autograd's path through the kernel rounds differently in the last bit, which
            # an ill-conditioned K_ZZ magnified past recognising the cross covariance's root as the training root
            # (the prediction then warned and formed the t x n cross covariance)
            mat = cached + (mat - mat.detach())
        chol = psd_safe_cholesky(mat, upper=True)
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        inv_root = torch.linalg.solve_triangular(chol, eye, upper=True)
        if inv_root.grad_fn is None:
            self._cached_kernel_inv_root = inv_root
        return inv_root

    def _kernel_dtype(self) -> torch.dtype:
        """The dtype of ``K_ZZ`` and its inverse root: the cached inverse root's, else the one the inducing points and
        the base kernel's floating parameters promote to (as GPyTorch's kernels compute)."""
        cached = getattr(self, "_cached_kernel_inv_root", None)
        if isinstance(cached, Tensor):
            return cached.dtype
        dtype = self.inducing_points.dtype
        for p in self.base_kernel.parameters():
            if p.is_floating_point():
                dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _check_input(self, x: Tensor, name: str, work: torch.dtype) -> None:
        """Inputs of any dtype that promotes to the kernel's ``work`` dtype are taken, as GPyTorch's
        ``InducingPointKernel`` takes them (float32, float16 or integer ``x`` with a float64 kernel: float64 values).
        A wider one fails there with "expected m1 and m2 to have the same dtype" (``K(x, Z)`` in the wider dtype
        times the inverse root of ``K_ZZ`` in the kernel's); here it is a ``TypeError`` that says which input."""
        promoted = torch.promote_types(x.dtype, work)
        if promoted == work:
            return
        fix = f"cast the input ({name}.to({work}))"
        if promoted.is_floating_point:
            fix += f" or the model and its likelihood (model.to({promoted}))"
        raise TypeError(
            f"ChunkedInducingPointKernel: {name} has dtype {x.dtype}, but the kernel computes in {work} (its inducing "
            f"points and base kernel parameters), and K({name}, Z) in {promoted} cannot be multiplied by the {work} "
            f"inverse root of K(Z, Z) (GPyTorch's InducingPointKernel fails here too): {fix}."
        )

    def _rows(self, dtype: torch.dtype) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        m = self.inducing_points.shape[-2]
        return max(1024, CHUNK_BYTES // max(1, m * torch.finfo(dtype).bits // 8))

    def _root(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U, rowsum(U**2))``, block by block, written into one ``n x m`` result. Inputs equal across their
        leading batch dimensions (a fantasy model's training inputs under a batch of fantasy targets) are rooted
        once and the root expanded: the numbers of the inputs alone, which the training root of the same points
        has. A batched product rounded differently (2.3e-12 on roots of 0.8 in a user trial, magnified by an
        ill-conditioned ``K_ZZ``), and predictions from such a fantasy model no longer recognised the training root
        in the cross covariance (a warning, and the ``t x n`` cross covariance per fantasy: 0.80 s against 0.04 s at
        n = 20,000). One comparison pass over ``x`` decides; inputs that require a gradient are rooted as they
        are (each batch entry its own gradient)."""
        if x.dim() > 2 and x.shape[:-2].numel() > 1 and not (x.requires_grad and torch.is_grad_enabled()):
            first = shared_batch_entry(x, 2)
            if first is not None:
                U, diag = self._root(first)  # batched already where the kernel's parameters are
                batch = torch.broadcast_shapes(x.shape[:-2], U.shape[:-2])
                return U.expand(*batch, *U.shape[-2:]), diag.expand(*batch, *diag.shape[-1:])
        inv_root = self._inducing_inv_root
        # the dtype of the root (an integer or narrower x takes the kernel's, as GPyTorch's kernels promote it)
        rows = self._rows(torch.promote_types(x.dtype, inv_root.dtype))
        if _whole_rows_only(self.base_kernel):
            # a BlockMeanKernel takes a chunk of the training rows for new points (the exact base kernel against Z,
            # not the block means of the whole training set): past chunk_rows the root, its gradients and the
            # predictions were those of another model, without a word (loss 0.07 off at n = 120, 16 rows a chunk)
            rows = max(rows, x.shape[-2])
        parts = rbf_parts(self.base_kernel, x, self.inducing_points) if self.analytic_rbf else None
        if parts is not None:  # (Scale)RBF: derivatives written out, no autograd recomputation
            return rbf_root(rows, x, self.inducing_points, inv_root, *parts)
        params = tuple(p for p in self.base_kernel.parameters() if p.requires_grad)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.inducing_points, inv_root, *params)):
            return _ChunkedRoot.apply(self.base_kernel, rows, params, x, self.inducing_points, inv_root, *params)
        return _fill_blocks(self.base_kernel, rows, x, self.inducing_points, inv_root)

    def _kept_root(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_root` of ``x``, kept in eval mode without autograd: a prediction forms the root of the training
        inputs for their covariance with the test inputs at every call (``n m`` kernel values and an ``n m^2``
        product: 1.1 s per one-point prediction at ``n = 10^6``, ``m = 64``), where the prediction strategy holds it
        already. Kept with a copy of ``x`` (compared in one pass) and the identity and version of everything else it
        depends on (the cached inverse root of ``K_ZZ``, the inducing points, the base kernel's parameters), so an
        in-place change of any of them forms it again; dropped with GPyTorch's caches (``train()``,
        ``load_state_dict``, ``.to()``, a deep copy). One formed under ``torch.inference_mode()`` serves only calls
        under inference mode (:class:`~bma_gp.kernels._kept.KeptByInput`)."""
        if self.training or torch.is_grad_enabled():
            return self._root(x)
        inv_root = self._inducing_inv_root
        # (an inverse root GPyTorch cached under inference mode is an inference tensor, without a version counter:
        # reading its _version raised, there and in every later prediction until train())
        key = (
            version_key(inv_root),
            version_key(self.inducing_points),
            tuple(version_key(p) for p in self.base_kernel.parameters()),
            # a BlockMeanKernel's values depend on its bound data too: after set_partition (or set_train_data) and
            # model.set_train_data as its error asks, the root of the old partition's block means was served for
            # inputs equal to the old ones (predictive means 0.65 off)
            _bound_data_versions(self.base_kernel),
        )
        kept = self.__dict__.get("_bma_gp_kept_root")
        if kept is None:
            # two entries: a prediction roots the test inputs (their own covariance) between uses of the training root
            kept = self.__dict__["_bma_gp_kept_root"] = KeptByInput(2)
        return kept(x, lambda: self._root(x), key)

    def _clear_cache(self):
        super()._clear_cache()
        self.__dict__.pop("_bma_gp_kept_root", None)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **kwargs):
        """GPyTorch's forward, with a trace term (:class:`~bma_gp.kernels._rbf_gram.TraceTerm`) that reads the
        Gram matrix a closed-form marginal likelihood formed already."""
        if kwargs.get("last_dim_is_batch"):
            # GPyTorch's forward ignores the flag and returns one n x n matrix where a batch over the columns is
            # expected, so AdditiveStructureKernel and ProductStructureKernel around it failed with a shape error
            raise NotImplementedError(
                "ChunkedInducingPointKernel does not support GPyTorch's deprecated last_dim_is_batch mode, in which "
                "AdditiveStructureKernel and ProductStructureKernel evaluate their base kernel on one input column "
                "at a time. Put the structure kernel inside it instead: ChunkedInducingPointKernel("
                "AdditiveStructureKernel(RBFKernel(), num_dims=d), inducing_points, likelihood)."
            )
        work = self._kernel_dtype()
        self._check_input(x1, "x1", work)
        if x2 is not x1:
            self._check_input(x2, "x2", work)
        covar = self._get_covariance(x1, x2)
        if self.training:
            if not torch.equal(x1, x2):
                raise RuntimeError("x1 should equal x2 in training mode")
            # in the covariance's dtype (zeros_like(x1) was an integer mean for integer inputs)
            zero_mean = torch.zeros(x1.shape[:-1], dtype=covar.dtype, device=x1.device)
            term = TraceTerm(
                MultivariateNormal(zero_mean, self._covar_diag(x1)),
                MultivariateNormal(zero_mean, covar),
                self.likelihood,
            )
            self.update_added_loss_term("inducing_point_loss_term", term)
        if diag:
            return covar.diagonal(dim1=-1, dim2=-2)
        return covar

    def _get_covariance(self, x1: Tensor, x2: Tensor):
        if not torch.equal(x1, x2):  # test x train: t x n, built from two roots as GPyTorch does
            a, b = shared_batch_entry(x1, 2), shared_batch_entry(x2, 2)
            if a is not None or b is not None:
                # both roots by the training root's own formula and row blocks: the prediction strategy recognises
                # the right factor as the training root (an ill-conditioned L^{-T} magnifies any other rounding).
                # Inputs copied across a batch (GPyTorch indexes a batch ScaleKernel's joint covariance so) are one
                # matrix: GPyTorch's formula rounded otherwise, and a batch of SGPR models with groups warned and
                # formed the t x n cross covariance. So is one side alone: a non-batch model asked for a batch of
                # test sets, (b, t, d), gets its training inputs copied across that batch, and their root must
                # still be the training root. A side that differs across the batch is rooted as it is, as training
                # roots a batch of training inputs
                left = self._root(x1 if a is None else a)[0]
                right = self._kept_root(x2 if b is None else b)[0]
                batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], left.shape[:-2], right.shape[:-2])
                left = left.expand(*batch, *left.shape[-2:])
                right = right.expand(*batch, *right.shape[-2:])
                return MatmulLinearOperator(left, right.mT)
            return super()._get_covariance(x1, x2)
        if self.training and self.analytic_rbf:
            parts = rbf_parts(self.base_kernel, x1, self.inducing_points)
            if parts is not None:  # the root stays its inputs: sums with groupings form K^T D^-1 K, never U
                lengthscale, scale = parts
                inv_root = self._inducing_inv_root
                # the factor computes in x's dtype: x is taken in the one the inputs promote to, as GPyTorch's
                # RBFKernel takes it (float32 or integer x with a float64 kernel: float64, not a failed product)
                dtype = torch.promote_types(x1.dtype, inv_root.dtype)
                for t in (self.inducing_points, lengthscale, scale):
                    if t is not None:
                        dtype = torch.promote_types(dtype, t.dtype)
                if scale is None:
                    scale = torch.ones((), dtype=dtype, device=x1.device)
                factor = RBFRootFactor(
                    x1.to(dtype), self.inducing_points, inv_root, lengthscale, scale, self._rows(dtype)
                )
                return LazyRootOperator(factor)
        root, diag = self._kept_root(x1)
        covar = _RootWithDiagonal(root, diag)
        if not self.training and settings.sgpr_diagonal_correction.on():
            correction = (kernel_diagonal(self.base_kernel, x1, x2) - diag).clamp(0, math.inf)
            covar = LowRankRootAddedDiagLinearOperator(covar, DiagLinearOperator(correction))
        return covar
