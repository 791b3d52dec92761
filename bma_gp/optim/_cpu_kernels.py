r"""torch's fused CPU optimizer kernels, reused for block-mean AdaGrad's eager step on CPU.

The eager step on CPU (one block per tensor) is bound by passes over memory. torch ships one-pass C++ kernels
for its own optimizers (``torch._fused_adagrad_``, ``torch._fused_sgd_``); with the right arguments they compute
parts of this step too, each in one pass where plain tensor operations need two to four:

* :func:`adagrad_ratio`: ``h += g^2`` and :math:`n' = s\,g / z` with :math:`z = \sqrt{h} + \epsilon` in one pass
  (AdaGrad's own update, applied to a zeroed buffer with learning rate ``-s``); then
  :math:`\tilde r = (n' / g)^{1/2} = \sqrt{s}\, z^{-1/2}` from the quotient, without a second square root of
  ``h``. The power of two ``s`` (:func:`ratio_scale`) keeps :math:`n'` a normal number for every nonzero
  gradient entry, so that the quotient recovers :math:`s / z` to rounding; where a gradient entry is exactly 0
  the quotient is ``0 / 0`` and the caller recomputes :math:`\tilde r` from ``h`` (:func:`rescale_from_h`).
  Where :func:`~bma_gp.optim._scaling.fast_sqrt`, ``sqrt`` of the quotient :math:`n' / g` rather than ``rsqrt``
  of :math:`g / n'`: torch's ``rsqrt`` is a square root and a division, so this is one division per entry fewer
  (measured on the Intel machine of 5 December 2026: 0.29 against 0.42-0.46 ms per :math:`2^{20}` float32
  entries, with torch's AVX2 and AVX-512 kernels); where MKL's ``sqrt`` takes its generic path, ``rsqrt`` of
  :math:`g / n'` (0.32 against 0.43 ms per :math:`10^6` entries on the AMD machines).
* :func:`add_two`: ``p += a x + b y`` in one pass (SGD's Nesterov update with momentum 1, ``y`` as the momentum
  buffer, which it overwrites).

Both kernels exist on CPU from torch 2.4; :func:`available` says whether this torch has them.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from bma_gp.optim._scaling import fast_sqrt, z_inv_sqrt

__all__ = ["adagrad_ratio", "add_two", "available", "ratio_chunk_numel", "ratio_scale", "rescale_from_h"]


@functools.cache
def available() -> bool:
    """Whether ``torch._fused_adagrad_`` and ``torch._fused_sgd_`` run on CPU float32 tensors in this torch."""
    try:
        cpu = torch.device("cpu")  # whatever torch's default device: the answer is cached for the process
        x, g, h = torch.zeros(4, device=cpu), torch.ones(4, device=cpu), torch.zeros(4, device=cpu)
        torch._fused_adagrad_(
            [x], [g], [h], [torch.ones((), device=cpu)], lr=-1.0, lr_decay=0.0, weight_decay=0.0, eps=0.0,
            maximize=False,
        )  # fmt: skip
        y = torch.ones(4, device=cpu)
        torch._fused_sgd_(
            [x], [g], [y], weight_decay=0.0, momentum=1.0, lr=-1.0, dampening=1.0,
            nesterov=True, maximize=False, is_first_step=False,
        )  # fmt: skip
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    # x = g / (sqrt(0 + 1) + 0) = 1; then x += 1 * (g + (y + 0 * g)) = 1 + 2
    return bool(torch.equal(h, g)) and bool(torch.equal(x, torch.full((4,), 3.0, device="cpu")))


def ratio_scale(h_bound: float, g_max: float, eps: float, numel: int, dtype: torch.dtype) -> float:
    r"""A power of four ``s`` for :func:`adagrad_ratio` on a tensor, or ``0.0`` where none is safe.

    With :math:`z = \sqrt{h} + \epsilon \le z_\max` after the step, ``s`` must keep (1) :math:`s |g| / z` a normal
    number for the smallest nonzero :math:`|g|` (the subnormal minimum), so that :math:`n' / g` is :math:`s / z`
    (and :math:`g / n'` is :math:`z / s`) to rounding; (2) :math:`z / s` normal for the smallest :math:`z` (at
    least :math:`\epsilon` and :math:`\sqrt{h}` of the smallest positive ``h``); (3)
    :math:`\sum n'^2 \le \mathrm{numel}\, s^2` and :math:`s \max|g|` finite. Each bound keeps a factor of two to
    spare. ``s`` is a power of four, so that :math:`\sqrt{s}` and every rescaling by it are exact.

    Args:
        h_bound: an upper bound of ``h`` over the tensor after this step's ``g^2`` is added.
        g_max: the largest ``|g|`` of this step.
        eps, numel, dtype: :math:`\epsilon`, the tensor's number of entries and its dtype.
    """
    if not (math.isfinite(h_bound) and math.isfinite(g_max)):
        return 0.0
    exp_min, exp_max, nmant, root_min = _exponents(dtype)
    z_max = math.sqrt(h_bound) * (1 + 2.0**-20) + eps
    z_min = max(eps, root_min)
    low = nmant + 2 + math.frexp(z_max)[1]  # (1): s >= 2^(nmant + 2) z_max
    high = min(
        math.frexp(z_min)[1] - 3 - exp_min,  # (2): z_min / s >= 4 * smallest normal
        (exp_max - 2 - numel.bit_length()) // 2,  # (3): numel s^2 <= max / 2
        exp_max - 3 - math.frexp(g_max)[1],  # (3): s max|g| <= max / 4
    )
    k = low + (low & 1)  # even: s = 4^(k/2)
    return 2.0**k if k <= high else 0.0


@functools.cache
def _exponents(dtype: torch.dtype) -> tuple[int, int, int, float]:
    """For :func:`ratio_scale`: ``exp_min`` (the smallest normal is ``2^exp_min``), ``exp_max`` (every finite value
    is below ``2^exp_max``), ``nmant`` (machine epsilon ``2^-nmant``) and the square root of the smallest
    subnormal."""
    info = torch.finfo(dtype)
    return (
        math.frexp(info.tiny)[1] - 1,
        math.frexp(info.max)[1],
        1 - math.frexp(info.eps)[1],
        math.sqrt(info.tiny * info.eps),
    )


def adagrad_ratio(g: Tensor, h: Tensor, n: Tensor, r: Tensor, step: Tensor, scale: float, eps: float) -> None:
    r"""``h += g^2``, :math:`n = s\,g / z` and :math:`r = \sqrt{s}\, z^{-1/2}` (``r = nan`` where ``g == 0``).

    Four passes: zero ``n``; AdaGrad's fused kernel (``h`` and ``n``); the quotient ``n / g`` into ``r`` and its
    square root in place (or ``g / n`` and its reciprocal square root, see above). ``scale`` is
    :func:`ratio_scale`'s ``s``; ``step`` a 0-d tensor holding 1.
    """
    n.zero_()
    torch._fused_adagrad_([n], [g], [h], [step], lr=-scale, lr_decay=0.0, weight_decay=0.0, eps=eps, maximize=False)
    if fast_sqrt():
        torch.div(n, g, out=r).sqrt_()
    else:
        torch.div(g, n, out=r).rsqrt_()


def rescale_from_h(h: Tensor, r: Tensor, scale: float, eps: float) -> None:
    r""":math:`r = \sqrt{s}\, z^{-1/2}` from ``h`` (the quotient's repair where some ``g`` was exactly 0)."""
    z_inv_sqrt(h, eps, mask=False, out=r)
    if scale != 1.0:
        r.mul_(math.sqrt(scale))


#: below this ratio of the smaller coefficient to the larger, :func:`add_two` takes two passes instead of one
_ADD_TWO_MIN_RATIO = 2.0**-40


def add_two(p: Tensor, x: Tensor, y: Tensor, a: float, b: float) -> None:
    r"""``p += a x + b y`` in one pass where it can; ``x`` or ``y`` is overwritten (scratch buffers only).

    SGD's fused kernel with Nesterov momentum 1 and dampening ``d`` computes, with the momentum buffer ``y``,
    ``y <- y + (1 - d) x`` and then ``p <- p - lr (x + y)``: with ``lr = -b`` and ``2 - d = a / b`` that is
    :math:`p + a x + b y`. The larger coefficient goes with ``x`` (so that :math:`|a / b| \ge 1` and rounding
    stays relative to :math:`|a x| + |b y|`); where the smaller is 0 or below :data:`_ADD_TWO_MIN_RATIO` of the
    larger, two plain passes.
    """
    if abs(a) < abs(b):
        x, y, a, b = y, x, b, a
    if a == 0.0:
        return
    if abs(b) < _ADD_TWO_MIN_RATIO * abs(a):
        p.add_(x, alpha=a)
        if b != 0.0:
            p.add_(y, alpha=b)
        return
    torch._fused_sgd_(
        [p], [x], [y], weight_decay=0.0, momentum=1.0, lr=-b, dampening=2.0 - a / b,
        nesterov=True, maximize=False, is_first_step=False,
    )  # fmt: skip


#: entries per chunk of the ratio form's first pass over a large tensor (:func:`ratio_chunk_numel`): ``None``
#: decides per process from the machine, ``0`` never chunks, a positive number is the chunk length (tensors of at
#: least twice that many entries are chunked). Set it before the first step to pin the choice.
RATIO_CHUNK_NUMEL: int | None = None
#: the automatic choice chunks only where one parallel torch call on ``2^16`` entries takes less than this many
#: seconds (median of 21, warm): each chunk costs seven calls where the whole tensor costs one each
CALL_COST_MAX = 15e-6
#: buffers a chunk of the ratio form touches (``g``, ``h``, ``n``, ``r``): they should fit in the level-2 caches
_CHUNK_BUFFERS = 4
#: the automatic choice chunks only where the chunked pass measures at most this fraction of the whole-tensor pass's
#: time (:func:`_chunks_pay`)
CHUNK_GAIN_MIN = 0.95
#: the calibration's tensors have this many chunks' entries; it is skipped (no chunks) where its four buffers would
#: take more than :data:`_CALIBRATION_MAX_BYTES`
_CALIBRATION_CHUNKS = 4
_CALIBRATION_MAX_BYTES = 2**28


def ratio_chunk_numel(dtype: torch.dtype) -> int:
    r"""Entries per chunk of the ratio form's first pass (:func:`adagrad_ratio` and the three reductions), or 0
    for whole tensors.

    In chunks whose four buffers fit the level-2 caches of the threads torch runs on, each pass reads what the
    pass before it wrote from that cache instead of the last level: measured at :math:`2^{20}`-entry float32
    tensors on a machine with 2 MB of L2 per core, 2 threads, the step took 2.50 against 2.90 ms
    (:math:`2^{18}`-entry chunks). Each chunk costs seven torch calls where the whole tensor costs one per pass,
    which on a machine whose parallel calls cost tens of microseconds (measured 30-40 us on an earlier machine)
    is slower than the cache misses it saves. So, unless :data:`RATIO_CHUNK_NUMEL` is set:

    * no chunks where the L2 size is unknown (read from Linux's sysfs), or with
      :func:`torch.are_deterministic_algorithms_enabled` (the chunked reductions round differently, and the
      choice below depends on time measurements);
    * else the largest power of two of entries whose four buffers fit ``threads * L2``, if one parallel torch
      call measures below :data:`CALL_COST_MAX` and the chunked pass measures faster than the whole one on
      tensors of a few chunks (:func:`_chunks_pay`; once per process, dtype and number of threads).

    The last test is there because the cache sizes alone do not decide it: on the 2-core AMD EPYC machine of
    6 December 2026 (1 MB of L2 per core, 32 MB of L3) the chunked pass was slower at every chunk length, 1.22-1.38x
    the whole-tensor pass at ``4 * chunk`` entries and the whole step 2.42 against 2.04x Adagrad (1 thread), 1.95
    against 1.58x (2 threads), where the Intel machine of the measurement above gained from it.
    """
    setting = RATIO_CHUNK_NUMEL
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise ValueError(
                "bma_gp.optim._cpu_kernels.RATIO_CHUNK_NUMEL must be None (automatic), 0 (whole tensors) or a "
                f"positive number of entries per chunk, got {setting!r}"
            )
        return setting
    if torch.are_deterministic_algorithms_enabled():
        return 0
    return _automatic_chunk(dtype.itemsize, torch.get_num_threads())  # no tensor made on the step's path


@functools.cache
def _automatic_chunk(itemsize: int, threads: int) -> int:
    l2 = _l2_bytes()
    if not l2:
        return 0
    entries = l2 * threads // (_CHUNK_BUFFERS * itemsize)
    if entries < 2**15:
        return 0
    if _parallel_call_seconds() >= CALL_COST_MAX:
        return 0
    chunk = 1 << (entries.bit_length() - 1)
    return chunk if _chunks_pay(chunk, itemsize) else 0


def _chunks_pay(chunk: int, itemsize: int) -> bool:
    r"""Whether the ratio form's first pass in chunks of ``chunk`` entries measures at most :data:`CHUNK_GAIN_MIN`
    of its time over whole tensors, on tensors of :data:`_CALIBRATION_CHUNKS` chunks (median of interleaved runs,
    after two warm ones). The data then sits in the last-level cache at the start of each pass, as a large
    tensor's ``g``, ``h``, ``n`` and ``r`` do after the step's first read of ``g`` (where they fit): the runs weigh
    reads from the level-2 caches against reads from the last level, and the chunks' extra calls."""
    dtype = {4: torch.float32, 8: torch.float64}.get(itemsize)
    numel = _CALIBRATION_CHUNKS * chunk
    if dtype is None or _CHUNK_BUFFERS * numel * itemsize > _CALIBRATION_MAX_BYTES:
        return False
    cpu = torch.device("cpu")  # the CPU's calls, whatever torch's default device
    g = torch.rand(numel, dtype=dtype, device=cpu).add_(0.5)  # no zeros: the ratio needs no repair
    h, n, r = (torch.ones(numel, dtype=dtype, device=cpu) for _ in range(3))
    step = torch.ones((), dtype=dtype, device=cpu)
    sums = torch.empty(_CALIBRATION_CHUNKS, 3, dtype=dtype, device=cpu)
    spans = [slice(lo, lo + chunk) for lo in range(0, numel, chunk)]

    def first_pass(parts: list[slice]) -> float:
        start = time.perf_counter()
        for c, part in enumerate(parts):
            gc, hc, nc, rc = g[part], h[part], n[part], r[part]
            adagrad_ratio(gc, hc, nc, rc, step, 1.0, 1e-10)
            torch.dot(gc, rc, out=sums[c, 0])
            torch.sum(nc, 0, out=sums[c, 1])
            torch.dot(nc, nc, out=sums[c, 2])
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}  # by: in chunks
    for rep in range(11):
        for in_chunks in (True, False) if rep % 2 else (False, True):
            seconds = first_pass(spans if in_chunks else [slice(0, numel)])
            if rep >= 2:
                times[in_chunks].append(seconds)
    return statistics.median(times[True]) <= CHUNK_GAIN_MIN * statistics.median(times[False])


def _l2_bytes() -> int:
    """CPU 0's share of its level-2 data cache in bytes (the cache's size over the logical CPUs sharing it, so that
    two hyperthreads of a core count it once; Linux sysfs), or 0 where unknown."""
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
                sharing = _cpu_count((index / "shared_cpu_list").read_text())
                return int(size.rstrip("KMG")) * scale // max(sharing, 1)
    except (OSError, ValueError):
        pass
    return 0


def _cpu_count(cpu_list: str) -> int:
    """The number of CPUs in a Linux CPU list such as ``"0"``, ``"0-1"`` or ``"0,4-5"``."""
    count = 0
    for part in cpu_list.strip().split(","):
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return count


def _parallel_call_seconds() -> float:
    """The median time of one parallel torch call (zeroing ``2^16`` float32 entries, above torch's grain size)."""
    x = torch.empty(2**16, device="cpu")  # the CPU's calls, whatever torch's default device
    times = []
    for rep in range(24):
        start = time.perf_counter()
        x.zero_()
        if rep >= 3:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
