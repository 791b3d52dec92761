"""The fused step's two passes on CPU as numba kernels: :func:`block_sums` and :func:`apply_update`.

Same signatures and results (to rounding) as :func:`bma_gp.optim._fused.block_sums` and
:func:`bma_gp.optim._fused.apply_update`, which ``torch.compile`` turns into loops; here numba
(an LLVM JIT shipped as a wheel, no C++ toolchain) compiles :mod:`bma_gp.optim._jit_kernels` once
per machine and dtype (float32, float64) and keeps the machine code in its on-disk cache. Measured
on the 2-core development machine (docs/optimizer.md): 6.3 s the first time (float32), 0.9-1.0 s for
the first step of every later process, against 4.3-5.0 s per process for ``torch.compile`` with a warm
cache; the same seven streams over the parameters, and no guard checks per call.

numba is an optional dependency (``pip install bma-gp[jit]``): :data:`AVAILABLE` says whether it is
installed, without importing it (the import and the cache load happen at the first fused CPU step). In a process
forked from one that ran numba's kernels under its GNU OpenMP threading layer, which is not fork-safe, :func:`usable`
is ``False`` (one ``RuntimeWarning``; :func:`bma_gp._numba.forked_unsafe`), and under numba's ``workqueue`` layer
the parallel kernels are launched one thread at a time (:func:`bma_gp._numba.launch`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from bma_gp._numba import AVAILABLE, forked_unsafe, import_kernels, in_unsafe_fork, launch, match_torch_threads

__all__ = ["AVAILABLE", "CHUNK", "apply_update", "block_sums", "forked_child", "usable"]

#: entries per parallel task; a task never crosses a block (a row of the ``(rows, cols)`` matrix)
CHUNK = 16384

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether statistics of this device and dtype can take the numba kernels: numba installed and importable,
    CPU, float32 or float64, and not a process forked from one that ran numba's threads under a layer that is not
    fork-safe (:func:`forked_unsafe`: the fused passes then run uncompiled, :func:`bma_gp.optim._fused.compiled`)."""
    return (
        AVAILABLE
        and torch.device(device).type == "cpu"
        and dtype in _NUMPY
        and not forked_unsafe(
            "BlockMeanAdagrad(fused=True)",
            "the step runs without numba and without torch.compile, as the eager step (fused=False), with the "
            "same results to rounding",
        )
        and _importable()
    )


def forked_child(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether statistics of this device and dtype would take the numba kernels but this process was forked from one
    that ran numba's threads under a layer that is not fork-safe (:func:`usable` is then ``False``)."""
    return AVAILABLE and in_unsafe_fork() and torch.device(device).type == "cpu" and dtype in _NUMPY


_IMPORT: list[bool] = []  # [whether numba and the kernels imported], once tried


def _importable() -> bool:
    """Import numba and the kernels once (:func:`bma_gp._numba.import_kernels`): where that fails, warn once and
    report ``False``, so that ``fused=True`` runs its ``torch.compile`` path instead."""
    return import_kernels(
        "bma_gp.optim._jit_kernels",
        _IMPORT,
        "BlockMeanAdagrad(fused=True)",
        "the fused passes use torch.compile instead",
    )


#: tensors of at most this many entries run on the calling thread (a parallel launch costs more than it saves)
SERIAL_MAX = CHUNK


def _kernels():
    from bma_gp.optim import _jit_kernels

    match_torch_threads()
    return _jit_kernels


def _as_flat(x: Tensor, h: Tensor) -> np.ndarray:
    """``x`` as a contiguous 1-d numpy array in ``h``'s dtype (a view where it already is one)."""
    x = x.detach().reshape(-1)
    if x.dtype != h.dtype:
        x = x.to(h.dtype)
    return x.contiguous().numpy()


def _h_flat(h: Tensor) -> np.ndarray:
    if not h.is_contiguous():
        raise ValueError("the fused numba passes need contiguous statistics (a view of the flat h buffer)")
    return h.detach().reshape(-1).numpy()


def block_sums(gs: list[Tensor], hs: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Pass 1 (see :func:`bma_gp.optim._fused.block_sums`): per block ``sum v``, ``sum n``, ``sum n^2``, and whether
    every gradient entry is finite; reads ``g`` and ``h``, writes nothing."""
    kernels = _kernels()
    dtype = hs[0].dtype
    one, eps_ = _NUMPY[dtype](1), _NUMPY[dtype](eps)
    parts = []
    for g, h in zip(gs, hs):
        rows, cols = h.shape
        if rows * cols == 0:
            parts.append(np.zeros((rows, 4)))
            continue
        if rows * cols <= SERIAL_MAX:
            parts.append(kernels.block_sums_serial(_as_flat(g, h), _h_flat(h), cols, eps_, one))
        else:
            parts.append(launch(kernels.block_sums, _as_flat(g, h), _h_flat(h), cols, eps_, one, CHUNK))
    sums = np.concatenate(parts) if parts else np.zeros((0, 4))
    finite = bool((sums[:, 3] == 0).all())
    return torch.from_numpy(np.ascontiguousarray(sums[:, :3])).to(dtype), torch.tensor(finite, device="cpu")


def apply_update(gs: list[Tensor], hs: list[Tensor], ps: list[Tensor], coefs: list[Tensor], eps: float) -> None:
    """Pass 2 (see :func:`bma_gp.optim._fused.apply_update`): ``h += g^2`` and ``p = c2 p + c0 n + c1 r`` in place."""
    kernels = _kernels()
    dtype = hs[0].dtype if hs else torch.float32  # one flat h buffer: one dtype
    one, eps_ = _NUMPY[dtype](1), _NUMPY[dtype](eps)
    written: list[Tensor] = []  # parameters (and h) the kernels wrote in place, behind torch's back
    for g, h, p, c in zip(gs, hs, ps, coefs):
        rows, cols = h.shape
        if rows * cols == 0:
            continue
        if not written:  # the views of the one flat h share its version counter: bump it once
            written.append(h)
        direct = p.dtype == dtype and p.is_contiguous()
        if direct:
            written.append(p)
        # a parameter in another dtype or layout is updated in a contiguous copy in h's dtype, then written back
        target = p.detach() if direct else p.detach().reshape(-1).to(dtype, copy=True)
        coef = c.detach().to(dtype).contiguous().numpy()
        arrays = (_as_flat(g, h), _h_flat(h), target.reshape(-1).numpy(), coef, cols, eps_, one)
        if rows * cols <= SERIAL_MAX:
            kernels.apply_update_serial(*arrays)
        else:
            launch(kernels.apply_update, *arrays, CHUNK)
        if not direct:
            p.copy_(target.view(p.shape))
    # as torch's in-place ops do: autograd then refuses a graph that saved the old values, and the CPU eager step
    # sees that h changed since its bounds of h were taken (a run may alternate between the two steps)
    if written:
        increment_version(written)
