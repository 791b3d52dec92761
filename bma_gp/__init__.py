"""bma-gp: block mean matrices for GPyTorch and block-mean AdaGrad.

Public names (see the documentation for the mathematics):

- :class:`Partition` -- a partition of ``n`` indices into ``k`` blocks.
- :class:`BlockMeanLinearOperator` -- ``diag(lam[labels]) + P B P^T`` with closed-form algebra.
- :class:`BlockMeanSumLinearOperator` -- ``diag(d) + sum_j P_j B_j P_j^T + U U^T`` (what sums with a noise
  vector, other partitions and low-rank roots become), solved through one small capacitance matrix.
- :class:`BlockMeanProductLinearOperator` -- ``M @ N`` over two partitions, with closed-form solves and
  log-determinants through its factors.
- :class:`BlockMeanInterleavedLinearOperator`, :class:`BlockMeanBlockDiagLinearOperator` -- a batch-independent
  multi-output model's covariance (``from_batch_mvn``), closed form task by task.
- :func:`closed_form` -- rewrite any nesting of such sums as one closed-form operator.
- :class:`FallbackIndexedLinearOperator`, :class:`FallbackMatmulLinearOperator`,
  :class:`FallbackScaledLinearOperator`, :class:`FallbackSumLinearOperator` -- what an operation that leaves the
  closed forms returns: exact, with linear_operator's generic paths, announced by a
  :class:`ClosedFormFallbackWarning`.
- :func:`block_mean` -- the Frobenius-nearest block mean matrix of a dense matrix or operator;
  :func:`block_mean_from_sums` -- the same from its block sums and diagonal sums.
- :func:`kernel_block_mean` -- the same for a GPyTorch kernel matrix, without n x n memory.
- :class:`BlockMeanKernel`, :class:`GroupKernel` -- GPyTorch kernels returning block mean operators;
  :class:`ChunkedInducingPointKernel` -- GPyTorch's SGPR kernel in bounded memory, whose sums with them stay closed
  form.
- :class:`GroupGaussianLikelihood` (its noise model :class:`GroupNoise`) -- a Gaussian likelihood with one learned
  noise variance per group.
- :class:`NotPositiveDefiniteError` -- what a closed form raises for a matrix that is not positive definite: a
  ``ValueError`` and linear_operator's ``NotPSDError``.
- :mod:`settings` -- the package's switches (validation, the capacitance limit, ...).
"""

from bma_gp import settings
from bma_gp._composition import (
    BlockMeanBlockDiagLinearOperator,
    BlockMeanInterleavedLinearOperator,
    ClosedFormFallbackWarning,
    FallbackIndexedLinearOperator,
    FallbackMatmulLinearOperator,
    FallbackScaledLinearOperator,
    FallbackSumLinearOperator,
    closed_form,
)
from bma_gp._composition import install as _install_composition
from bma_gp._errors import NotPositiveDefiniteError
from bma_gp._version import __version__
from bma_gp.approximation import block_mean, block_mean_from_sums
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator
from bma_gp.block_mean_sum_linear_operator import BlockMeanSumLinearOperator
from bma_gp.kernel_block_mean import kernel_block_mean
from bma_gp.kernels import BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel
from bma_gp.likelihoods import GroupGaussianLikelihood, GroupNoise
from bma_gp.partition import Partition

_install_composition()  # sums with diagonals, other partitions and low-rank roots reach the closed forms

__all__ = [
    "Partition",
    "BlockMeanLinearOperator",
    "BlockMeanSumLinearOperator",
    "BlockMeanProductLinearOperator",
    "BlockMeanInterleavedLinearOperator",
    "BlockMeanBlockDiagLinearOperator",
    "closed_form",
    "ClosedFormFallbackWarning",
    "NotPositiveDefiniteError",
    "FallbackIndexedLinearOperator",
    "FallbackMatmulLinearOperator",
    "FallbackScaledLinearOperator",
    "FallbackSumLinearOperator",
    "block_mean",
    "block_mean_from_sums",
    "kernel_block_mean",
    "BlockMeanKernel",
    "GroupKernel",
    "ChunkedInducingPointKernel",
    "GroupGaussianLikelihood",
    "GroupNoise",
    "settings",
    "__version__",
]
