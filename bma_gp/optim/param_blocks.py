"""A partition of all parameter entries of an optimizer into blocks.

Block-mean AdaGrad approximates the correlation of normalised gradients by a block
mean matrix over a partition of the ``d`` parameter entries. This module turns a
rule (``"tensor"``, ``"row"`` or a callable) into one :class:`bma_gp.Partition`
over the flat layout of :class:`optim.flat_params.FlatParams`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bma_gp import Partition

__all__ = ["check_partition_rule", "param_partition"]

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
            ids = torch.as_tensor(ids)
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


class ParamBlocks:
    """The blocks of the contiguous rules as the rows of per-parameter matrices.

    For the contiguous rules ("tensor", "row") every parameter's entries are viewed
    as a ``(rows, cols)`` matrix whose rows are its blocks (one row for "tensor"), so
    a block sum is a row sum and a broadcast is a column scaling: one loop over the
    tensors (as ``torch.optim.Adagrad`` does), no index vectors. A callable rule gives
    scattered blocks (:attr:`rows` is ``None``); they use
    :meth:`bma_gp.Partition.block_sum` / :meth:`~bma_gp.Partition.expand`.

    Args:
        params: the parameters in flat order.
        rule: the partition rule (see :func:`param_partition`).

    Attributes:
        partition: the :class:`bma_gp.Partition` of the ``d`` entries.
        rows: per parameter, its number of blocks (``None`` for a callable rule).
        block_offsets: per parameter, the index of its first block (length ``len(params) + 1``;
            contiguous rules only).
    """

    def __init__(self, params: list[Tensor], rule: PartitionRule):
        self.partition = param_partition(params, rule)
        self.numels = [p.numel() for p in params]
        self.rows: list[int] | None = None
        self.block_offsets: list[int] | None = None
        if isinstance(rule, str):
            self.rows = [(p.shape[0] if rule == "row" and p.dim() >= 2 else 1) for p in params]
            offsets = [0]
            for m, r in zip(self.numels, self.rows):
                offsets.append(offsets[-1] + (r if m else 0))
            self.block_offsets = offsets

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks
