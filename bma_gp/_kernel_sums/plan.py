"""What both kernel-sum engines share: the layout sorted by block, the rank's share, communication."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["KernelSumsPlan", "all_reduce", "chunk_ranges", "progress"]

T = TypeVar("T")


@dataclass(frozen=True)
class KernelSumsPlan:
    """The inputs of one block-sum computation, with the rows ordered by block.

    Attributes:
        x: inputs, rows sorted by block so that every block is a contiguous run. # shape: (*batch, n, d)
        sizes: block sizes. # shape: (k,)
        labels: sorted block labels, one per row of ``x``. # shape: (n,)
        rows: ``(start, stop)``, the rows this rank evaluates (generic engine).
        chunk: rows per chunk (generic engine) or per tile (stationary engine); ``None``: default.
        group: a ``torch.distributed`` process group, or ``None`` for a single process.
        show_progress: whether to show a tqdm progress bar.
    """

    x: Tensor
    sizes: Tensor
    labels: Tensor
    rows: tuple[int, int]
    chunk: int | None
    group: Any
    show_progress: bool

    @property
    def num_blocks(self) -> int:
        return self.sizes.numel()

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of ranks (``(0, 1)`` without a process group)."""
        if self.group is None:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self.group), dist.get_world_size(self.group)


def chunk_ranges(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, start + chunk), ...]`` covering ``start:stop``, the last one shorter."""
    return [(a, min(stop, a + chunk)) for a in range(start, stop, chunk)]


def progress(items: Sequence[T], show: bool, desc: str) -> Iterable[T]:
    """``items``, wrapped in a tqdm progress bar when ``show``."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tile", leave=False)


def all_reduce(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Sum a list of tensors over the ranks of ``group`` with one collective call."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
