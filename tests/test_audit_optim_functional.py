"""Audit of block-mean AdaGrad beyond its default use: the public functional API
(:mod:`bma_gp.optim.functional`) as a caller of ``torch.optim``'s functional optimizers would use it,
and the optimizers against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from bma_gp import Partition
from bma_gp.optim import BlockMeanAdagrad, FullMatrixAdagrad
from bma_gp.optim.functional import block_mean_adagrad, preconditioner
from bma_gp.optim.param_blocks import ParamBlocks


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """0-d, 1-d, 4-d (conv) and a transposed (non-contiguous) parameter, float64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (5,), (3, 2, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64).t()))
    return params


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _fresh_stats(k: int) -> dict:
    return {"U": torch.zeros(k, k, dtype=torch.float64), "w": torch.zeros(k, dtype=torch.float64), "step": 0}


@pytest.mark.parametrize(
    "rule", ["tensor", "row", lambda p: torch.arange(p.numel()) % 2], ids=["tensor", "row", "call"]
)
def test_the_functional_step_builds_its_own_workspace_and_root_entries(rule):
    """``block_mean_adagrad(..., workspace=None)`` is allowed by its signature and documented as unused by the
    fused path; the eager paths raised AttributeError. Statistics given as ``U``, ``w`` and ``step`` only (the
    root entries are the cache) raised KeyError. Both now step exactly as the class does."""
    params, reference = _params(), _params()
    opt = BlockMeanAdagrad(reference, lr=0.05, partition=rule)
    blocks = ParamBlocks.build(params, rule)
    h = torch.zeros(blocks.bounds[-1], dtype=torch.float64)
    stats = _fresh_stats(blocks.num_blocks)
    n = len(params)
    for t in range(3):
        grads = _grads(params, t)
        for p, g in zip(reference, grads):
            p.grad = g
        opt.step()
        with torch.no_grad():
            block_mean_adagrad(
                params, grads, h, stats, blocks, None, lr=[0.05] * n, weight_decay=[0.0] * n, maximize=[False] * n,
                eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True, fused=False,
            )  # fmt: skip
    assert torch.equal(_flat(params), _flat(reference))
    assert stats["step"] == 3 and stats["root_step"] == 3


def test_the_functional_step_refuses_statistics_of_another_partition_before_changing_anything():
    params = _params()
    blocks = ParamBlocks.build(params, "tensor")
    h = torch.zeros(blocks.bounds[-1], dtype=torch.float64)
    stats = _fresh_stats(blocks.num_blocks + 1)
    before = _flat(params)
    with pytest.raises(ValueError, match=r"U must be \(4, 4\) and w \(4,\)"):
        block_mean_adagrad(
            params, _grads(params, 0), h, stats, blocks, None, lr=[0.1] * 4, weight_decay=[0.0] * 4,
            maximize=[False] * 4, eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True, fused=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"one gradient \(or None\) per parameter"):
        block_mean_adagrad(
            params, _grads(params, 0)[:3], h, _fresh_stats(4), blocks, None, lr=[0.1] * 4, weight_decay=[0.0] * 4,
            maximize=[False] * 4, eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True, fused=False,
        )  # fmt: skip
    assert torch.equal(_flat(params), before) and not h.any() and stats["step"] == 0


def test_preconditioner_names_statistics_that_do_not_fit_the_partition():
    """The CPU root runs in numpy, whose broadcasting error ("operands could not be broadcast together") said
    nothing about the cause."""
    partition = Partition.from_sizes(torch.tensor([2, 3, 1]))
    stats = {"U": torch.eye(4, dtype=torch.float64), "w": torch.ones(4, dtype=torch.float64), "step": 1}
    with pytest.raises(ValueError, match="partition has k = 3 blocks"):
        preconditioner(stats, partition, damping=0.1, update_interval=1)
    stats = {"U": torch.eye(3, dtype=torch.float64) + 1, "w": torch.full((3,), 2.0, dtype=torch.float64), "step": 1}
    lam, B = preconditioner(stats, partition, damping=0.1, update_interval=1)  # no root entries yet: computed
    assert stats["root_lam"] is lam and stats["root_step"] == 1 and B.shape == (3, 3)


def test_full_matrix_max_dim_message_counts_the_refused_groups_dtype():
    """A float64 group added to a float32 optimizer makes ``H`` float64; the refusal priced it in float32 (half)."""
    opt = FullMatrixAdagrad([torch.nn.Parameter(torch.zeros(5))], max_dim=10)
    with pytest.raises(ValueError, match=r"d = 11 parameters need 968 bytes") as info:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))]})
    assert "max_dim = 10" in str(info.value) and len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "rule", ["tensor", "row", lambda p: torch.arange(p.numel()) % 2], ids=["tensor", "row", "call"]
)
def test_an_eps_below_float32s_smallest_number_is_not_zero(rule):
    """``eps`` must be positive so that entries that never had a gradient (``h = 0``) do not give ``0 / 0``; an eps
    of 1e-50 passed that check but is 0 in float32 arithmetic, so the eager steps put NaN into ``U`` and ``w`` and
    the root's ``eigh`` raised mid-step, the state half-changed. Any tiny eps now steps as 1e-30 does (``sqrt(h)``
    of every ``h > 0`` absorbs it)."""
    runs = []
    for eps in (1e-50, 1e-30):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 6), (6,), ()]]
        opt = BlockMeanAdagrad(params, lr=0.01, eps=eps, partition=rule)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape, generator=gen)
                g.view(-1)[:3] = 0  # entries that never get a gradient: h stays 0 there
                p.grad = g
            opt.step()
        assert torch.isfinite(opt.global_state["U"]).all() and torch.isfinite(opt.global_state["w"]).all()
        runs.append(_flat(params))
    assert torch.equal(runs[0], runs[1])


def test_a_state_of_as_many_blocks_of_other_sizes_is_refused_at_load():
    """Only the number of blocks was checked: a "row" state loaded into a callable partition with as many blocks
    of other sizes loaded, and its ``U`` and ``w`` were read as the statistics of other entries."""

    def uneven(p):  # 4 blocks in all, as under "row", of sizes 4, 1, 1 and 4 instead of 2, 2, 2 and 4
        return torch.tensor([0, 0, 0, 0, 1, 2]) if p.numel() == 6 else torch.zeros(p.numel(), dtype=torch.long)

    def params():
        gen = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(3, 2, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]

    source_params = params()
    source = BlockMeanAdagrad(source_params, partition="row")
    for p in source_params:
        p.grad = torch.ones_like(p)
    source.step()
    state = source.state_dict()
    assert state["block_sizes"] == [2, 2, 2, 4]
    target = BlockMeanAdagrad(params(), partition=uneven)
    with pytest.raises(ValueError, match=r"blocks of sizes \[2, 2, 2, 4\].*sizes \[4, 1, 1, 4\].*another partition"):
        target.load_state_dict(state)
    assert target.global_state == {} and len(target.state) == 0
    same = BlockMeanAdagrad(params(), partition="row")
    same.load_state_dict(state)  # the same partition loads
    assert torch.equal(same.global_state["U"], source.global_state["U"])


def test_state_dict_saves_after_a_group_the_callable_partition_refuses():
    """``state_dict()`` reads the block sizes of the last step's layout: a parameter added since, which the callable
    refuses, is reported by the next step, not by saving."""

    def rule(p):
        return torch.zeros(p.numel(), dtype=torch.long) if p.numel() < 10 else torch.full((p.numel(),), 3)

    params = [torch.nn.Parameter(torch.randn(4))]
    opt = BlockMeanAdagrad(params, partition=rule)
    params[0].grad = torch.ones(4)
    opt.step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(20))]})
    assert opt.state_dict()["block_sizes"] == [4]
    with pytest.raises(ValueError, match="every id used"):
        opt.step()
