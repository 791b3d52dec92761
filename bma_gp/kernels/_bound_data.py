"""Which training data a cached prediction strategy was built on, for kernels bound to their training inputs.

:class:`~bma_gp.BlockMeanKernel` holds its training inputs and partition, and
:meth:`~bma_gp.BlockMeanKernel.set_train_data` / :meth:`~bma_gp.BlockMeanKernel.set_partition` replace them. An
:class:`~gpytorch.models.ExactGP` in eval mode caches its prediction strategy (the solves against the training
covariance) until ``model.set_train_data`` or ``model.train()`` drops it, so a kernel changed in between would be
combined with solves against the old training covariance: wrong means and negative variances, with no error. The
strategies record the data version of every such kernel when they are built and refuse to predict once one changed.
"""

from __future__ import annotations

from gpytorch.kernels import Kernel
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy

__all__ = ["check_bound_data", "record_bound_data"]


def record_bound_data(strategy: DefaultPredictionStrategy, kernel: Kernel) -> DefaultPredictionStrategy:
    """Remember the data version of every :class:`~bma_gp.BlockMeanKernel` in ``kernel`` on ``strategy``."""
    from bma_gp.kernels.block_mean_kernel import BlockMeanKernel  # that module builds the strategies

    strategy._bound_data_versions = tuple(
        (module, module.data_version) for module in kernel.modules() if isinstance(module, BlockMeanKernel)
    )
    return strategy


def check_bound_data(strategy: DefaultPredictionStrategy) -> None:
    """``ValueError`` if a :class:`~bma_gp.BlockMeanKernel` recorded by :func:`record_bound_data` was given new
    training inputs or a new partition after ``strategy`` was built."""
    for kernel, version in getattr(strategy, "_bound_data_versions", ()):
        if kernel.data_version != version:
            raise ValueError(
                "BlockMeanKernel.set_train_data or set_partition was called while the model held a cached prediction "
                "strategy (built in eval mode on the old training data), whose solves belong to the old training "
                "covariance. After changing the kernel's data, call model.set_train_data(train_x, train_y, "
                "strict=False) (or model.train() and then model.eval()) so that GPyTorch rebuilds it."
            )
