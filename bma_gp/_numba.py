"""What the numba kernels share (the optimizer's fused passes, the kernel block sums): availability, threads,
processes.

numba is an optional dependency (``pip install bma-gp[jit]``). :data:`AVAILABLE` says whether it is installed (and
not switched off by ``NUMBA_DISABLE_JIT``) without importing it; each user imports it (and its kernels) at first use.

Two properties of numba's threading layers are handled here, for every parallel kernel of the package:

* **fork**: numba's ``omp`` layer built on GNU OpenMP (libgomp, the layer of numba's Linux wheels where TBB is not
  installed) is not fork-safe: a process forked from one that had launched numba's threads under it (a
  ``DataLoader`` worker under Linux's default ``fork`` start method, ``multiprocessing``'s ``fork`` context) is
  terminated at its first parallel launch ("fork() called from a process already using GNU OpenMP"). Such a child
  is recognised (:func:`forked_unsafe`: a handler of :func:`os.register_at_fork` reads the layer numba had launched,
  by whatever code, at the fork) and the callers take their torch path there, with one ``RuntimeWarning`` each per
  process. ``tbb``, ``workqueue`` and Intel's OpenMP survive fork.
* **threads**: the ``workqueue`` layer (numba's fallback where neither TBB nor OpenMP is found) aborts the process
  when two threads launch parallel kernels at once ("Concurrent access has been detected"). :func:`launch` runs
  the package's parallel kernels one at a time under a process-wide lock where the layer is ``workqueue`` (or not
  yet known: until the first launch has read it); under ``omp`` and ``tbb`` it costs one global read.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from bma_gp._warnings import caller_stacklevel

__all__ = ["AVAILABLE", "forked_unsafe", "import_kernels", "in_unsafe_fork", "launch", "match_torch_threads"]


def _jit_disabled() -> bool:
    """Whether ``NUMBA_DISABLE_JIT`` is set to a nonzero number: numba then runs its kernels as plain Python (a user
    trial: ``kernel_block_mean`` 12.8 s against 0.55 s at n = 6000, a fused step 1.9 s against 5 ms), so the package
    takes its torch paths, as without numba."""
    value = os.environ.get("NUMBA_DISABLE_JIT", "").strip()
    try:
        return int(value or "0") != 0
    except ValueError:
        return False


#: whether numba is installed and compiles (nothing is imported until a kernel is first used)
AVAILABLE = importlib.util.find_spec("numba") is not None and not _jit_disabled()

_THREADS = threading.local()  # numba's thread count is a setting of the calling thread


def match_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses (numba's default: every core), in this thread.

    numba starts its thread pool at the first parallel launch (or ``set_num_threads``), and under its OpenMP layer
    that sets the OpenMP runtime's thread count, which torch shares: a user's ``torch.set_num_threads(1)`` became 2
    after the first ``kernel_block_mean`` (15 times slower beside another busy process). The pool is started here
    first, and torch's count put back."""
    import numba
    from numba.np.ufunc import parallel

    wanted = torch.get_num_threads()
    threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if getattr(_THREADS, "count", None) != threads:
        start_pool = getattr(parallel, "_launch_threads", None)  # numba's own entry point (once per process)
        if start_pool is not None:
            start_pool()
        numba.set_num_threads(threads)
        _THREADS.count = threads
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def import_kernels(module: str, state: list[bool], user: str, instead: str) -> bool:
    """Import numba and a kernel module once, recording the outcome in ``state``.

    Where that fails (numba installed but broken, e.g. built for another numpy), warn once, naming
    ``user`` and what it does ``instead``, and report ``False``; the caller then takes its torch path.
    """
    if not state:
        try:
            import numba

            if getattr(numba.config, "DISABLE_JIT", False):
                # switched off after this module was imported (numba.config.DISABLE_JIT, a .numba_config.yaml,
                # NUMBA_DISABLE_JIT set late): the kernels would run as plain Python, 200 times slower (a user
                # trial); the torch paths run instead, as without numba
                state.append(False)
                return False
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


# ----------------------------------------------------------------------------------------- threading layers
#: numba's threading layers whose threads survive ``fork()`` (numba's documentation): in a child of a process that
#: launched its threads under any other layer (GNU OpenMP: numba terminates the child at its first parallel launch,
#: or a layer this module does not know) the package's numba kernels are not called
FORK_SAFE_LAYERS = frozenset({"tbb", "workqueue"})
#: OpenMP runtimes (``numba.np.ufunc.omppool.openmp_vendor``) that survive ``fork()``: numba refuses to run on in a
#: forked child with GNU's only
FORK_SAFE_OPENMP = frozenset({"Intel"})
#: numba's threading layers that take parallel launches from several threads at once (``workqueue`` aborts)
THREAD_SAFE_LAYERS = frozenset({"tbb", "omp"})

#: the layer numba's threads were launched with in the process this one was forked from (by the package or any other
#: code), where it is not fork-safe; ``None`` in other processes
_FORKED_UNDER: str | None = None
#: the users that warned in this process that numba's kernels are not called here (one warning each per process)
_WARNED: set[str] = set()

#: serialises the package's parallel launches where the layer cannot take concurrent ones
_LAUNCH_LOCK = threading.Lock()
#: whether parallel launches take :data:`_LAUNCH_LOCK`: ``None`` until the layer is known (then they do)
_SERIALISE: bool | None = None


def _launched_layer() -> str | None:
    """The threading layer numba's threads were launched with in this process (or the process it was forked from:
    numba's state is inherited), as ``"omp:<vendor>"`` for OpenMP; ``None`` where none was launched (numba not
    imported, or no parallel kernel or thread count set yet); ``"unknown"`` where it cannot be read."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None:  # numba's parallel backend was never loaded: no threads launched
        return None
    try:
        layer = parallel.threading_layer()
    except ValueError:  # "Threading layer is not initialized": no threads launched
        return None
    except Exception:  # another numba: its layer cannot be read
        return "unknown"
    if layer == "omp":
        vendor = getattr(sys.modules.get("numba.np.ufunc.omppool"), "openmp_vendor", None)
        return f"omp:{vendor or 'unknown'}"
    return str(layer)


def _fork_safe(layer: str) -> bool:
    if layer.startswith("omp:"):
        return layer[4:] in FORK_SAFE_OPENMP
    return layer in FORK_SAFE_LAYERS


def _after_fork_in_child() -> None:
    """In a child just forked: note whether the parent had launched numba's threads under a layer that is not
    fork-safe, start a new count of warnings, and a new launch lock (another thread of the parent may have held it
    at the fork, and no thread of the child would ever release it)."""
    global _FORKED_UNDER, _WARNED, _LAUNCH_LOCK
    _WARNED = set()
    _LAUNCH_LOCK = threading.Lock()
    if _FORKED_UNDER is None:  # (a grandchild keeps its parent's answer: numba's threads are still the first's)
        try:
            layer = _launched_layer()
        except Exception:  # nothing may escape a fork handler
            layer = "unknown"
        if layer is not None and not _fork_safe(layer):
            _FORKED_UNDER = layer


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def in_unsafe_fork() -> bool:
    """Whether this process was forked from one that had launched numba's threads under a threading layer that is
    not fork-safe (as :func:`forked_unsafe`, without its warning)."""
    return _FORKED_UNDER is not None


def forked_unsafe(user: str, instead: str) -> bool:
    """Whether this process was forked from one that had launched numba's threads under a threading layer that is
    not fork-safe (GNU OpenMP: numba would terminate this process at its first parallel launch), so that ``user``
    must take its torch path; the first time per ``user`` and process, a ``RuntimeWarning`` says so, naming what
    runs ``instead``. One global read otherwise."""
    if _FORKED_UNDER is None:
        return False
    if user not in _WARNED:
        _WARNED.add(user)
        layer = _FORKED_UNDER
        what = "GNU OpenMP (libgomp)" if layer == "omp:GNU" else f"'{layer}'"
        warnings.warn(
            f"{user}: this process was forked from one that had started numba's parallel threads under its "
            f"{what} threading layer, which is not fork-safe (numba would terminate this process at its first "
            f"parallel kernel); in this forked process {instead}. To keep numba in child processes use the spawn "
            "start method (multiprocessing.get_context('spawn'), DataLoader(multiprocessing_context='spawn')) or "
            "set NUMBA_THREADING_LAYER=workqueue or tbb before numba is first used.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
    return True


def _learn_layer() -> None:
    """Read the threading layer once numba has launched its threads, and with it whether launches serialise."""
    global _SERIALISE
    layer = _launched_layer()
    if layer is not None:
        _SERIALISE = layer.split(":")[0] not in THREAD_SAFE_LAYERS


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` for a parallel (``prange``) numba kernel: under :data:`_LAUNCH_LOCK` where numba's threading
    layer cannot take launches from several threads at once (``workqueue``, which aborts the process) or is not known
    yet (the first launch reads it); directly under ``omp`` and ``tbb``."""
    if _SERIALISE is None:
        _learn_layer()  # numba's threads may already run (a thread count set, another library's kernels)
    if _SERIALISE is False:
        return kernel(*args)
    with _LAUNCH_LOCK:
        result = kernel(*args)
        if _SERIALISE is None:
            _learn_layer()
    return result
