"""bma-gp: block mean matrices for GPyTorch and block-mean AdaGrad.

Public names (see the documentation for the mathematics):

- :class:`Partition` -- a partition of ``n`` indices into ``k`` blocks.
- :class:`BlockMeanLinearOperator` -- ``diag(lam[labels]) + P B P^T`` with closed-form algebra.
- :func:`block_mean` -- the Frobenius-nearest block mean matrix of a dense matrix or operator.
"""
from bma_gp import settings
from bma_gp.partition import Partition
from bma_gp.block_mean_linear_operator import BlockMeanLinearOperator
from bma_gp.approximation import block_mean, block_mean_from_sums

__all__ = ["Partition", "BlockMeanLinearOperator", "block_mean", "block_mean_from_sums", "settings"]
__version__ = "0.1.0"
