"""Run a worker on several CPU processes joined by a gloo process group, and collect what each rank saved."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import pytest
import torch


def run_on_ranks(worker: Callable[..., object], world: int = 2) -> list[object]:
    """Spawn ``world`` processes running ``worker(rank, world, init_file)`` and return their results.

    The worker must be a module-level function (it is pickled into the children). It joins the
    group with :func:`init_gloo` and returns something ``torch.save`` can write; the results come
    back in rank order. Skips the calling test where ``torch.distributed`` is missing.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run_and_save, args=(world, worker, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _run_and_save(rank: int, world: int, worker: Callable[..., object], tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world)
    try:
        result = worker(rank, world)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        del result
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with torch 2.13 a gloo rank that ran
    # DistributedDataParallel aborts there about one time in four ("terminate called without
    # an active exception", SIGABRT after destroy_process_group has returned), with
    # torch.optim.Adagrad as much as with BlockMeanAdagrad. The result is already on disk;
    # a worker that raised still exits through the normal path, so spawn reports its traceback.
    os._exit(0)
