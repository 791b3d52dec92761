"""The package's one precision policy for small dense problems and long accumulations.

Every closed form of a block mean matrix reduces to a :math:`k \\times k` core matrix
:math:`C = \\operatorname{diag}(\\lambda) + S^{1/2} B S^{1/2}` and to block sums over many
indices. Both mix terms of very different size (entries :math:`s_i B_{ij}` against
:math:`\\lambda_i`, or millions of summands), so single- and half-precision inputs are
promoted to double precision for that work only; results are cast back to the input dtype.
See ``docs/math.md`` for why the core matrix needs it.
"""

from __future__ import annotations

import torch

__all__ = ["core_dtype"]

_PROMOTED = (torch.float32, torch.float16, torch.bfloat16)


def core_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which ``k x k`` core problems and block-sum accumulations run.

    Args:
        dtype: the floating point dtype of the inputs.

    Returns:
        ``torch.float64`` for ``float32``, ``float16`` and ``bfloat16``; ``dtype`` itself otherwise.

    Example:
        >>> core_dtype(torch.float32)
        torch.float64
        >>> core_dtype(torch.float64)
        torch.float64
    """
    return torch.float64 if dtype in _PROMOTED else dtype
