"""``op.add_low_rank(U)`` in closed form, for the operators of this package (a mixin)."""

from __future__ import annotations

import torch
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
        the sum has no closed form (a non-symmetric operator) it is ``M + LowRankRootLinearOperator(U)``, a
        :class:`~bma_gp.FallbackSumLinearOperator` (linear_operator's version would need a root of :math:`M`)."""
        from linear_operator.operators import LowRankRootLinearOperator

        from bma_gp._composition import _known_nonsymmetric, add_low_rank, fallback_sum

        res = add_low_rank(self, low_rank_mat)
        if res is None and _known_nonsymmetric(self) and torch.is_tensor(low_rank_mat) and low_rank_mat.dim() >= 2:
            res = fallback_sum(self, LowRankRootLinearOperator(low_rank_mat))
        if res is not None:
            return res
        return super().add_low_rank(  # type: ignore[misc]
            low_rank_mat, root_decomp_method, root_inv_decomp_method, generate_roots, **root_decomp_kwargs
        )
