"""The ``bma-gp`` command: exact vs block mean vs inducing-point GPs on one data set.

Run without arguments it fits three Gaussian processes to the Mauna Loa CO2 series
shipped with the package (no network), prints a table of training time, prediction
time, RMSE and negative log predictive density (NLPD) on held-out points, and writes
a plot of the fits with their :math:`\\pm 2` standard deviation bands::

    bma-gp                                   # the bundled CO2 demo
    bma-gp --data my.csv --target y          # your own CSV (all other columns are inputs)
    bma-gp --method exact,blockmean --blocks 128 --iters 100 --out results/
    bma-gp --data my.csv --target y --group site   # plus lme4's (1 | site) in every model

The three methods share the base kernel, mean, likelihood, optimiser and schedule:

* ``exact`` -- :class:`gpytorch.models.ExactGP` with the base kernel (Cholesky up to
  ``--max-cholesky`` training points, GPyTorch's CG/Lanczos beyond; on the CO2 demo
  Cholesky is both faster per step and far more accurate than CG);
* ``blockmean`` -- the same model with :class:`bma_gp.kernels.BlockMeanKernel` over a
  partition of the training inputs into ``--blocks`` blocks (sorted runs for one input
  column, k-means otherwise): closed-form :math:`O(n + k^3)` algebra after the kernel sums;
* ``sgpr`` -- :class:`gpytorch.kernels.InducingPointKernel` (Titsias' SGPR) with
  ``--blocks`` inducing points initialised at random training inputs.

With ``--group COL`` (repeatable) each model's covariance also has one
:class:`bma_gp.GroupKernel` per grouping column: a random intercept per level. Inputs and targets
are standardised with the training statistics; RMSE and NLPD are reported in the units of the
target.

The package, one module per step:

* :mod:`~bma_gp.cli.config`: :class:`RunConfig`, the typed options of one run, and :class:`UsageError`;
* :mod:`~bma_gp.cli.arguments`: the argument parser and ``parse_config`` (command line -> ``RunConfig``);
* :mod:`~bma_gp.cli.data`: loading, subsampling, the train/test split and standardisation;
* :mod:`~bma_gp.cli.models`: the base kernel, the three GPs, training and prediction;
* :mod:`~bma_gp.cli.report`: the table, ``results.json`` and ``fits.png``;
* :mod:`~bma_gp.cli.run`: :func:`main`, which runs the steps in order.
"""

from bma_gp.cli.arguments import build_parser, parse_config
from bma_gp.cli.config import RunConfig, UsageError
from bma_gp.cli.run import main

__all__ = ["main", "build_parser", "parse_config", "RunConfig", "UsageError"]
