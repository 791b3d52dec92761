"""Draws through the operator's own root whatever ``gpytorch.settings.ciq_samples`` says (a mixin)."""

from __future__ import annotations

import linear_operator
from torch import Tensor

__all__ = ["ClosedFormSamples"]


class ClosedFormSamples:
    """``zero_mean_mvn_samples`` from :meth:`root_decomposition` (closed form for the operators of this package),
    also under ``ciq_samples(True)``: linear_operator's contour integral quadrature runs Lanczos and MINRES on the
    operator's products, an approximation of what the closed-form root gives exactly (mixed into LinearOperator
    subclasses, before LinearOperator)."""

    def zero_mean_mvn_samples(self, num_samples: int) -> Tensor:
        with linear_operator.settings.ciq_samples(False):
            return super().zero_mean_mvn_samples(num_samples)  # type: ignore[misc]
