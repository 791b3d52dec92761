"""bma-gp: block mean matrices for GPyTorch and block-mean AdaGrad.

Public names (see the documentation for the mathematics):

- :class:`Partition` -- a partition of ``n`` indices into ``k`` blocks.
- :class:`BlockMeanLinearOperator` -- ``diag(lam[labels]) + P B P^T`` with closed-form algebra.
- :func:`block_mean` -- the Frobenius-nearest block mean matrix of a dense matrix or operator.
- :func:`kernel_block_mean` -- the same for a GPyTorch kernel matrix, without n x n memory.
- :class:`BlockMeanKernel`, :class:`GroupKernel` -- GPyTorch kernels returning block mean operators.
"""
from bma_gp import settings
from bma_gp._version import __version__
from bma_gp.partition import Partition
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.approximation import block_mean, block_mean_from_sums
from bma_gp.kernel_block_mean import kernel_block_mean
from bma_gp.kernels import BlockMeanKernel, GroupKernel

__all__ = [
    "Partition",
    "BlockMeanLinearOperator",
    "block_mean",
    "block_mean_from_sums",
    "kernel_block_mean",
    "BlockMeanKernel",
    "GroupKernel",
    "settings",
    "__version__",
]
