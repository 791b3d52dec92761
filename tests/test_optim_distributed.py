"""BlockMeanAdagrad under DistributedDataParallel: 2 CPU ranks (gloo) against one process.

Each rank holds the same model, wrapped in ``DistributedDataParallel``, and trains on
its half of a fixed batch with a *mean* loss; DDP averages the gradients over the
ranks, so every rank steps with the gradient of the mean loss over the full batch.
The optimizer is not distributed itself: it must only be deterministic, so that the
ranks stay bit-for-bit identical, and agree with a single process that sees the
whole batch (to rounding: the two gradients are summed in a different order).
"""

from __future__ import annotations

import pytest
import torch

from gloo_ranks import run_on_ranks
from optim import BlockMeanAdagrad
from optim_reference import fused_at_any_size

WORLD = 2
BATCH = 8  # split evenly over the ranks, so the mean of the rank means is the full-batch mean
STEPS = 6
# (name, optimizer options, DDP gradient_as_bucket_view): the grads are DDP's own copies, or views of its buckets
CASES = [
    ("tensor", dict(partition="tensor"), False),
    ("row-interval3", dict(partition="row", update_interval=3, weight_decay=0.01), True),
    ("tensor-fused", dict(partition="tensor", fused=True), True),  # the torch.compile'd step
]


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
        torch.randn(BATCH, 3, generator=gen, dtype=torch.float64),
    )


def _train(model: torch.nn.Module, options: dict, rank: int | None) -> list[torch.Tensor]:
    """``STEPS`` steps on the batch (``rank``'s half of it, or all of it for ``None``); the final parameters."""
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05, damping=0.1, **options)
    with fused_at_any_size():  # the compiled passes even on this small model
        _steps(model, opt, rank)
    return [p.detach().clone() for p in model.parameters()]


def _steps(model: torch.nn.Module, opt: BlockMeanAdagrad, rank: int | None) -> None:
    for step in range(STEPS):
        x, y = _batch(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _ddp_worker(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel

    assert world == WORLD
    results = {}
    for name, options, as_view in CASES:
        model = DistributedDataParallel(_model(), gradient_as_bucket_view=as_view)
        results[name] = _train(model, options, rank)
    return results


@pytest.mark.slow
def test_ddp_two_ranks_identical_and_equal_single_process():
    ranks = run_on_ranks(_ddp_worker, WORLD)
    start = [p.detach() for p in _model().parameters()]
    for name, options, _ in CASES:
        single = _train(_model(), options, None)
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert torch.equal(a, b), f"{name}: the ranks' parameters differ"
        for got, want, p0 in zip(ranks[0][name], single, start):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            # the runs moved every tensor, far beyond the tolerance
            assert (got - p0).abs().max() > 1e-3, f"{name}: a parameter did not move"
