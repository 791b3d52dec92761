"""Deprecated: the partition builders now live in :mod:`bma_gp.partition_builders`.

``bma_gp.partitioning`` was easy to confuse with :mod:`bma_gp.partition` (the
:class:`~bma_gp.Partition` class). This alias keeps old imports working for one release and
warns on import; change ``from bma_gp.partitioning import ...`` to
``from bma_gp.partition_builders import ...``.
"""

import warnings

from bma_gp.partition_builders import (
    group_partition,
    kdtree_partition,
    kmeans_objective,
    kmeans_partition,
    sorted_partition,
)

warnings.warn(
    "bma_gp.partitioning is deprecated and will be removed in the next release; "
    "import the builders from bma_gp.partition_builders instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["kmeans_partition", "kdtree_partition", "sorted_partition", "group_partition", "kmeans_objective"]

del warnings
