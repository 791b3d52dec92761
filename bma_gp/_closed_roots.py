"""The private root hooks of linear_operator, routed to the closed forms, and the check of ``method``."""

from __future__ import annotations

from typing import cast

from linear_operator.operators import LinearOperator

#: the ``method`` names linear_operator's ``root_decomposition`` and ``root_inv_decomposition`` know
_ROOT_METHODS = {
    "root_decomposition": ("cholesky", "pivoted_cholesky", "symeig", "diagonalization", "svd", "lanczos"),
    "root_inv_decomposition": ("cholesky", "lanczos", "symeig", "diagonalization", "svd", "pinverse"),
    "diagonalization": ("symeig", "lanczos"),
}


def check_root_method(what: str, method) -> None:
    """Refuse a ``method`` that linear_operator's ``what`` (``root_decomposition``, ``root_inv_decomposition`` or
    ``diagonalization``) would refuse; any name it knows is accepted and ignored, the result being the closed form
    whatever it says."""
    known = _ROOT_METHODS[what]
    if method is None or (isinstance(method, str) and method in known):
        return
    raise ValueError(
        f"{what}(method={method!r}): unknown method; linear_operator knows {', '.join(map(repr, known))} (or None). "
        "The result here is the closed form whichever of them is given."
    )


class ClosedFormRoots:
    """linear_operator's ``_root_decomposition`` and ``_root_inv_decomposition`` (the hooks that its wrappers, such as
    ``BlockInterleavedLinearOperator``, ``BlockDiagLinearOperator`` and ``BatchRepeatLinearOperator``, call on the
    operator they wrap) as the closed-form roots of the public methods, not linear_operator's Lanczos."""

    def _root_decomposition(self):
        return cast(LinearOperator, self).root_decomposition().root

    def _root_inv_decomposition(self, initial_vectors=None, test_vectors=None):
        return cast(LinearOperator, self).root_inv_decomposition().root
