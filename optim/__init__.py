"""Optimizers that precondition all gradients jointly: block-mean and full-matrix AdaGrad.

Example:
    >>> import torch
    >>> from optim import BlockMeanAdagrad
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = BlockMeanAdagrad(model.parameters(), lr=0.1, partition="tensor")
"""
from optim.block_mean_adagrad import BlockMeanAdagrad
from optim.full_matrix_adagrad import FullMatrixAdagrad

__all__ = ["BlockMeanAdagrad", "FullMatrixAdagrad"]
