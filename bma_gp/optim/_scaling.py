r"""The per-entry scaling of block-mean AdaGrad, :math:`r = z^{-1/2}` with :math:`z = \sqrt{h} + \epsilon`.

One formula for every path of the step (eager, fused and scattered): entries whose gradient has
always been exactly 0 (:math:`h = 0`) get :math:`r = 0` instead of :math:`\epsilon^{-1/2}`, which
would amplify the coupling term of their block by up to :math:`10^5`. The mask needs no boolean
tensor: :math:`\min(z^{-1/2}, \sqrt{h}\,\beta)` is :math:`z^{-1/2}` for every :math:`h > 0` and 0 for
:math:`h = 0`, with :math:`\beta` from :func:`unmask_scale`. The normalised gradient :math:`n = r^2 g` is 0
there too: an entry whose :math:`g^2` underflows to 0 in the state's dtype (:math:`|g|` below about
:math:`10^{-23}` in float32, :math:`10^{-162}` in float64) keeps :math:`h = 0` and counts as one without
gradient, in every path (the fused passes compute :math:`n = v r`; the eager ones divide and then mask).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

__all__ = ["fast_sqrt", "sqrt_plus_eps_cpu", "unmask_scale", "z_inv_sqrt", "zero_entries"]


def unmask_scale(dtype: torch.dtype) -> float:
    """A power of two ``big`` with ``sqrt(h) * big >= (sqrt(h) + eps)^{-1/2}`` for every representable h > 0.

    The worst case is the smallest subnormal h with ``eps = 0``: ``sqrt(h) * big = 2^{e/2} big`` against
    ``2^{-e/4}`` (``e`` its exponent, -149 in float32, -1074 in float64). ``big = 2^{m - 9}``, ``m`` the
    exponent of the largest finite value, clears it by more than ``2^7`` in both.
    """
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] - 9)


def z_inv_sqrt(
    h: Tensor,
    eps: float,
    *,
    mask: bool = True,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
    divide: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r""":math:`r = (\sqrt{h} + \epsilon)^{-1/2}`, and with ``mask`` :math:`r = 0` where :math:`h = 0`.

    Written once for the eager step (``out`` and ``scratch`` are reused buffers of ``h``'s shape; the
    mask costs two more passes, so the eager step skips it once no entry of ``h`` is 0; without it, on
    CPU, :math:`z` comes from :func:`sqrt_plus_eps_cpu`) and for the compiled passes (no buffers: the
    compiler fuses everything into one loop).

    Args:
        h: the running sums of squares, this step's included.
        eps: :math:`\epsilon`, added after the square root.
        mask: zero the entries with ``h == 0``.
        out: receives ``r``.
        scratch: receives :math:`\sqrt{h}` (then overwritten when masking).
        divide: ``(g, n)``: also write :math:`n = g / z` into ``n`` (with ``out``), divided exactly as
            ``torch.optim.Adagrad`` divides, before ``z`` becomes ``r`` in place; with ``mask``, ``n = 0`` where
            ``h == 0`` too (:math:`n = r^2 g`). Without ``mask`` the caller masks ``n`` with ``r``
            (:meth:`bma_gp.optim.functional.Workspace.mask_zeros`).
    """
    big = unmask_scale(h.dtype)
    if out is None:  # functional form (compiled passes)
        root = h.sqrt()
        r = (root + eps).rsqrt()
        return torch.minimum(r, root * big) if mask else r
    if mask:  # sqrt(h) is needed twice: keep it in the scratch buffer
        root = torch.sqrt(h, out=scratch) if scratch is not None else h.sqrt()
        z = torch.add(root, eps, out=out)
    elif h.device.type == "cpu":  # in place in ``out``, without torch.sqrt (see sqrt_plus_eps_cpu)
        z = sqrt_plus_eps_cpu(h, eps, out)
    else:  # in place in ``out``: no third buffer in the working set
        z = torch.sqrt(h, out=out).add_(eps)
    if divide is not None:
        torch.div(divide[0], z, out=divide[1])
    z.rsqrt_()
    if mask:
        torch.minimum(out, root.mul_(big), out=out)
        if divide is not None:  # n = r^2 g = 0 where h = 0 (g^2 underflowed): not g / eps
            divide[1].masked_fill_(root == 0, 0.0)
    return out


def zero_entries(h: Tensor, known: Tensor | None) -> Tensor:
    """The flat indices where ``h == 0``, updated from the previous step's list ``known``.

    ``h`` only grows, so the entries that are 0 now are among those that were 0 before: after the
    first step this looks at those few entries only, not at all of ``h``. The eager step on CPU
    masks ``r`` with it (:meth:`torch.Tensor.index_put_`), which costs nothing once every entry has
    had a gradient, where :func:`z_inv_sqrt`'s ``mask`` costs two more passes. On an accelerator
    the list would need a host synchronisation per step, so the formula is used there.

    Args:
        h: the running sums of squares, this step's included. # shape: (m,)
        known: the list of the previous step, or ``None`` to search all of ``h``.
    """
    if known is None:
        return (h == 0).nonzero().flatten()
    if known.numel() == 0:
        return known
    values = h.index_select(0, known)
    if int(torch.count_nonzero(values)) == 0:  # the usual case (dead units stay dead): no new list to build
        return known
    return known[values == 0]


@functools.cache
def fast_sqrt() -> bool:
    """Whether ``torch.sqrt`` on CPU float tensors is faster than ``torch.rsqrt`` on this machine, decided from what
    the machine is (no time measurement, so that the step's rounding does not depend on one).

    torch computes ``sqrt`` on CPU through MKL's vector math library where torch was built with MKL. MKL takes its
    optimised code on Intel processors and a generic path elsewhere: on the AMD EPYC machines of the first
    sessions ``sqrt`` cost twice ``rsqrt`` (a hardware square root and one division), on the Intel Xeon of
    5 December 2026 ``sqrt`` took 0.145 against 0.19 ms per :math:`2^{20}` float32 entries, and 0.29 ms with MKL
    held to its generic path there (``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` or ``MKL_CBWR=COMPATIBLE``). So: ``True``
    without MKL (torch's own vectorised square root), or on a ``GenuineIntel`` processor (Linux's
    ``/proc/cpuinfo``) with neither of those variables set; ``False`` otherwise, and where the vendor is unknown.
    """
    if not torch.backends.mkl.is_available():
        return True
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS") or os.environ.get("MKL_CBWR"):
        return False
    return _cpu_vendor() == "GenuineIntel"


def _cpu_vendor() -> str:
    """The ``vendor_id`` of ``/proc/cpuinfo`` (Linux), or ``""``."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def sqrt_plus_eps_cpu(h: Tensor, eps: float, out: Tensor) -> Tensor:
    r""":math:`z = \sqrt{h} + \epsilon` into ``out``: the CPU eager step's form.

    Where :func:`fast_sqrt`, ``sqrt(h) + eps`` (two passes; 0.64 against 0.78 ms for the chain form's passes per
    :math:`2^{20}` float32 entries on the Intel machine). Elsewhere ``1 / rsqrt(h) + eps``: on the AMD machines
    ``torch.sqrt`` through MKL's generic path cost twice ``torch.rsqrt`` (0.80 against 0.37 ms per 2M float32
    entries, 2 threads). ``1 / rsqrt(h)`` keeps both ends exact (``h = 0`` gives ``z = eps``, ``h = inf`` gives
    ``z = inf``, as the square root does) and is within 2 ulp of it elsewhere (measured 1.4 ulp in float32); three
    passes over ``out`` (0.76 ms against 1.13 for ``sqrt`` plus the add there).
    """
    if fast_sqrt():
        return torch.sqrt(h, out=out).add_(eps)
    return torch.rsqrt(h, out=out).reciprocal_().add_(eps)
