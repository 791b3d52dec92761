"""GPyTorch's ``lazily_evaluate_kernels`` with the scope of its ``with`` blocks confined to the thread (and context)
that entered them.

GPyTorch's feature flags are class attributes: ``with settings.lazily_evaluate_kernels(False)`` switches lazy
evaluation off for the whole process while it runs, and restores the value it saw when the context manager was
made. GPyTorch enters it on every evaluation of a lazy kernel tensor (each training step), and this package in its
kernel sums. In a process that uses GPyTorch from several threads, another thread's evaluation made a kernel call
in this one eager, and a ``BlockMeanKernel`` in eval mode then predicted by GPyTorch's default strategy (a user
trial: a posterior mean 0.79 off at the training inputs); interleaved blocks restored each other's values and left
the flag off for good (every later prediction of the process changed meaning). With the blocks' value held in a
context variable, each thread sees its own ``with`` blocks, and the class attribute (``_set_state``, the default)
where it is inside none. A single thread sees what it saw before.
"""

from __future__ import annotations

import contextvars

__all__ = ["install"]

#: the value of the innermost ``with lazily_evaluate_kernels(...)`` block of this context, or None outside any
_STATE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("_bma_gp_lazily_evaluate_kernels", default=None)


def install() -> None:
    """Scope ``gpytorch.settings.lazily_evaluate_kernels``'s ``with`` blocks to the context (idempotent)."""
    from gpytorch.settings import lazily_evaluate_kernels
    from linear_operator.settings import _feature_flag

    cls = lazily_evaluate_kernels
    if cls.__dict__.get("_bma_gp_scoped"):
        return
    global_on = _feature_flag.on.__func__

    def __enter__(self):
        self._bma_gp_token = _STATE.set(bool(self.state))

    def __exit__(self, *args):
        token = self.__dict__.pop("_bma_gp_token", None)
        if token is not None:
            try:
                _STATE.reset(token)
            except ValueError:  # left in another context than it was entered in: back to the value before it
                _STATE.set(None if token.old_value is contextvars.Token.MISSING else token.old_value)
        return False

    def on(klass) -> bool:
        state = _STATE.get()
        return global_on(klass) if state is None else state

    cls.__enter__ = __enter__
    cls.__exit__ = __exit__
    cls.on = classmethod(on)
    cls._bma_gp_scoped = True
