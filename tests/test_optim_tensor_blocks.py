"""The CPU eager step for one block per tensor (``partition="tensor"``) against the tensor-by-tensor loop.

:func:`bma_gp.optim.functional._tensor_blocks_cpu_step` computes the same step with fewer calls and
``z = 1 / rsqrt(h) + eps``; each case here runs both paths side by side and checks that the fast one
ran, that it agrees with the loop, and that the run moved.
"""

from __future__ import annotations

import math

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, _scaling, functional
from bma_gp.optim._scaling import sqrt_plus_eps_cpu


def make_model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5), torch.nn.Linear(5, 2)
    ).to(dtype)


def grads_at(model: torch.nn.Module, step: int, *, drop=None, dead: bool = False) -> None:
    """Gradients of a fixed loss at ``step``; ``drop``: the parameter index left without a gradient;
    ``dead``: every third entry of each gradient is always exactly 0 (h stays 0 there)."""
    gen = torch.Generator().manual_seed(100 + step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(4, 2, 6, 6, generator=gen, dtype=dtype)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    for i, p in enumerate(model.parameters()):
        if drop is not None and i == drop:
            p.grad = None
        elif dead:
            p.grad.view(-1)[::3] = 0.0


#: the gradients of the harder runs: parameter 1, then 3, then none lack a gradient; a third of every gradient is
#: always exactly 0 (those entries keep h = 0)
GAPS = dict(drop=lambda t: (1, 3, None)[t % 3], dead=True)


def run_pair(monkeypatch, dtype, steps, make_opt, **grad_options):
    """The same run on the fast path and on the loop; returns both optimizers and models, and the fast path's
    number of calls."""
    calls = []
    fast_step = functional._tensor_blocks_cpu_step
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: calls.append(1) or fast_step(*a, **k))
    fast_model, loop_model = make_model(dtype), make_model(dtype)
    fast, loop = make_opt(fast_model), make_opt(loop_model)
    apply = functional._tensor_blocks_apply
    for t in range(steps):
        drop = grad_options.get("drop")
        options = dict(grad_options, drop=drop(t) if callable(drop) else drop)
        grads_at(fast_model, t, **options)
        grads_at(loop_model, t, **options)
        fast.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
    return (fast, fast_model), (loop, loop_model), len(calls)


def assert_same(fast, loop, dtype):
    (opt_a, model_a), (opt_b, model_b) = fast, loop
    tol = dict(rtol=1e-11, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, **tol)
        torch.testing.assert_close(opt_a.state[p]["sum"], opt_b.state[q]["sum"], **tol)
    for key in ("U", "w", "root_lam", "root_B"):
        a, b = opt_a.global_state[key], opt_b.global_state[key]
        scaled = dict(tol)
        if dtype == torch.float32:
            # U = sum (P^T n)(P^T n)^T: an off-diagonal entry is a product of block sums that cancel, so its float32
            # rounding is on the scale of the largest entries, not its own (two orders of summation here differ by
            # up to 9e-5 of a small entry, 5e-6 of the largest)
            scaled["atol"] = max(tol["atol"], tol["rtol"] * float(b.abs().max()))
        torch.testing.assert_close(a, b, **scaled)
    start = make_model(dtype)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(model_a.parameters(), start.parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_loop(monkeypatch, dtype):
    fast, loop, calls = run_pair(monkeypatch, dtype, 8, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05))
    assert calls == 8
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensors_without_gradient_and_dead_entries(monkeypatch, dtype):
    fast, loop, calls = run_pair(
        monkeypatch, dtype, 9, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05, update_interval=2), **GAPS
    )
    assert calls == 9
    assert_same(fast, loop, dtype)
    opt, model = fast
    for p in model.parameters():
        h = opt.state[p]["sum"].view(-1)
        assert torch.all(h[::3] == 0)  # the dead entries never had a gradient: h = 0, and they did not move


def test_groups_with_their_own_rates_and_weight_decay(monkeypatch):
    def make(model):
        params = list(model.parameters())
        groups = [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.01, "weight_decay": 0.1}]
        return BlockMeanAdagrad(groups, damping=0.05)

    fast, loop, calls = run_pair(monkeypatch, torch.float64, 6, make)
    assert calls == 6
    assert_same(fast, loop, torch.float64)


@pytest.mark.parametrize(
    "case",
    ["maximize", "row", "non_contiguous_grad", "lower_precision_param"],
)
def test_other_cases_take_the_loop(monkeypatch, case):
    calls = []
    fast_step = functional._tensor_blocks_cpu_step
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: calls.append(1) or fast_step(*a, **k))
    model = make_model(torch.float64 if case == "lower_precision_param" else torch.float32)
    params = list(model.parameters())
    if case == "lower_precision_param":
        params[-1].data = params[-1].data.float()  # float32 beside float64: the state is float64
    opt = BlockMeanAdagrad(params, lr=0.05, maximize=case == "maximize", partition="row" if case == "row" else "tensor")
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    if case == "non_contiguous_grad":
        weight = params[2]
        weight.grad = weight.grad.t().contiguous().t()
        assert not weight.grad.is_contiguous()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert calls == []
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("fast", [True, False], ids=["sqrt", "rsqrt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrt_plus_eps_cpu(monkeypatch, dtype, fast):
    monkeypatch.setattr(_scaling, "fast_sqrt", lambda: fast)
    tiny = torch.finfo(dtype).tiny
    h = torch.cat(
        [
            torch.rand(10_000, dtype=dtype) * 10.0 ** torch.randint(-30, 30, (10_000,), dtype=dtype),
            torch.tensor([0.0, tiny, tiny / 4, 1.0, 4.0, math.inf, torch.finfo(dtype).max], dtype=dtype),
        ]
    )
    for eps in (1e-10, 0.0, 1e-3):
        got = sqrt_plus_eps_cpu(h, eps, out=torch.empty_like(h))
        want = h.sqrt() + eps
        assert got[h == 0].eq(eps).all() and torch.isinf(got[torch.isinf(h)]).all()
        finite = torch.isfinite(want) & (h > 0)
        ulp = torch.finfo(dtype).eps
        assert ((got[finite] - want[finite]).abs() / want[finite]).max() <= 2 * ulp
    assert torch.isnan(sqrt_plus_eps_cpu(torch.tensor([math.nan], dtype=dtype), 1e-10, out=torch.empty(1, dtype=dtype)))
