"""A low-rank root that :class:`~bma_gp.BlockMeanSumLinearOperator` need not form."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class LazyRoot:
    """An ``n x m`` root :math:`U` (no batch shape) that forms the products a closed-form solve or log-determinant
    needs itself, without ``U``. Anything else asks :meth:`materialize` for ``U``."""

    def materialize(self) -> Tensor:
        """``U`` as a tensor."""
        raise NotImplementedError

    def weighted_products(
        self,
        diag_values: Tensor,
        dinv: Tensor,
        rhs: Tensor,
        labels: Sequence[Tensor],
        ks: Sequence[int],
        weights: Sequence[Tensor | None],
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(U^T D^{-1} U, U^T rhs, [P_j^T W_j D^{-1} U for each partition])`` in ``dinv``'s (working) precision,
        ``dinv = 1 / diag_values``, differentiable like the same products of ``U``."""
        raise NotImplementedError
