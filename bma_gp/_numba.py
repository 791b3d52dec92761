"""What the numba kernels share (the optimizer's fused passes, the kernel block sums): availability and threads.

numba is an optional dependency (``pip install bma-gp[jit]``). :data:`AVAILABLE` says whether it is
installed without importing it; each user imports it (and its kernels) at first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings

import torch

__all__ = ["AVAILABLE", "import_kernels", "match_torch_threads"]

#: whether numba is installed (nothing is imported until a kernel is first used)
AVAILABLE = importlib.util.find_spec("numba") is not None

_THREADS = threading.local()  # numba's thread count is a setting of the calling thread


def match_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses (numba's default: every core), in this thread."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if getattr(_THREADS, "count", None) != threads:
        numba.set_num_threads(threads)
        _THREADS.count = threads


def import_kernels(module: str, state: list[bool], user: str, instead: str) -> bool:
    """Import numba and a kernel module once, recording the outcome in ``state``.

    Where that fails (numba installed but broken, e.g. built for another numpy), warn once, naming
    ``user`` and what it does ``instead``, and report ``False``; the caller then takes its torch path.
    """
    if not state:
        try:
            import numba  # noqa: F401

            importlib.import_module(module)
        except Exception as exc:  # any import-time failure of the optional dependency
            first = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn(
                f"{user}: numba is installed but could not be imported ({type(exc).__name__}: {first}); {instead}. "
                "Reinstall numba (pip install bma-gp[jit]) or uninstall it to silence this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            state.append(False)
        else:
            state.append(True)
    return state[0]
