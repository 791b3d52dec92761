r"""Engines for the block sums of a kernel matrix on data, never holding the ``n x n`` matrix.

:func:`bma_gp.kernel_block_mean` needs :math:`T = P^\top K P` and :math:`d = P^\top
\operatorname{diag}(K)` for :math:`K = k(X, X)`. It picks one of two engines:

* :mod:`~bma_gp._kernel_sums.generic`: any gpytorch kernel, evaluated in row chunks,
  re-evaluated chunk by chunk in backward (checkpointing one chunk at a time);
* :mod:`~bma_gp._kernel_sums.stationary`: RBF and Matern kernels evaluated in tiles over
  each unordered pair of points once, reduced by segment sums (work independent of the
  number of blocks), with the lengthscale gradient from a second tiled pass.

:mod:`~bma_gp._kernel_sums.plan` holds what both share: the sorted layout, this rank's
share of the work and the collective sum over ranks.
"""
