"""The blocks of an optimizer's parameter entries: a partition rule made into a typed layout.

Block-mean AdaGrad approximates the correlation of normalised gradients by a block
mean matrix over a partition of the ``d`` parameter entries. This module turns a
rule (``"tensor"``, ``"row"`` or a callable) into one :class:`bma_gp.Partition`
over the flat layout of :class:`~bma_gp.optim.flat_params.FlatParams`, and that
partition into :class:`ParamBlocks`: the same blocks seen tensor by tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from bma_gp import Partition

__all__ = ["ParamBlocks", "check_partition_rule", "param_partition"]

PartitionRule = str | Callable[[Tensor], Tensor]


def check_partition_rule(rule) -> None:
    """Raise unless ``rule`` is ``"tensor"``, ``"row"`` or a callable."""
    if isinstance(rule, str):
        if rule not in ("tensor", "row"):
            raise ValueError(
                f"Invalid partition value: {rule!r}; use 'tensor', 'row' or a callable "
                "f(param) -> LongTensor of block ids."
            )
    elif not callable(rule):
        raise TypeError(
            f"Invalid partition value: {rule!r} (type {type(rule).__name__}); use 'tensor', 'row' "
            "or a callable f(param) -> LongTensor of block ids."
        )


def _callable_ids(p: Tensor, rule: Callable[[Tensor], Tensor]) -> tuple[Tensor, int]:
    """Validated block ids (flat, long, on ``p.device``) of one parameter and their count."""
    ids = rule(p)
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids, device=p.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"the partition callable must return a LongTensor of block ids, got {type(ids).__name__}."
            ) from None
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(f"the partition callable returned dtype {ids.dtype}; return integer block ids (a LongTensor).")
    if ids.numel() != p.numel():
        raise ValueError(
            f"the partition callable returned {ids.numel()} block ids for a parameter of shape {tuple(p.shape)}; "
            f"it must return one id per entry ({p.numel()})."
        )
    ids = ids.reshape(-1).long().to(p.device)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or bool((torch.bincount(ids.clamp(min=0), minlength=hi + 1) == 0).any()):
        raise ValueError(
            f"the partition callable must return block ids 0 .. k-1 with every id used, got ids in {lo} .. {hi} "
            f"for a parameter of shape {tuple(p.shape)}; relabel with torch.unique(ids, return_inverse=True)[1]."
        )
    return ids, hi + 1


def _fixed_sizes(params: list[Tensor], rule: str) -> list[int]:
    """Block sizes of the contiguous rules "tensor" and "row" (row-major flattening)."""
    sizes: list[int] = []
    for p in params:
        if p.numel() == 0:
            continue
        if rule == "row" and p.dim() >= 2:
            sizes.extend([p.numel() // p.shape[0]] * p.shape[0])
        else:
            sizes.append(p.numel())
    return sizes


def param_partition(params: list[Tensor], rule: PartitionRule) -> Partition:
    """One partition of the concatenated entries of ``params`` (flattened, in order).

    Args:
        params: the parameters, in the optimizer's flat order.
        rule: ``"tensor"`` (one block per parameter tensor), ``"row"`` (one block per
            slice along dim 0 of a tensor with two or more dims; other tensors are one
            block) or a callable ``f(param) -> LongTensor`` giving each of the
            ``param.numel()`` entries (row-major) a block id in ``0 .. k_p - 1``.
            Block ids of later parameters are offset by the blocks of earlier ones.

    Returns:
        A :class:`bma_gp.Partition` with ``len == sum(p.numel())`` on the device of
        the parameters (contiguous for "tensor" and "row").

    Raises:
        ValueError: the parameters hold no entries, or the callable returns ids of
            the wrong count, dtype or range (every id ``0 .. k_p - 1`` must be used).
    """
    check_partition_rule(rule)
    if sum(p.numel() for p in params) == 0:
        raise ValueError("the optimizer's parameters hold no entries; give it at least one non-empty tensor.")
    device = params[0].device
    if isinstance(rule, str):
        return Partition.from_sizes(torch.tensor(_fixed_sizes(params, rule), dtype=torch.long, device=device))
    parts: list[Tensor] = []
    offset = 0
    for p in params:
        if p.numel() == 0:
            continue
        ids, k = _callable_ids(p, rule)
        parts.append(ids + offset)
        offset += k
    return Partition.from_labels(torch.cat(parts), offset)


@dataclass(frozen=True, eq=False)
class ParamBlocks:
    """The partition of the ``d`` parameter entries and, per parameter tensor, its own blocks.

    No block spans two tensors under any rule, so :meth:`bma_gp.Partition.split` at the
    tensors' bounds gives each tensor's partition: the one source of the layout is
    :attr:`partition`, everything else is derived from it. For ``"tensor"`` and ``"row"``
    every tensor's blocks are the rows of its ``(rows, cols)`` matrix
    (:attr:`bma_gp.Partition.row_shape`), so block sums and broadcasts are row operations
    on views (:attr:`by_rows`).

    Attributes:
        partition: the blocks of all ``d`` entries, in the optimizer's flat order.
        bounds: parameter ``i`` holds the flat entries ``bounds[i] .. bounds[i + 1] - 1``.
        segments: per parameter, the partition of its own entries (``None`` for an empty tensor);
            block ``j`` of parameter ``i`` is block ``first_block[i] + j`` of :attr:`partition`.
        first_block: parameter ``i`` holds blocks ``first_block[i] .. first_block[i + 1] - 1``.
    """

    partition: Partition
    bounds: tuple[int, ...]
    segments: tuple[Partition | None, ...]
    first_block: tuple[int, ...]

    @classmethod
    def build(cls, params: list[Tensor], rule: PartitionRule) -> ParamBlocks:
        """The blocks of ``params`` (in flat order) under ``rule`` (see :func:`param_partition`).

        Raises:
            ValueError: as :func:`param_partition`.
        """
        partition = param_partition(params, rule)
        bounds = [0]
        for p in params:
            bounds.append(bounds[-1] + p.numel())
        segments = tuple(partition.split(bounds))
        first = [0]
        for seg in segments:
            first.append(first[-1] + (seg.num_blocks if seg is not None else 0))
        return cls(partition, tuple(bounds), segments, tuple(first))

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    @cached_property
    def by_rows(self) -> bool:
        """Whether every non-empty tensor's blocks are the rows of its ``(rows, cols)`` matrix (computed once)."""
        return all(seg is None or seg.row_shape is not None for seg in self.segments)

    @cached_property
    def _fingerprints(self) -> dict[int, str | None]:
        return {}

    def label_fingerprint(self, num_blocks: int) -> str | None:
        """A hash (32 hex digits) of which entries blocks ``0 .. num_blocks - 1`` hold, or ``None`` when they are not
        all the blocks of some first tensors.

        The hash reads those tensors' partitions (:attr:`segments`) in order: the block sizes of a contiguous one
        (which fix its labels), the labels of a scattered one. It is the same for two partitions of the same tensors
        exactly when these blocks hold the same entries, whatever rule built them (up to a hash collision). Computed
        once per ``num_blocks`` (one host copy of the labels of scattered tensors) and kept: never at a step.
        """
        if num_blocks not in self._fingerprints:
            fingerprint = None
            if num_blocks in self.first_block:
                digest = hashlib.blake2b(digest_size=16)
                for seg, end in zip(self.segments, self.first_block[1:]):
                    if end > num_blocks:
                        break
                    if seg is None:  # an empty tensor holds no entries
                        continue
                    values = seg.sizes if seg.is_contiguous else seg.labels
                    digest.update(b"c" if seg.is_contiguous else b"s")
                    digest.update(values.numel().to_bytes(8, "little"))
                    digest.update(values.to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes())
                fingerprint = digest.hexdigest()
            self._fingerprints[num_blocks] = fingerprint
        return self._fingerprints[num_blocks]
