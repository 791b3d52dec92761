"""Optimizers that precondition all gradients jointly: block-mean and full-matrix AdaGrad.

Laid out like ``torch.optim``'s Adagrad: the classes hold hyperparameters and state, and the
step's math is the functional core :func:`~bma_gp.optim.functional.block_mean_adagrad`
(one implementation per path behind one dispatch). Also importable as ``optim``.

Example:
    >>> import torch
    >>> from bma_gp.optim import BlockMeanAdagrad
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = BlockMeanAdagrad(model.parameters(), lr=0.1, partition="tensor")
"""

from bma_gp.optim.block_mean_adagrad import BlockMeanAdagrad
from bma_gp.optim.flat_params import SparseGradientError
from bma_gp.optim.full_matrix_adagrad import FullMatrixAdagrad

__all__ = ["BlockMeanAdagrad", "FullMatrixAdagrad", "SparseGradientError"]
