"""A partition of ``n`` indices into ``k`` non-empty blocks.

The partition is the only combinatorial object of the package: every block mean
matrix, approximation and optimizer state is defined relative to one. It knows
how to reduce a tensor over its blocks (:math:`P^\\top x`) and how to broadcast
one value per block back to the indices (:math:`P y`, or fused with a product:
:math:`P a + (P b) \\odot x`). Contiguous blocks that fall into a few runs of
equal size are reshaped views (no index vector is read); other contiguous
blocks use a segment reduction, scattered ones a scatter-add and a gather.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from collections.abc import Sequence
from types import EllipsisType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bma_gp._autograd import carries_tangent, functorch_wrapped, has_forward_tangent

__all__ = ["Partition"]

# Indices per gather chunk on CPU (Partition.expand_addcmul): the chunk buffers stay in cache, and the
# chunk is below torch's parallel grain size (32768), so no tiny parallel region waits on a busy core.
_GATHER_CHUNK = 16384
# Most runs of equal-size blocks that block sums and broadcasts walk as reshaped views, one by one.
_MAX_RUNS = 8


def _as_array(values):
    """``values`` in a form ``torch.as_tensor`` reads by position: a pandas Series, Index or DataFrame (anything with
    ``__array__`` that is not a tensor, an array, a list or a tuple) through numpy, since torch reads those as
    sequences by index label (a filtered frame's column, whose index has gaps, fails with ``KeyError`` or "could not
    determine the shape"); a read-only array (pandas' copy-on-write ``.to_numpy()``) copied, since torch warns that
    it cannot write to the array it would share memory with. Anything else is returned unchanged."""
    if not isinstance(values, (Tensor, np.ndarray, list, tuple)) and hasattr(values, "__array__"):
        values = np.asarray(values)
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = values.copy()
    return values


def _as_long_vector(values, name: str) -> Tensor:
    """Convert ``values`` to a 1-d ``torch.long`` tensor or raise a ValueError naming ``name``."""
    if isinstance(values, Tensor):
        tensor = values
    else:
        try:
            tensor = torch.as_tensor(_as_array(values), device="cpu")  # host data: not torch's default device
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a 1-d sequence of integers; could not convert it ({err}).") from None
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty: a partition needs at least one index.")
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(
            f"{name} must hold integers, got dtype {tensor.dtype}; convert it with `.long()` "
            "(after checking that the values are whole numbers)."
        )
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint64 and tensor.device.type != "meta":
        # .long() wraps values from 2^63 to negative ones (torch's uint64 has no comparisons on CPU)
        above = (tensor.view(torch.int64) < 0).nonzero().flatten()  # the same bits as int64: 2^63 and up
        if above.numel():
            i = int(above[0])
            raise ValueError(
                f"{name}[{i}] = {int(tensor[i].item())} is above 2^63 - 1, the largest block id or size a partition "
                "holds (labels and sizes are int64); renumber the labels "
                "(torch.unique(labels, return_inverse=True)[1])."
            )
    return tensor.long()


def _as_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or ``ValueError`` naming ``name`` for a string torch cannot read (its own
    error for ``"gpu"`` is a ``RuntimeError`` that names neither). Other refusals are torch's, as for tensors (an
    accelerator index where there is no accelerator)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        if not isinstance(device, str):
            raise
        raise ValueError(
            f"{name} must be a torch.device, a device string such as 'cpu' or 'cuda:0', or an accelerator index, got "
            f"{device!r} ({err})."
        ) from None


def _ordinary(t: Tensor) -> Tensor:
    """``t``, or an ordinary copy of an inference tensor (made under ``torch.inference_mode()``): a partition built
    there is kept and used later with gradients, and autograd refuses to save inference tensors for backward
    ("Inference tensors cannot be saved for backward", from a closed form that indexes with the labels)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _refuse_meta(values: Tensor, name: str) -> None:
    """``ValueError`` for ``values`` on the meta device, which holds no values to check (torch's own error there
    names neither the argument nor the way round)."""
    if values.device.type == "meta":
        raise ValueError(
            f"{name} are on the meta device, which holds no values to validate; build the partition on the CPU "
            "and move it with partition.to('meta') (or Partition.from_sizes(sizes, device='meta'))."
        )


#: entries of a narrower float input that block_sum widens to float64 at a time (2 MB of float64): a larger input is
#: summed a slab of indices at a time
_WIDEN_ENTRIES = 2**18
#: mean block size from which block_sum sums a contiguous partition by segments rather than an index_add: the measured
#: crossover (1.1-1.6x slower at 8-12 indices a block, with leading batch rows too; float32 widened slab by slab:
#: 2.3x faster at 20 .. 2000 blocks of 2^21 entries; float64: 3x faster from 32 a block)
_SEGMENT_MIN_SIZE = 16
# the dtype block_sum adds floats of each dtype in where it does not take torch.sum (see there)
_WIDER_SUM = {
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.float32: torch.float64,
    torch.complex32: torch.complex128,
    torch.complex64: torch.complex128,
}


def _equal_size_runs(sizes: Tensor) -> tuple[tuple[int, int, int, int], ...] | None:
    """Maximal runs of consecutive blocks of equal size in a contiguous partition.

    Each run is ``(first index, first block, number of blocks, block size)``: its indices are a
    ``(blocks, size)`` view of the data, so block sums and broadcasts over it are plain reshapes.
    ``None`` when there are more than ``_MAX_RUNS``: every run costs a few operations of its own, and
    on CPU each is a parallel region, which on a busy machine can wait a scheduler slice for its
    second thread (10 runs at n = 10^7 cost 3x one pass on the shared 2-core machine); past a few
    runs the single gather over the labels is the steadier choice.
    """
    sizes = sizes.cpu()
    starts = (torch.nonzero(sizes[1:] != sizes[:-1]).flatten() + 1).tolist()
    if len(starts) + 1 > _MAX_RUNS:
        return None
    bounds = [0, *starts, sizes.numel()]
    offsets = [0, *torch.cumsum(sizes, 0).tolist()]
    return tuple((offsets[a], a, b - a, int(sizes[a])) for a, b in zip(bounds[:-1], bounds[1:]))


def _missing_ids(present: Tensor, k: int, limit: int = 5) -> tuple[list[int], int]:
    """The first ``limit`` ids of ``0 .. k-1`` absent from the sorted unique ``present``, and how many are absent
    (``O(len(present))``: no counter per id)."""
    found: list[int] = []
    before = torch.cat([present.new_full((1,), -1), present])
    gaps = before[1:] - before[:-1] - 1  # ids missing just before each present id
    for j in gaps.nonzero().flatten()[:limit].tolist():
        start, count = int(before[j]) + 1, int(gaps[j])
        found.extend(range(start, start + min(count, limit - len(found))))
        if len(found) >= limit:
            break
    last = int(present[-1])
    if len(found) < limit and last < k - 1:
        found.extend(range(last + 1, min(k, last + 1 + limit - len(found))))
    return found, k - present.numel()


def _dim_index(dim: int, x: Tensor, name: str) -> int:
    """``dim`` of ``x`` counted from the front, or a ValueError (``dim % x.dim()`` would silently pick another
    dimension for an out-of-range ``dim``, and divide by zero for a 0-d ``x``); a ``TypeError`` for an ``x`` that is
    not a tensor or a ``dim`` that is not an integer."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} takes a tensor, got {type(x).__name__}; convert it with torch.as_tensor.")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{name}: dim must be an integer (a dimension of the tensor), got {dim!r}.")
    dim = int(dim)
    if x.dim() == 0:
        raise ValueError(f"{name} needs a tensor with the indices (or blocks) along a dimension, got a 0-d tensor.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{name}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}; "
            f"pass a dim in {-x.dim()} .. {x.dim() - 1} (the dimension of the n indices, or k blocks)."
        )
    return dim % x.dim()


def _raise_empty(missing: tuple[list[int], int], k: int) -> None:
    ids, count = missing
    shown = ", ".join(str(i) for i in ids)
    more = "" if count <= len(ids) else f" and {count - len(ids)} more"
    raise ValueError(
        f"block(s) {shown}{more} are empty: every block id in 0 .. {k - 1} must be used "
        "(relabel the blocks consecutively, e.g. with torch.unique(labels, return_inverse=True))."
    )


def _short(values: list[int], limit: int = 6) -> str:
    """A list of ids for a message, cut after ``limit``."""
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


class Partition:
    r"""A partition of the indices :math:`0, \dots, n-1` into :math:`k` non-empty blocks.

    Index :math:`m` belongs to block ``labels[m]``. Blocks need not be contiguous. With
    :math:`P` the :math:`n \times k` indicator matrix (:math:`P_{mi} = 1` iff
    ``labels[m] == i``), the partition provides :math:`P^\top x` (:meth:`block_sum`) and
    :math:`P y` (:meth:`expand`) without forming :math:`P`.

    Build one with :meth:`from_labels` or :meth:`from_sizes`; the constructor takes the
    same arguments as :meth:`from_labels`.

    Args:
        labels: block id of every index, integers in ``0 .. k-1``, every id used. An int64
            tensor is kept as it is, not copied (a copy of ``n`` labels costs as much memory
            again): do not change it in place afterwards, since the sizes and every cached
            layout were derived from it. # shape: (n,)
        num_blocks: ``k``; inferred as ``labels.max() + 1`` when omitted.

    Attributes:
        sizes: ``LongTensor`` of shape ``(k,)``, the number of indices in each block.
        num_blocks: ``k``.
        is_contiguous: whether block ``i`` is the run of indices
            ``sizes[:i].sum() .. sizes[:i+1].sum() - 1`` (the faster layout).

    Partitions (and the operators built on them) pickle, deep-copy and ``torch.save``. ``torch.load`` with
    ``weights_only=True`` (torch's default) loads only allow-listed classes: load inside
    ``torch.serialization.safe_globals([Partition, BlockMeanLinearOperator])`` (add ``BlockMeanSumLinearOperator``
    or ``BlockMeanProductLinearOperator`` for those operators), or save ``partition.labels`` and rebuild the partition
    with :meth:`from_labels`. Operators are saved without the results they computed.

    Example:
        >>> p = Partition.from_labels([0, 1, 0, 2])
        >>> p.sizes
        tensor([2, 1, 1])
        >>> p.block_sum(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([4., 2., 4.])
    """

    def __init__(self, labels, num_blocks: int | None = None):
        labels = _as_long_vector(labels, "labels")
        _refuse_meta(labels, "labels")
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            raise ValueError(f"labels must be non-negative block ids, found {lo}.")
        if num_blocks is None:
            num_blocks = hi + 1
        else:
            if isinstance(num_blocks, bool) or (torch.is_tensor(num_blocks) and num_blocks.dtype == torch.bool):
                raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}.")
            try:  # any integer: a Python int, a NumPy integer, a one-element integer tensor (labels.max() + 1)
                num_blocks = operator.index(num_blocks)
            except TypeError:
                raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}.") from None
            if num_blocks <= 0:
                raise ValueError(f"num_blocks must be positive, got {num_blocks}.")
            if hi >= num_blocks:
                raise ValueError(
                    f"label {hi} is out of range for num_blocks={num_blocks}; labels must lie in "
                    f"0 .. {num_blocks - 1} (or omit num_blocks to infer it)."
                )
        k: int = num_blocks
        if k > labels.numel():  # some block is empty: say which before counting (raw ids such as years or
            # user ids would make bincount allocate max_label + 1 counters)
            _raise_empty(_missing_ids(torch.unique(labels), k), k)
        sizes = torch.bincount(labels, minlength=k)
        empty = (sizes == 0).nonzero().flatten()
        if empty.numel():
            _raise_empty((empty[:5].tolist(), empty.numel()), k)
        contiguous = bool(labels.numel() <= 1 or (labels[1:] >= labels[:-1]).all())
        self._setup(labels, sizes, labels.numel(), contiguous)

    @classmethod
    def _trusted(
        cls,
        sizes: Tensor,
        *,
        labels: Tensor | None = None,
        contiguous: bool,
        runs: tuple[tuple[int, int, int, int], ...] | None | EllipsisType = ...,
        max_size: int | None = None,
        n: int | None = None,
    ) -> Partition:
        """A partition from already validated parts, without checks or host synchronisation.

        Args:
            sizes: the positive block sizes. # shape: (k,)
            labels: the block id of every index (consistent with ``sizes``); ``None`` for a contiguous
                partition, whose labels are then built on first use. # shape: (n,)
            contiguous: whether block ``i`` is the ``i``-th run of indices (must be ``True`` without labels).
            runs: the equal-size run table (see :func:`_equal_size_runs`); ``...`` builds it.
            max_size: the largest block size, when known.
            n: the number of indices, when known (else counted from ``labels`` or summed from ``sizes``, which
                needs their values: not on the meta device).
        """
        if labels is None and not contiguous:
            raise ValueError("a scattered partition needs its labels.")
        if n is None and labels is not None:
            n = labels.numel()
        res = cls.__new__(cls)
        res._setup(labels, sizes, n, contiguous, runs)
        res._max_size = max_size
        return res

    @classmethod
    def _whole(cls, n: int, device: torch.device | str | None = None) -> Partition:
        """One block of all ``n`` indices (a constant ``c 1 1^T`` as a block mean term), without checks."""
        return cls._trusted(torch.tensor([n], device=device), contiguous=True, max_size=n, n=n)

    def _setup(self, labels: Tensor | None, sizes: Tensor, n: int | None, contiguous: bool, runs=...) -> None:
        device = labels.device if labels is not None else sizes.device
        self._labels: Tensor | None = None if labels is None else _ordinary(labels)
        self.sizes: Tensor = _ordinary(sizes.to(device=device))
        self.num_blocks: int = int(sizes.numel())
        self._n: int = int(sizes.sum()) if n is None else n
        self.is_contiguous: bool = contiguous
        self._max_size: int | None = None
        self._hash: int | None = None
        self._digest: tuple[int, int] | None = None  # see _fingerprint
        # on the meta device (no values): the partition with values it was made from, which equality, hashing and
        # moves back to a real device read (None elsewhere, and for a meta partition with no known origin)
        self._values: Partition | None = None
        self._offset_table: tuple[np.ndarray, Tensor] | None = None  # see _offsets
        if runs is ...:  # a host-side table, built once here (not in the hot paths that use it)
            runs = _equal_size_runs(self.sizes) if contiguous else None
        self._runs: tuple[tuple[int, int, int, int], ...] | None = runs

    def _offsets(self) -> tuple[np.ndarray, Tensor]:
        """A contiguous partition's block boundaries ``0, s_0, s_0 + s_1, ..., n``, on the host (an int64 array, to
        find the blocks of a range without a device read-back) and as a tensor on the partition's device; built on
        first use."""
        if self._offset_table is None:
            with torch.inference_mode(False):  # kept: an ordinary tensor whatever the mode of the first call
                bounds = torch.cat([self.sizes.new_zeros(1), torch.cumsum(self.sizes, 0)])
            self._offset_table = (bounds.cpu().numpy().astype(np.int64), bounds)
        return self._offset_table

    @property
    def labels(self) -> Tensor:
        """The block id of every index: a ``LongTensor`` of shape ``(n,)`` (built on first use when the
        partition came from sizes)."""
        if self._labels is None:
            k = self.num_blocks
            with torch.inference_mode(False):  # kept: an ordinary tensor whatever the mode of the first call
                self._labels = torch.repeat_interleave(
                    torch.arange(k, device=self.sizes.device), self.sizes, output_size=self._n
                )
        return self._labels

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_labels(cls, labels, num_blocks: int | None = None) -> Partition:
        """Partition from a block id per index (blocks may be scattered).

        Args:
            labels: integers in ``0 .. k-1``, every value used. # shape: (n,)
            num_blocks: ``k``; inferred from ``labels`` when omitted.

        Raises:
            ValueError: empty ``labels``, non-integer dtype, wrong shape, a negative or
                out-of-range label, or a block id in ``0 .. k-1`` that is never used.
        """
        return cls(labels, num_blocks)

    @classmethod
    def from_sizes(cls, sizes, device: torch.device | str | None = None) -> Partition:
        """Partition into contiguous runs: block ``i`` holds the next ``sizes[i]`` indices.

        Args:
            sizes: positive block sizes. # shape: (k,)
            device: where the label vector lives (default: the device of ``sizes``, or CPU).

        Raises:
            ValueError: empty ``sizes``, non-integer dtype, or a size that is zero or negative.
        """
        sizes = _as_long_vector(sizes, "sizes")
        _refuse_meta(sizes, "sizes")
        bad = (sizes <= 0).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"sizes[{i}] = {int(sizes[i])}: every block size must be a positive integer "
                "(drop empty blocks before building the partition)."
            )
        if float(sizes.sum(dtype=torch.float64)) >= 2.0**62 and sum(sizes.tolist()) >= 2**63:
            raise ValueError(
                f"sizes add up to {sum(sizes.tolist())} indices, more than a partition can number (2^63 - 1, int64)."
            )
        if device is not None:
            device = _as_device(device)
        if device is None or device == sizes.device:
            return cls._trusted(sizes, contiguous=True)
        # n and the run table read the sizes: taken here, where they have values (device="meta" has none)
        if device.type == "meta":
            return cls._trusted(sizes, contiguous=True).to(device)
        return cls._trusted(sizes.to(device), contiguous=True, n=int(sizes.sum()), runs=_equal_size_runs(sizes))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._n

    @property
    def n(self) -> int:
        """Number of indices."""
        return self._n

    @property
    def device(self) -> torch.device:
        return self.sizes.device

    @property
    def max_size(self) -> int:
        """Size of the largest block (cached host integer)."""
        if self._max_size is None:
            self._max_size = int(self.sizes.max())
        return self._max_size

    def __repr__(self) -> str:
        layout = "contiguous" if self.is_contiguous else "scattered"
        return f"Partition(n={len(self)}, num_blocks={self.num_blocks}, {layout}, device={self.device})"

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, Partition):
            return NotImplemented
        if len(self) != len(other) or self.num_blocks != other.num_blocks:
            return False
        if self.device.type == "meta" or other.device.type == "meta":  # no values: compare those they came from
            a, b = self._with_values(), other._with_values()
            return a is not None and b is not None and a == b
        if self.is_contiguous and other.is_contiguous:  # the sizes decide; no label vector is needed
            return bool(torch.equal(self.sizes, other.sizes.to(self.device)))
        return bool(torch.equal(self.labels, other.labels.to(self.device)))

    def __hash__(self) -> int:
        """A hash of the content, consistent with ``==`` (equal labels give equal hashes).

        Partitions compare by content (``==`` compares the labels), so the hash depends on content
        too: ``n``, ``k`` and the block sizes, which equal partitions share. It is computed once (one
        host copy of the ``k`` sizes) and cached; a partition is immutable after construction.
        """
        if self._hash is None:
            if self.device.type == "meta":  # equal only to partitions with the values it came from (see __eq__)
                source = self._with_values()
                self._hash = hash((self._n, self.num_blocks)) if source is None else hash(source)
            else:
                self._hash = hash((self._n, self.num_blocks, tuple(self.sizes.tolist())))
        return self._hash

    def _fingerprint(self) -> tuple[int, int] | None:
        """A 128-bit hash of which points share a block, as two signed 64-bit ints, whatever ids the blocks carry: equal
        for equal partitions and for the same blocks under other ids (k-means run again), different otherwise (up to a
        hash collision); ``None`` on the meta device without a known origin. It hashes the labels renumbered in order
        of first appearance (the sizes of a contiguous partition, whose labels are in that order already): one host
        copy of ``n`` int64 values, about 0.1 s per 10^7, once (cached: a partition is immutable)."""
        if self._digest is None:
            source = self._with_values()
            if source is None:
                return None
            if source is not self:
                self._digest = source._fingerprint()
                return self._digest
            runs, values = True, self.sizes
            if not self.is_contiguous:
                labels = self.labels
                n, k = labels.numel(), self.num_blocks
                first = torch.full((k,), n, dtype=torch.long, device=labels.device)
                first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
                order = torch.argsort(first)
                rank = torch.empty_like(first)
                rank[order] = torch.arange(k, device=labels.device)
                values = rank[labels]
                runs = bool((values[1:] >= values[:-1]).all())  # blocks that are runs in another order of ids
                if runs:
                    values = self.sizes[order]
            digest = hashlib.blake2b(digest_size=16)
            digest.update(b"c" if runs else b"s")
            digest.update(self._n.to_bytes(8, "little"))
            digest.update(values.to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes())
            raw = digest.digest()
            self._digest = (
                int.from_bytes(raw[:8], "little", signed=True),
                int.from_bytes(raw[8:], "little", signed=True),
            )
        return self._digest

    def _with_values(self) -> Partition | None:
        """This partition, or on the meta device the partition with values it was made from (None if unknown)."""
        return self._values if self.device.type == "meta" else self

    def same_as(self, other: Partition) -> bool:
        """Cheap check used by operator algebra: identical object, or equal labels."""
        return self is other or (isinstance(other, Partition) and self == other)

    def to(self, *args, **kwargs) -> Partition:
        """Move the label and size vectors to a device (given as ``Tensor.to`` takes it: a device, a string, an
        accelerator index or a tensor on it). A dtype argument is ignored: labels stay ``long``."""
        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, (str, torch.device)) or (isinstance(arg, int) and not isinstance(arg, bool)):
                device = arg  # an int is an accelerator index, as for tensors (device=0 was already one)
            elif isinstance(arg, Tensor):
                device = arg.device
        if device is None or _as_device(device) == self.device:
            return self
        if self.device.type == "meta":  # no values to copy: those of the partition it was made from
            if self._values is None:
                raise ValueError(
                    f"{self!r} holds no values (the meta device) and was not made from a partition that does, so it "
                    f"cannot move to {device}; build the partition there (Partition.from_labels / from_sizes)."
                )
            return self._values.to(device)
        labels = None if self._labels is None else self._labels.to(device)
        res = Partition._trusted(
            self.sizes.to(device),
            labels=labels,
            contiguous=self.is_contiguous,
            runs=self._runs,
            max_size=self._max_size,
            n=self._n,  # sizes.sum() reads values: a partition from sizes had none on the meta device
        )
        if res.device.type == "meta":
            res._values = self
        return res

    def cpu(self) -> Partition:
        return self.to("cpu")

    def cuda(self, device=None) -> Partition:
        return self.to(
            torch.device("cuda")
            if device is None
            else torch.device("cuda", device)
            if isinstance(device, int)
            else device
        )

    def __getstate__(self):
        # a contiguous partition whose labels were never asked for is saved by its sizes: its labels are not built
        # here (n int64 values, kept by the original and written to every copy), but on first use by the copy
        labels = self._labels
        if (
            labels is not None
            and labels.device.type != "meta"
            and labels.untyped_storage().nbytes() != labels.numel() * labels.itemsize
        ):
            # labels kept from a view (a column of a data table, labels[::2]): pickle, torch.save and deepcopy write
            # a tensor's whole storage, so they are saved as a compact copy
            labels = labels.clone(memory_format=torch.contiguous_format)
        return {
            "labels": labels,
            "n": self._n,
            "sizes": self.sizes,
            "num_blocks": self.num_blocks,
            "is_contiguous": self.is_contiguous,
            "_max_size": self._max_size,
            "_runs": self._runs,  # host ints: rebuilding them reads the sizes, which a meta partition has not
            "_values": self._values,  # a meta partition's origin (equality, hashing, moves back)
        }

    def __setstate__(self, state):
        runs = state.get("_runs", ...)  # pickles from before the run table was saved: built again
        labels = state["labels"]  # None for a contiguous partition saved without labels (with "n")
        n = state["n"] if labels is None else labels.numel()
        self._setup(labels, state["sizes"], n, state["is_contiguous"], runs)
        self._max_size = state.get("_max_size")
        self._values = state.get("_values")

    def _run_views(self, x: Tensor, dim: int):
        """For each equal-size run: ``(first index, first block, blocks, size, x's run as a view)``.
        ``dim`` counts from the end; the view has the blocks at ``dim - 1`` and the size at ``dim``."""
        for start, block, count, size in self._runs or ():
            yield start, block, count, size, _split(x.narrow(dim, start, count * size), dim, count, size)

    # ------------------------------------------------------------------ algebra
    def _check_device(self, t: Tensor, method: str, name: str) -> None:
        """Refuse ``t`` on another device than the partition's index tensors, where ``method`` is about to index
        with them (torch's own error names neither the argument nor the fix)."""
        if t.device != self.device:
            raise ValueError(
                f"{method}: {name} is on {t.device} but the partition is on {self.device}; move the partition "
                f"with partition.to({name}.device) (or {name} to the partition's device)."
            )

    def block_sum(self, x: Tensor, dim: int = -1) -> Tensor:
        r"""Sum ``x`` over the indices of each block along ``dim``: :math:`P^\top x`.

        Differentiable. The size of ``x`` along ``dim`` must be ``n``; the result has
        ``k`` there. A boolean ``x`` is counted, and an integer ``x`` summed, in int64 (as ``torch.sum`` gives) in
        every layout.
        """
        dim = _dim_index(dim, x, "block_sum")
        if not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.int64):
            # counts and integer sums in int64, as torch.sum gives them: an index_add of bools is a logical or, and
            # one of int8 .. int32 wraps around in their own dtype (the runs' reshaped sums already promote)
            x = x.long()
        if x.shape[dim] != len(self):
            raise ValueError(
                f"block_sum expected size {len(self)} along dim {dim}, got tensor of shape {tuple(x.shape)}."
            )
        trail = x.shape[dim + 1 :]
        if trail and all(size == 1 for size in trail):  # (*, n, 1): the 1-d kernels are much faster
            res = self.block_sum(_merge_from(x, dim), dim=dim)
            return res.view(*res.shape, *trail)
        if self._runs is not None:  # a few runs of equal-size blocks: reshape and sum, no index vector
            ndim = dim - x.dim()
            sums = [run.sum(ndim) for *_, run in self._run_views(x, ndim)]
            return sums[0] if len(sums) == 1 else torch.cat(sums, dim=ndim)
        self._check_device(x, "block_sum", "x")
        # index_add and segment_reduce add one term at a time in the dtype they are given: float16 stalls at 2048
        # (a block of 2500 ones summed to 2048) and float32's error grows with the block (4e-4 at 2e6 points,
        # where torch.sum's pairwise sums of the runs' path keep 1e-7). Narrower floats are summed in float64 and
        # rounded once.
        wide = _WIDER_SUM.get(x.dtype)
        shape = list(x.shape)
        shape[dim] = self.num_blocks
        # segment sums of contiguous blocks, where they are faster (mean block size; floating point only), and not
        # where derivatives are tracked: segment_reduce's backward has no derivative of its own (a Hessian-vector
        # product, create_graph=True) and it has no forward-mode derivative, where index_add has both
        segments = (
            self.is_contiguous
            and len(self) >= _SEGMENT_MIN_SIZE * self.num_blocks
            and x.dtype.is_floating_point
            and not (x.requires_grad and torch.is_grad_enabled())
            and not carries_tangent(x)
        )
        if wide is not None and x.numel() > _WIDEN_ENTRIES:
            # widened a slab of indices at a time (a whole float64 copy was twice a float32 input's memory)
            rows = max(1, _WIDEN_ENTRIES // max(1, x.numel() // len(self)))
            res = torch.zeros(shape, dtype=wide, device=x.device)
            offsets = self._offsets() if segments and x.device.type != "meta" else None
            for start in range(0, len(self), rows):
                stop = min(start + rows, len(self))
                slab = x.narrow(dim, start, stop - start).to(wide)
                if offsets is None:
                    res.index_add_(dim, self.labels[start:stop], slab)
                    continue
                # contiguous blocks: the segment sums of the blocks the slab overlaps (an index_add of unequal-size
                # contiguous blocks was 10x a segment sum, and the optimizer's flat vectors take this path)
                host, bounds = offsets
                first = int(np.searchsorted(host, start, side="right")) - 1
                last = int(np.searchsorted(host, stop, side="left"))
                lengths = bounds[first : last + 1].clamp(start, stop).diff()
                lengths = lengths.expand(*x.shape[:dim], last - first)
                res.narrow(dim, first, last - first).add_(torch.segment_reduce(slab, "sum", lengths=lengths, axis=dim))
            return res.to(x.dtype)
        src = x if wide is None else x.to(wide)
        if segments:
            # segment_reduce (floating point only) wants one length vector per leading index
            lengths = self.sizes.expand(*x.shape[:dim], self.num_blocks)
            res = torch.segment_reduce(src, "sum", lengths=lengths, axis=dim)
        else:
            res = torch.zeros(shape, dtype=src.dtype, device=x.device).index_add(dim, self.labels, src)
        return res if wide is None else res.to(x.dtype)

    def expand(self, y: Tensor, dim: int = -1) -> Tensor:
        r"""Broadcast one value per block back to every index along ``dim``: :math:`P y`."""
        dim = _dim_index(dim, y, "expand")
        if y.shape[dim] != self.num_blocks:
            raise ValueError(
                f"expand expected size {self.num_blocks} along dim {dim}, got tensor of shape {tuple(y.shape)}."
            )
        self._check_device(y, "expand", "y")
        return y.index_select(dim, self.labels)

    def expand_addcmul(self, shift: Tensor, scale: Tensor, x: Tensor, dim: int = -1) -> Tensor:
        r"""Broadcast two per-block values and combine them with ``x`` in one pass:
        :math:`(P\,\mathrm{shift}) + (P\,\mathrm{scale}) \odot x`.

        Equal to ``expand(shift, dim) + expand(scale, dim) * x`` (up to the rounding of a fused
        multiply-add) without materialising either broadcast: contiguous partitions with a few runs
        of equal-size blocks work on ``(blocks, size)`` views; otherwise, on CPU without autograd,
        the labels are gathered in cache-sized chunks straight into the result. Differentiable.

        Args:
            shift: per-block values with ``k`` along ``dim``. # shape: (*, k, *trail)
            scale: per-block factors with ``k`` along ``dim``. # shape: (*, k, *trail)
            x: the values at the indices, ``n`` along ``dim``. # shape: (*, n, *trail)
            dim: the partitioned dimension, counted on every argument from the end when negative.

        Returns:
            The broadcast shape of the three with ``n`` along ``dim``.
        """
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim {dim} is out of range for x of shape {tuple(x.shape)}.")
        dim = dim - x.dim() if dim >= 0 else dim  # count from the end: shift and scale may lack batch dims
        for name, t, size in (
            ("shift", shift, self.num_blocks),
            ("scale", scale, self.num_blocks),
            ("x", x, len(self)),
        ):
            if t.dim() < -dim or t.shape[dim] != size:
                raise ValueError(
                    f"expand_addcmul expected {name} with size {size} along dim {dim}, got shape {tuple(t.shape)}."
                )
        shape = list(torch.broadcast_shapes(shift.shape, scale.shape, x.shape[:dim] + (1,) + x.shape[dim:][1:]))
        shape[dim] = len(self)
        trail = shape[len(shape) + dim + 1 :]
        if trail and all(size == 1 for size in trail):  # (*, n, 1): the 1-d kernels are much faster
            res = self.expand_addcmul(_merge_from(shift, dim), _merge_from(scale, dim), _merge_from(x, dim), dim=-1)
            return res.view(*res.shape, *trail)
        dtype = torch.promote_types(torch.promote_types(shift.dtype, scale.dtype), x.dtype)
        # the out= and in-place paths below only for plain tensors: not under autograd, and not for a torch.func
        # wrapper (vmap has no batching rule for addcmul's out= form) or a dual tensor (no forward derivative either)
        grad = (torch.is_grad_enabled() and (shift.requires_grad or scale.requires_grad or x.requires_grad)) or any(
            functorch_wrapped(t) or has_forward_tangent(t) for t in (shift, scale, x)
        )
        if self._runs is not None:
            out = None if grad else torch.empty(shape, dtype=dtype, device=x.device)
            pieces = []
            for start, block, count, size, run in self._run_views(x, dim):
                a = shift.narrow(dim, block, count).unsqueeze(dim)  # (*, count, 1, *trail)
                b = scale.narrow(dim, block, count).unsqueeze(dim)
                if out is None:
                    pieces.append(_merge_pair(torch.addcmul(a, b, run), dim - 1))
                else:
                    torch.addcmul(a, b, run, out=_split(out.narrow(dim, start, count * size), dim, count, size))
            if out is not None:
                return out
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        for name, t in (("shift", shift), ("scale", scale)):
            self._check_device(t, "expand_addcmul", name)
        n, labels = len(self), self.labels
        if grad or x.device.type != "cpu" or n <= 2 * _GATHER_CHUNK:
            res = shift.index_select(dim, labels)
            factor = scale.index_select(dim, labels)
            if not grad and list(res.shape) == shape and res.dtype == dtype:
                return res.addcmul_(factor, x)  # the gathered shift is the result's buffer
            return torch.addcmul(res, factor, x)
        # CPU, no autograd: gather chunk by chunk into small reused buffers, write each chunk's result once
        out = torch.empty(shape, dtype=dtype, device=x.device)
        rows = max(1, _GATHER_CHUNK * n // max(1, out.numel()))  # indices per chunk
        bufs = None
        for start in range(0, n, rows):
            m = min(rows, n - start)
            idx = labels.narrow(0, start, m)
            if m == rows:
                if bufs is None:
                    bufs = (shift.index_select(dim, idx), scale.index_select(dim, idx))
                else:
                    torch.index_select(shift, dim, idx, out=bufs[0])
                    torch.index_select(scale, dim, idx, out=bufs[1])
                a, b = bufs
            else:
                a, b = shift.index_select(dim, idx), scale.index_select(dim, idx)
            torch.addcmul(a, b, x.narrow(dim, start, m), out=out.narrow(dim, start, m))
        return out

    def block_average(self, x: Tensor, dim: int = -1) -> Tensor:
        """Average of ``x`` over the indices of each block along ``dim``: :math:`S^{-1} P^\\top x`.

        (Named apart from :func:`bma_gp.block_mean`, the block mean approximation of a matrix.)
        """
        dim = _dim_index(dim, x, "block_average")
        self._check_device(x, "block_average", "x")
        sums = self.block_sum(x, dim)
        shape = [1] * x.dim()
        shape[dim] = self.num_blocks
        return sums / self.sizes.to(sums.dtype).view(shape)

    def block_mean(self, x: Tensor, dim: int = -1) -> Tensor:
        """Deprecated alias of :meth:`block_average` (kept for one release; the name collided with
        :func:`bma_gp.block_mean`)."""
        warnings.warn(
            "Partition.block_mean is deprecated and will be removed in the next release: use "
            "Partition.block_average (bma_gp.block_mean is the block mean approximation of a matrix).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.block_average(x, dim)

    # ------------------------------------------------------------------ layout
    @property
    def row_shape(self) -> tuple[int, int] | None:
        """``(k, s)`` when the blocks are contiguous and all of size ``s``, else ``None``.

        Then the indices are the rows of a ``k x s`` matrix: :meth:`as_rows` views a vector that
        way, a block sum is a row sum and a broadcast is a column scaling.
        """
        if self._runs is not None and len(self._runs) == 1:
            _, _, count, size = self._runs[0]
            return count, size
        return None

    def as_rows(self, x: Tensor) -> Tensor:
        """``x`` (``n`` entries, any shape) as the ``(k, s)`` matrix of its blocks (see :attr:`row_shape`).

        A view when ``x`` is contiguous, a copy otherwise.

        Raises:
            ValueError: the blocks are not contiguous runs of one size, or ``x`` has not ``n`` entries.
        """
        shape = self.row_shape
        if shape is None:
            raise ValueError(f"{self!r} has blocks of several sizes or scattered blocks; it has no row view.")
        if x.numel() != self._n:
            raise ValueError(f"as_rows expected {self._n} entries, got a tensor of shape {tuple(x.shape)}.")
        return x.view(shape) if x.is_contiguous() else x.reshape(shape)

    def split(self, bounds: Sequence[int]) -> list[Partition | None]:
        """The partitions of consecutive index ranges that no block crosses.

        Range ``j`` holds the indices ``bounds[j] .. bounds[j + 1] - 1``; its partition numbers its
        blocks from 0 in the order they have here, so block ``i`` of range ``j`` is block
        ``first + i`` of this partition, ``first`` the number of blocks in the earlier ranges.
        An empty range gives ``None``. Contiguous partitions split without building labels.

        Args:
            bounds: non-decreasing, from 0 to ``n``. # shape: (ranges + 1,)

        Raises:
            ValueError: the bounds do not run from 0 to ``n`` in order, a block has indices in two
                ranges, or the blocks of a range are not the next ones in block order (number the blocks in the
                order of their first index).
        """
        try:
            bounds = [operator.index(b) for b in bounds]
        except TypeError:
            raise TypeError(
                f"split(bounds): bounds must be a sequence of integers from 0 to n = {self._n}, got {bounds!r}."
            ) from None
        if not bounds or bounds[0] != 0 or bounds[-1] != self._n or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"bounds must be non-decreasing from 0 to n = {self._n}, got {bounds[:3]} ... {bounds[-3:]}."
            )
        parts: list[Partition | None] = []
        if self.is_contiguous:
            ends = torch.cumsum(self.sizes, 0).tolist()
            block_of_end = {0: 0, **{end: i + 1 for i, end in enumerate(ends)}}
            for a, b in zip(bounds, bounds[1:]):
                if a not in block_of_end or b not in block_of_end:
                    raise ValueError(f"the range {a} .. {b - 1} cuts a block; split at block boundaries.")
                if a == b:
                    parts.append(None)
                    continue
                first, last = block_of_end[a], block_of_end[b]
                sizes = self.sizes[first:last]
                runs = None
                if self._runs is not None:  # the runs inside the range, shifted to its start
                    runs = _runs_within(self._runs, a, first, last)
                parts.append(Partition._trusted(sizes, contiguous=True, runs=runs if runs is not None else ...))
            return parts
        labels = self.labels
        first = 0
        for a, b in zip(bounds, bounds[1:]):
            if a == b:
                parts.append(None)
                continue
            lo, hi = (int(v) for v in torch.aminmax(labels[a:b]))
            present = torch.bincount(labels[a:b] - lo, minlength=hi + 1 - lo)  # blocks lo .. hi
            crossing = ((present > 0) & present.ne(self.sizes[lo : hi + 1])).nonzero().flatten()
            if crossing.numel():  # a block with indices here and in another range
                raise ValueError(
                    f"block {lo + int(crossing[0])} has indices in the range {a} .. {b - 1} and outside it; split at "
                    "block boundaries."
                )
            if lo != first or int(present.eq(0).sum()):
                ids = (present.nonzero().flatten() + lo).tolist()
                raise ValueError(
                    f"the range {a} .. {b - 1} holds whole blocks ({_short(ids)}), but split numbers the blocks of "
                    "each range after the earlier ranges' (block i of range j is block first + i), so they must be "
                    f"{first} .. {first + len(ids) - 1}. Number the blocks in the order of their first index before "
                    "splitting."
                )
            local = labels[a:b] - first
            sizes = self.sizes[first : hi + 1]
            contiguous = bool(local.numel() <= 1 or (local[1:] >= local[:-1]).all())
            parts.append(Partition._trusted(sizes, labels=local, contiguous=contiguous))
            first = hi + 1
        return parts

    def block_dot(self, x: Tensor, y: Tensor) -> Tensor:
        r"""Blockwise inner products along the last dimension, :math:`P^\top (x \odot y)`, without forming
        :math:`x \odot y` when the blocks are runs of equal size. # shape: (*, k)"""
        for name, t in (("x", x), ("y", y)):
            if not torch.is_tensor(t):
                raise TypeError(f"block_dot takes tensors, got {name} of type {type(t).__name__}.")
        if x.shape[-1] != self._n or y.shape[-1] != self._n:
            raise ValueError(
                f"block_dot expected {self._n} entries along the last dim, got shapes "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        if self.num_blocks == 1 and x.dim() == 1 and y.dim() == 1:
            return torch.dot(x, y).view(1)
        if self._runs is None:
            self._check_device(x, "block_dot", "x")
        if self._runs is not None:
            dots = [
                torch.linalg.vecdot(xr, yr)
                for (*_, xr), (*_, yr) in zip(self._run_views(x, -1), self._run_views(y, -1))
            ]
            return dots[0] if len(dots) == 1 else torch.cat(dots, dim=-1)
        return self.block_sum(x * y)

    def addcmul_(self, out: Tensor, y: Tensor, x: Tensor, value: float = 1.0) -> Tensor:
        r"""In place, ``out += value * (P y) * x`` along the last dimension: one per-block factor
        broadcast to its indices, times ``x``, added into ``out``. Returns ``out``.

        Without autograd. Runs of equal-size blocks scale ``(blocks, size)`` views (no index vector);
        other partitions gather ``y`` by the labels.

        Args:
            out: updated in place. # shape: (*, n)
            y: one factor per block. # shape: (*, k)
            x: the values at the indices. # shape: (*, n)
            value: a scalar factor.
        """
        if out.shape[-1] != self._n or x.shape[-1] != self._n or y.shape[-1] != self.num_blocks:
            raise ValueError(
                f"addcmul_ expected out and x with {self._n} and y with {self.num_blocks} entries "
                f"along the last dim, got {tuple(out.shape)}, {tuple(x.shape)}, {tuple(y.shape)}."
            )
        if self._runs is not None:
            for (_, block, count, _, out_run), (*_, x_run) in zip(self._run_views(out, -1), self._run_views(x, -1)):
                out_run.addcmul_(x_run, y.narrow(-1, block, count).unsqueeze(-1), value=value)
            return out
        self._check_device(y, "addcmul_", "y")
        return out.addcmul_(x, y.index_select(-1, self.labels), value=value)


def _runs_within(runs, start: int, first: int, last: int):
    """The equal-size runs of blocks ``first .. last - 1`` (which begin at index ``start``), renumbered
    from there; ``None`` when a run is cut (the caller then rebuilds the table from the sizes)."""
    inside = []
    for index, block, count, size in runs:
        lo, hi = max(block, first), min(block + count, last)
        if lo < hi:
            inside.append((index + (lo - block) * size - start, lo - first, hi - lo, size))
    return tuple(inside) if inside else None


def intersection(first: Partition, second: Partition) -> tuple[Partition, Tensor]:
    """The partition of the same indices into the occupied pairs of blocks ``(i, i')`` of ``first`` and ``second``,
    and each pair's code ``i * k' + i'`` (sorted: the new blocks are numbered in that order). The one numbering of
    an elementwise product of block mean matrices over two partitions, for the training covariance and the cross
    covariances at new points alike. # codes shape: (number of pairs,)"""
    k2 = second.num_blocks
    codes, labels = torch.unique(first.labels * k2 + second.labels.to(first.device), return_inverse=True)
    return Partition(labels, num_blocks=codes.numel()), codes


# reshapes as view/reshape with explicit sizes: torch's legacy vmap (torch.autograd.functional.jacobian with
# vectorize=True, gradcheck's batched gradients) has no batching rule for unflatten or flatten(start_dim)
def _split(t: Tensor, dim: int, count: int, size: int) -> Tensor:
    """``t.unflatten(dim, (count, size))``."""
    d = dim % t.dim()
    return t.view(*t.shape[:d], count, size, *t.shape[d + 1 :])


def _merge_from(t: Tensor, dim: int) -> Tensor:
    """``t.flatten(dim)``: ``dim`` and every dimension after it as one."""
    d = dim % t.dim()
    return t.reshape(*t.shape[:d], -1)


def _merge_pair(t: Tensor, dim: int) -> Tensor:
    """``t.flatten(dim, dim + 1)``."""
    d = dim % t.dim()
    return t.reshape(*t.shape[:d], t.shape[d] * t.shape[d + 1], *t.shape[d + 2 :])
