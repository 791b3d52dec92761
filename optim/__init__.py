"""``optim``: the short import path of :mod:`bma_gp.optim` (a re-export; the code lives there).

``from optim import BlockMeanAdagrad`` and ``from bma_gp.optim import BlockMeanAdagrad`` give the
same class. Prefer ``bma_gp.optim`` where another package or folder named ``optim`` may come first
on the import path (a registry package of that name, or a research repository's ``optim/``).

Example:
    >>> import torch
    >>> from optim import BlockMeanAdagrad
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = BlockMeanAdagrad(model.parameters(), lr=0.1, partition="tensor")
"""

from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad, SparseGradientError

__all__ = ["BlockMeanAdagrad", "FullMatrixAdagrad", "SparseGradientError"]
