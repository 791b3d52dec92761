"""The two passes of :class:`~bma_gp.optim.BlockMeanAdagrad`'s ``fused=True`` step, compiled with ``torch.compile``.

Eager PyTorch needs one kernel (one pass over the parameters) per operation and keeps
``n = g / z`` and ``r = z^{-1/2}`` in buffers between the block sums and the update. Here
each pass is one generated loop per parameter tensor:

1. :func:`block_sums` reads ``g`` and ``h`` and reduces, per block (row of the parameter's
   ``(rows, cols)`` matrix), ``sum g r``, ``sum n`` and ``sum n^2`` with ``h + g^2`` in place of
   ``h``, and whether every gradient entry is finite. It writes nothing, so a non-finite
   gradient can still be refused with the state untouched, without a separate pass to check;
2. :func:`apply_update` reads ``g``, ``h`` and ``theta`` and writes ``h += g^2`` and
   ``theta = c2 theta + c0 n + c1 r`` with the per-block coefficients ``c`` (learning rate,
   preconditioner and weight decay folded in), recomputing ``r`` and ``n = g r^2`` instead of
   storing them.

That is seven streams over the parameters, where ``torch.optim.Adagrad`` makes eleven. The
entries with ``h = 0`` get ``r = 0`` by a minimum inside the loop (no host synchronisation; the
formula is :func:`bma_gp.optim._scaling.z_inv_sqrt`, shared with the eager paths).
Both functions are plain PyTorch, so they also run uncompiled: that is the fallback when
compilation is unavailable, and the reference the tests compare the compiled code with.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bma_gp._warnings import caller_stacklevel
from bma_gp.optim import _jit
from bma_gp.optim._scaling import z_inv_sqrt

__all__ = ["apply_update", "block_sums", "compiled", "forked_without_numba"]


def block_sums(gs: list[Tensor], hs: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Pass 1: the per-block sums of this step, and a finiteness flag; reads ``g`` and ``h``, writes nothing.

    Args:
        gs: the gradients, any shape with ``hs[i].numel()`` entries (maximize groups already negated).
        hs: the running sums of squares before this step, as ``(rows, cols)`` matrices, one row per block.
        eps: added after the square root, ``z = sqrt(h + g^2) + eps``.

    Returns:
        ``(sum_i rows_i, 3)``: per block ``sum r g``, ``sum n`` and ``sum n^2`` with ``r = z^{-1/2}`` and
        ``n = g / z``, computed as ``r^2 g`` (these passes are compute-bound on square roots and divisions);
        and a 0-d boolean tensor, whether every gradient entry is finite.
    """
    out, flags = [], []
    for g, h in zip(gs, hs):
        g = g.reshape(h.shape).to(h.dtype)
        r = _inv_root(h + g * g, eps)
        v = g * r
        n = v * r  # g / z to rounding, without a second division
        out.append(torch.stack([v.sum(-1), n.sum(-1), (n * n).sum(-1)], dim=-1))
        flags.append(torch.isfinite(g).all())
    return torch.cat(out), torch.stack(flags).all()


def apply_update(gs: list[Tensor], hs: list[Tensor], ps: list[Tensor], coefs: list[Tensor], eps: float) -> None:
    """Pass 2, for every parameter ``i``: ``hs[i] += g^2`` and ``ps[i] = c2 ps[i] + c0 n + c1 r`` in place, per block.

    Args:
        gs, hs, eps: as for :func:`block_sums` (the same ``h + g^2``, so the same ``r``, is computed again).
        ps: the parameters (any shape and strides, any floating dtype).
        coefs: per parameter ``(rows, 3)``: the coefficients ``c0, c1, c2`` of each block.
    """
    for g, h, p, c in zip(gs, hs, ps, coefs):
        g = g.reshape(h.shape).to(h.dtype)
        h_new = h + g * g
        r = _inv_root(h_new, eps)
        new = p.reshape(h.shape).to(h.dtype) * c[:, 2:3] + (c[:, 0:1] * (g * r) + c[:, 1:2]) * r
        h.copy_(h_new)
        p.copy_(new.reshape(p.shape).to(p.dtype))


def _inv_root(h: Tensor, eps: float) -> Tensor:
    """``z^{-1/2}`` with ``z = sqrt(h) + eps``, and 0 where ``h = 0`` (the formula all paths share)."""
    return z_inv_sqrt(h, eps, mask=True)


_COMPILED: dict[str, object] = {}

#: which code runs the fused passes on CPU: ``"numba"`` (the kernels of :mod:`bma_gp.optim._jit`, when numba
#: is installed and the statistics are float32 or float64) or ``"inductor"`` (``torch.compile``, as on other
#: devices). numba's kernels compile once per machine instead of once per process, and run faster here
#: (docs/optimizer.md); both compute the same passes to rounding.
CPU_BACKEND = "numba"


def compiled(name: str):
    """The fused :func:`block_sums` or :func:`apply_update` for the statistics it is called with.

    On CPU, with :data:`CPU_BACKEND` ``"numba"`` and numba installed, the numba kernels of
    :mod:`bma_gp.optim._jit`; otherwise the ``torch.compile``'d function (below). In a process forked from one that
    ran numba's threads under a layer that is not fork-safe (GNU OpenMP; :func:`bma_gp.optim._jit.forked_child`),
    where numba's kernels would have run, the plain-PyTorch function itself: no compiler (whose first call costs
    seconds per process and needs a C++ toolchain on CPU), the same results to rounding.
    """
    passes: dict[str, Callable[..., Any]] = {"block_sums": block_sums, "apply_update": apply_update}

    def call(*args):
        hs = args[1]
        if hs and uses_numba(hs[0].device, hs[0].dtype):
            return getattr(_jit, name)(*args)
        if hs and forked_without_numba(hs[0].device, hs[0].dtype):
            return passes[name](*args)
        return _inductor(name)(*args)  # torch.compile (and its 2 s import) only where it runs

    return call


def uses_numba(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused passes on statistics of this device and dtype run numba's kernels."""
    return CPU_BACKEND == "numba" and _jit.usable(device, dtype)


def forked_without_numba(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused passes on statistics of this device and dtype would run numba's kernels, but this process
    was forked from one that ran them under a threading layer that is not fork-safe
    (:func:`bma_gp.optim._jit.forked_child`): they then run uncompiled, as plain PyTorch."""
    return CPU_BACKEND == "numba" and _jit.forked_child(device, dtype)


def _inductor(name: str):
    """The ``torch.compile``'d :func:`block_sums` or :func:`apply_update` (shared by all optimizers).

    Shapes are dynamic, so parameters of new sizes reuse the generated code; a new structure
    (number of tensors, ranks, dtypes) compiles a new variant, up to TorchDynamo's
    ``recompile_limit`` per function. Past it, TorchDynamo runs the new structures eagerly (and
    logs a warning) while the variants already compiled stay in use; ``fullgraph`` is left off
    for that reason (with it, the limit is an error). Where compilation itself fails (no C++
    compiler for the CPU backend, no Triton for CUDA), the eager function runs from then on,
    with one warning per process, at the caller's line (:func:`bma_gp._warnings.caller_stacklevel`): same
    results, eager speed.
    """
    fn = _COMPILED.get(name)
    if fn is None:
        passes: dict[str, Callable[..., Any]] = {"block_sums": block_sums, "apply_update": apply_update}
        eager = passes[name]
        compiled_fn = torch.compile(eager, dynamic=True, options=_isa_options())
        fn = _COMPILED[name] = _with_eager_fallback(name, eager, compiled_fn)
    return fn


def _isa_options() -> dict[str, Any]:
    """Inductor options that name the CPU vector instruction set its C++ code is generated for.

    Inductor picks that set from ``ATEN_CPU_CAPABILITY`` (``avx2``, ``avx512``, ``default`` for none) or, unset, the
    best the machine has, but its on-disk compiled-graph cache (FX graph cache, shared by every process of a user
    under ``/tmp/torchinductor_<user>``) does not tell the sets apart: with torch 2.13 a process on an AVX-512
    machine that loaded the graph a process under ``ATEN_CPU_CAPABILITY=avx2`` had stored (or the reverse) ran the
    fused passes to wrong steps (parameters off by 1.4, NaN), silently. ``cpp.simdlen`` is part of the cache key, and
    set to the picked set's width it picks the same set (0 where none is picked), so each set gets its own entries.
    """
    try:  # a private module: a torch that moved it compiles without the option (as before session 33)
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return {"cpp.simdlen": int(pick_vec_isa().bit_width())}
    except Exception:  # pragma: no cover - depends on the torch build
        return {}


def _with_eager_fallback(name: str, eager, fast):
    def call(*args):
        if _COMPILED.get(name + ":failed"):
            return eager(*args)
        try:
            return fast(*args)
        except Exception as exc:  # compilation failed: nothing was written (the compiled code never ran)
            if not _is_compile_failure(exc):
                raise
            if "RecompileLimit" in type(exc).__name__:  # (config.fail_on_recompile_limit_hit): this structure only
                return eager(*args)
            # an error of the computation itself (TorchDynamo reports it from its trace) raises here again,
            # as it would without torch.compile, and does not switch compilation off
            result = eager(*args)
            _COMPILED[name + ":failed"] = True
            if not _COMPILED.get(":warned"):  # one warning per process: both passes fail alike (no C++ compiler)
                _COMPILED[":warned"] = True
                warnings.warn(
                    f"BlockMeanAdagrad(fused=True): torch.compile of the fused step failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); running the same passes eagerly (slower). "
                    "The CPU backend needs a C++ compiler; on CPU numba's kernels replace torch.compile (pip install "
                    "bma-gp[jit]), and fused=False avoids both.",
                    RuntimeWarning,
                    stacklevel=caller_stacklevel(),
                )
            return result

    return call


def _is_compile_failure(exc: Exception) -> bool:
    """Whether ``exc`` came from torch.compile's machinery rather than from the computation itself."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(exc, (OSError, ImportError))
