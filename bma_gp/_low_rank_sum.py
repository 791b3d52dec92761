"""``op.add_low_rank(U)`` in closed form, for the operators of this package (a mixin)."""

from __future__ import annotations

from linear_operator.operators import LinearOperator
from torch import Tensor

__all__ = ["LowRankInClosedForm"]


class LowRankInClosedForm:
    """``add_low_rank`` that keeps a block mean operator or sum in closed form (mixed into LinearOperator
    subclasses, before LinearOperator)."""

    def add_low_rank(
        self,
        low_rank_mat: Tensor | LinearOperator,
        root_decomp_method: str | None = None,
        root_inv_decomp_method: str | None = None,
        generate_roots: bool | None = True,
        **root_decomp_kwargs,
    ) -> LinearOperator:
        r""":math:`M + U U^\top` as ``M + LowRankRootLinearOperator(U)``: a closed-form
        :class:`~bma_gp.BlockMeanSumLinearOperator` (linear_operator's version forms the dense ``n x n`` matrix
        :math:`U U^\top` and a sum without closed forms). The root arguments are not needed and are ignored; where
        the sum has no closed form (a non-symmetric operator) linear_operator's version is used."""
        from bma_gp._composition import add_low_rank

        res = add_low_rank(self, low_rank_mat)
        if res is not None:
            return res
        return super().add_low_rank(  # type: ignore[misc]
            low_rank_mat, root_decomp_method, root_inv_decomp_method, generate_roots, **root_decomp_kwargs
        )
