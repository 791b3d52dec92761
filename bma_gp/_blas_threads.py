"""One thread for the small BLAS and LAPACK calls the package makes through numpy and scipy.

numpy and scipy bring their own OpenBLAS, which starts threads of its own whatever ``torch.set_num_threads`` says.
On the ``k x k`` problems the package hands it (``k`` up to a few hundred) a second thread gains nothing on an idle
machine, and beside other work it waits for a scheduler slice: ``syevd`` and one product at ``k = 128`` took 122-143
ms on two threads against 1.3 ms on one, on the shared 2-core machine (0.75 against 0.85 ms at ``k = 100``, equal
below). :func:`single_blas_thread` holds those libraries to one thread for a call, through ``threadpoolctl``
(about 7 us a call); without it installed, or without such a library loaded, it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

__all__ = ["single_blas_thread"]


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded now (first call: after scipy's LAPACK is imported),
    or None."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; kept optional for trimmed installs
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def single_blas_thread() -> contextlib.AbstractContextManager:
    """A context in which numpy's and scipy's BLAS run on one thread (their previous counts restored after it)."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1)
