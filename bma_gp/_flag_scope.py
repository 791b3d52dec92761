"""GPyTorch's ``lazily_evaluate_kernels`` with the scope of its ``with`` blocks confined to the thread that entered
them.

GPyTorch's feature flags are class attributes: ``with settings.lazily_evaluate_kernels(False)`` switches lazy
evaluation off for the whole process while it runs, and restores the value it saw when the context manager was
made. GPyTorch enters it on every evaluation of a lazy kernel tensor (each training step), and this package in its
kernel sums. In a process that uses GPyTorch from several threads, another thread's evaluation made a kernel call
in this one eager, and a ``BlockMeanKernel`` in eval mode then predicted by GPyTorch's default strategy (a user
trial: a posterior mean 0.79 off at the training inputs); interleaved blocks restored each other's values and left
the flag off for good (every later prediction of the process changed meaning).

Here each thread keeps the blocks it entered, innermost last, and the flag reads the innermost one (the class
attribute, ``_set_state`` or the default, outside any; a block's exit puts the attribute back as GPyTorch's does).
A block is one entry, removed by its own exit: the same
context manager object entered twice (nested) exits twice, and a block left in another thread (a generator that
yields inside it, finished elsewhere) is removed from the thread that entered it. A single thread sees what it saw
before.
"""

from __future__ import annotations

import threading

__all__ = ["install"]

_BLOCKS = threading.local()  # .entries: this thread's open blocks, [(entry, state)], innermost last


def _entries() -> list:
    entries = getattr(_BLOCKS, "entries", None)
    if entries is None:
        entries = _BLOCKS.entries = []
    return entries


def install() -> None:
    """Scope ``gpytorch.settings.lazily_evaluate_kernels``'s ``with`` blocks to their thread (idempotent)."""
    from gpytorch.settings import lazily_evaluate_kernels
    from linear_operator.settings import _feature_flag

    cls = lazily_evaluate_kernels
    if cls.__dict__.get("_bma_gp_scoped"):
        return
    global_on = _feature_flag.on.__func__

    def __enter__(self):
        entries = _entries()
        entry = object()
        entries.append((entry, bool(self.state)))
        self.__dict__.setdefault("_bma_gp_open", []).append((entries, entry))

    def __exit__(self, *args):
        open_blocks = self.__dict__.get("_bma_gp_open")
        if open_blocks:
            entries, entry = open_blocks.pop()
            for i in range(len(entries) - 1, -1, -1):
                if entries[i][0] is entry:
                    del entries[i]
                    break
        # as GPyTorch's exit: the class attribute back to what it was when the block was made (a _set_state inside
        # the block is undone; without one, a no-op)
        type(self)._set_state(self.prev)
        return False

    def on(klass) -> bool:
        entries = getattr(_BLOCKS, "entries", None)
        return entries[-1][1] if entries else global_on(klass)

    cls.__enter__ = __enter__
    cls.__exit__ = __exit__
    cls.on = classmethod(on)
    cls._bma_gp_scoped = True
