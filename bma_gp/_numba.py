"""What the numba kernels share (the optimizer's fused passes, the kernel block sums): availability and threads.

numba is an optional dependency (``pip install bma-gp[jit]``). :data:`AVAILABLE` says whether it is
installed without importing it; each user imports it (and its kernels) at first use.
"""

from __future__ import annotations

import importlib.util
import threading

import torch

__all__ = ["AVAILABLE", "match_torch_threads"]

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
