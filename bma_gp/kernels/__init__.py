"""GPyTorch kernels whose covariance is a block mean matrix, and exact prediction for them.

- :class:`BlockMeanKernel` -- the block-exchangeable process of any base kernel over a
  partition of the training inputs (:doc:`docs/math.md, section 2 </math>`).
- :class:`GroupKernel` -- a covariance over integer group ids, exactly a block mean matrix.
- :class:`ChunkedInducingPointKernel` -- GPyTorch's SGPR kernel with its ``n x m`` root formed in
  checkpointed row blocks (the same numbers, without the base kernel's ``n x m`` intermediates).
- :class:`BlockMeanPredictionStrategy` -- closed-form posterior mean and covariance.
- :class:`BlockCrossLinearOperator` -- the ``t x n`` cross-covariance ``A P^T`` they return.
- :class:`LeadingRowsLinearOperator`, :class:`LeadingBlockLinearOperator` -- the leading rows of a block mean
  operator and the leading block of a posterior covariance (a fantasy model at its parent's training inputs).
"""

from bma_gp.kernels.block_cross_linear_operator import BlockCrossLinearOperator
from bma_gp.kernels.block_mean_kernel import BlockMeanKernel
from bma_gp.kernels.chunked_inducing_point_kernel import ChunkedInducingPointKernel
from bma_gp.kernels.group_kernel import GroupKernel
from bma_gp.kernels.leading_rows_linear_operator import LeadingBlockLinearOperator, LeadingRowsLinearOperator
from bma_gp.kernels.prediction_strategy import BlockMeanPredictionStrategy

__all__ = [
    "BlockMeanKernel",
    "ChunkedInducingPointKernel",
    "GroupKernel",
    "BlockMeanPredictionStrategy",
    "BlockCrossLinearOperator",
    "LeadingRowsLinearOperator",
    "LeadingBlockLinearOperator",
]
