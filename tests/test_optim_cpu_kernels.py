"""torch's fused CPU kernels as parts of block-mean AdaGrad's eager step (:mod:`bma_gp.optim._cpu_kernels`).

The kernels are checked against float64 arithmetic entry by entry, including the entries where the ratio form
needs its guards (subnormal and exactly-zero gradients, large ``h``), and the whole step in the ratio form
against the tensor-by-tensor loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels, _scaling, functional
from test_optim_tensor_blocks import GAPS, assert_same, grads_at, make_model, run_pair

DTYPES = [torch.float32, torch.float64]


def test_available_in_the_pinned_torch():
    # the CPU fused AdaGrad and SGD kernels exist from torch 2.4; CI pins a newer torch (constraints.txt)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert _cpu_kernels.available() == ((major, minor) >= (2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_scale_meets_its_bounds(dtype):
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps  # the smallest subnormal
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(300):
        h_bound = 10.0 ** float(torch.empty(1).uniform_(-30, 30, generator=gen))
        g_max = math.sqrt(h_bound) * float(torch.rand(1, generator=gen))
        eps = (0.0, 1e-10, 1e-3)[int(torch.randint(3, (1,), generator=gen))]
        numel = int(torch.randint(1, 2**24, (1,), generator=gen))
        s = _cpu_kernels.ratio_scale(h_bound, g_max, eps, numel, dtype)
        if not s:
            continue
        checked += 1
        k = math.log2(s)
        assert k == int(k) and int(k) % 2 == 0  # a power of four: sqrt(s) exact
        z_max = math.sqrt(h_bound) + eps
        z_min = max(eps, math.sqrt(smallest))
        assert s * smallest / z_max >= 2 * info.tiny  # (1) n' = s g / z normal for every nonzero g
        assert z_min / s >= 2 * info.tiny  # (2) z / s normal
        assert numel * s * s <= info.max / 2 and s * g_max <= info.max / 4  # (3) no overflow
    assert checked > 100
    for bad in (math.inf, math.nan):
        assert _cpu_kernels.ratio_scale(bad, 1.0, 1e-10, 10, dtype) == 0.0
        assert _cpu_kernels.ratio_scale(1.0, bad, 1e-10, 10, dtype) == 0.0
    # no safe scale: an h so large that (1) and (3) cannot both hold
    assert _cpu_kernels.ratio_scale(info.max / 4, 1.0, 1e-10, 2**20, dtype) == 0.0


def reference_nr(g, h, eps, scale=1.0):
    """h + g^2, s n = s g / z and r = z^{-1/2} in float64 (``g * s`` first: exact, and clear of underflow)."""
    h1 = h.double() + g.double() ** 2
    z = h1.sqrt() + eps
    return h1, g.double() * scale / z, z.rsqrt()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adagrad_ratio_matches_float64(dtype):
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(1)
    m = 4096
    g = (torch.randn(m, generator=gen, dtype=torch.float64) * 1e-3).to(dtype)
    h = (torch.rand(m, generator=gen, dtype=torch.float64) * 1e2).to(dtype)  # z up to 10: |g| / z down to 1e-7
    g[:8] = info.tiny * info.eps * torch.arange(1, 9, dtype=dtype)  # subnormal gradients: the guard's case
    g[8:12] = 0.0  # exactly zero where h > 0: the quotient is 0 / 0
    g[12:16], h[12:16] = 0.0, 0.0  # no gradient at all yet (the step masks r there)
    eps = 1e-10
    h_bound = float((h.double() + g.double() ** 2).max()) * 1.01
    s = _cpu_kernels.ratio_scale(h_bound, float(g.abs().max()), eps, m, dtype)
    assert s > 1.0
    h_ref, n_ref, r_ref = reference_nr(g, h, eps, s)
    n, r = torch.empty_like(g), torch.empty_like(g)
    _cpu_kernels.adagrad_ratio(g, h, n, r, torch.ones((), dtype=dtype), s, eps)
    torch.testing.assert_close(h.double(), h_ref, rtol=info.eps, atol=0.0)
    ulp = 4 * info.eps
    ok = g != 0
    assert torch.all(((n.double() - n_ref)[ok] / n_ref[ok]).abs() <= ulp)
    assert torch.all((r.double() / math.sqrt(s) - r_ref)[ok].abs() <= ulp * r_ref[ok])
    assert torch.isnan(r[8:16]).all() and torch.equal(n[8:16], torch.zeros(8, dtype=dtype))
    _cpu_kernels.rescale_from_h(h, r, s, eps)  # the repair: every entry from h
    assert torch.all((r.double() / math.sqrt(s) - r_ref).abs() <= ulp * r_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "a, b",
    [(0.3, -0.2), (-0.2, 0.3), (1e-3, 1e-3), (2.0, 0.0), (0.0, -1.5), (0.0, 0.0), (1.0, 1e-15), (-1e-15, 1.0)],
)
def test_add_two(dtype, a, b):
    gen = torch.Generator().manual_seed(2)
    p, x, y = (torch.randn(1000, generator=gen, dtype=dtype) for _ in range(3))
    expected = p.double() + a * x.double() + b * y.double()
    scale = p.double().abs() + abs(a) * x.double().abs() + abs(b) * y.double().abs()
    _cpu_kernels.add_two(p, x.clone(), y.clone(), a, b)
    assert torch.all((p.double() - expected).abs() <= 4 * torch.finfo(dtype).eps * scale)


@pytest.fixture(params=[True, False], ids=["sqrt", "rsqrt"])
def both_roots(request, monkeypatch):
    """Both ways to the square roots (``_scaling.fast_sqrt``): ``sqrt(n / g)`` and ``sqrt(h)``, or ``rsqrt(g / n)``
    and ``1 / rsqrt(h)``, whatever this machine is."""
    monkeypatch.setattr(_scaling, "fast_sqrt", lambda: request.param)
    monkeypatch.setattr(_cpu_kernels, "fast_sqrt", lambda: request.param)
    return request.param


@pytest.fixture
def ratio_everywhere(monkeypatch, both_roots):
    """Every tensor takes the ratio form (the test models' tensors are small), by both ways to the roots; returns the
    list of scales used."""
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 0)
    used = []
    scales = functional._ratio_scales
    monkeypatch.setattr(functional, "_ratio_scales", lambda *a: used.append(scales(*a)) or used[-1])
    return used


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_form_matches_the_loop(monkeypatch, ratio_everywhere, dtype):
    fast, loop, calls = run_pair(monkeypatch, dtype, 8, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05))
    assert calls == 8
    assert ratio_everywhere and all(s > 0 for scales in ratio_everywhere for s in scales)
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_form_with_dead_entries_and_missing_gradients(monkeypatch, ratio_everywhere, dtype):
    fast, loop, calls = run_pair(
        monkeypatch, dtype, 9, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05, weight_decay=0.01), **GAPS
    )
    assert calls == 9 and all(s > 0 for scales in ratio_everywhere for s in scales)
    assert_same(fast, loop, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_entries_are_repaired(monkeypatch, ratio_everywhere, dtype):
    """A gradient entry exactly 0 where h > 0 makes the quotient 0 / 0: r is recomputed from h for that tensor,
    which then takes the chain form for RATIO_RETRY_STEPS steps, and the run still equals the loop."""
    monkeypatch.setattr(functional, "RATIO_RETRY_STEPS", 3)
    repairs = []
    rescale = _cpu_kernels.rescale_from_h
    monkeypatch.setattr(_cpu_kernels, "rescale_from_h", lambda *a: repairs.append(1) or rescale(*a))

    def make(model):
        return BlockMeanAdagrad(model.parameters(), lr=0.05)

    calls = []
    fast_step = functional._tensor_blocks_cpu_step
    monkeypatch.setattr(functional, "_tensor_blocks_cpu_step", lambda *a, **k: calls.append(1) or fast_step(*a, **k))
    fast_model, loop_model = make_model(dtype), make_model(dtype)
    fast, loop = make(fast_model), make(loop_model)
    apply = functional._tensor_blocks_apply
    for t in range(8):
        for model in (fast_model, loop_model):
            grads_at(model, t)
            if t == 2:  # one entry of the first weight is exactly 0 once, after two steps of gradient
                next(model.parameters()).grad.view(-1)[5] = 0.0
        fast.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
    assert len(calls) == 8
    assert len(repairs) == 1
    first = [scales[0] for scales in ratio_everywhere]
    assert first[2] > 0 and first[3:6] == [0.0] * 3 and first[6] > 0  # the chain form for 3 steps, then ratio
    assert_same((fast, fast_model), (loop, loop_model), dtype)


def test_bounds_follow_changes_of_h_elsewhere(monkeypatch, ratio_everywhere):
    """The bound of h is rebuilt when h changes outside the ratio form (here: by hand), through h's version."""
    model = make_model(torch.float32)
    opt = BlockMeanAdagrad(model.parameters(), lr=0.05)
    grads_at(model, 0)
    opt.step()
    ws = opt._workspace
    first = next(model.parameters())
    assert ws.h_max[0] >= float(opt.state[first]["sum"].max())
    with torch.no_grad():
        opt.state[first]["sum"].mul_(1e6)
    grads_at(model, 1)
    opt.step()
    assert ws.h_max[0] >= float(opt.state[first]["sum"].max()) > 1e3


def test_without_the_kernels_the_chain_form_runs(monkeypatch, both_roots):
    monkeypatch.setattr(functional, "HOST_MAX_NUMEL", 0)
    monkeypatch.setattr(_cpu_kernels, "available", lambda: False)
    fast, loop, calls = run_pair(monkeypatch, torch.float64, 4, lambda m: BlockMeanAdagrad(m.parameters(), lr=0.05))
    assert calls == 4
    assert not fast[0]._workspace.h_max  # no bounds kept: the ratio form never ran
    assert_same(fast, loop, torch.float64)


def test_a_tensor_without_a_safe_scale_waits_before_the_next_try(monkeypatch, ratio_everywhere):
    """h so large that no scale is safe: the tensor takes the chain form, and the step does not look at all of h
    for a scale again until RATIO_RETRY_STEPS steps have passed; the run still equals the loop."""
    monkeypatch.setattr(functional, "RATIO_RETRY_STEPS", 2)
    fast_model, loop_model = make_model(torch.float32), make_model(torch.float32)
    fast, loop = (BlockMeanAdagrad(m.parameters(), lr=0.05) for m in (fast_model, loop_model))
    apply, real_max = functional._tensor_blocks_apply, torch.Tensor.max
    passes_over_h = []

    def counting_max(self, *args, **kwargs):
        if self.untyped_storage().data_ptr() == fast._flat["sum"].untyped_storage().data_ptr():
            passes_over_h.append(fast.global_state["step"])
        return real_max(self, *args, **kwargs)

    for t in range(7):
        for model, opt in ((fast_model, fast), (loop_model, loop)):
            grads_at(model, t)
            if t == 1:  # after one step: the first weight's h far beyond any safe scale (z near 2^60)
                with torch.no_grad():
                    opt.state[next(model.parameters())]["sum"].fill_(2.0**120)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "max", counting_max)
            fast.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", lambda *a: False)
        loop.step()
        monkeypatch.setattr(functional, "_tensor_blocks_apply", apply)
    first = [scales[0] for scales in ratio_everywhere]
    assert first[0] > 0 and first[1:] == [0.0] * 6
    # steps 1 and 2 (h changed by hand) bound all six tensors afresh; the first weight is tried again after two steps
    # of the chain form (step 5: its kept bound is rebuilt once and still fails), then not before step 8
    assert passes_over_h == [1] * 6 + [2] * 6 + [5]
    for p, q in zip(fast_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adagrad_ratio_both_roots_match_float64(monkeypatch, dtype):
    """``r' = sqrt(s) z^{-1/2}`` by ``sqrt(n' / g)`` and by ``rsqrt(g / n')``, each within a few ulp of float64."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(5000, generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.rand(5000, generator=gen, dtype=torch.float64).to(dtype)
    scale, eps = 2.0**40, 1e-10
    h64 = h0.double() + g.double().square()
    want = math.sqrt(scale) * (h64.sqrt() + eps).rsqrt()
    for fast in (True, False):
        monkeypatch.setattr(_cpu_kernels, "fast_sqrt", lambda fast=fast: fast)
        h, n, r = h0.clone(), torch.empty_like(g), torch.empty_like(g)
        _cpu_kernels.adagrad_ratio(g, h, n, r, torch.ones((), dtype=dtype), scale, eps)
        assert ((r.double() - want).abs() / want).max() <= 6 * torch.finfo(dtype).eps


@pytest.mark.parametrize(
    "mkl, env, vendor, expected",
    [
        (False, {}, "AuthenticAMD", True),
        (True, {}, "GenuineIntel", True),
        (True, {}, "AuthenticAMD", False),
        (True, {}, "", False),
        (True, {"MKL_CBWR": "COMPATIBLE"}, "GenuineIntel", False),
        (True, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, "GenuineIntel", False),
    ],
)
def test_fast_sqrt_follows_mkl_and_the_vendor(monkeypatch, mkl, env, vendor, expected):
    for name in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    monkeypatch.setattr(_scaling, "_cpu_vendor", lambda: vendor)
    _scaling.fast_sqrt.cache_clear()
    try:
        assert _scaling.fast_sqrt() is expected
    finally:
        _scaling.fast_sqrt.cache_clear()


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = _scaling._cpu_vendor()
    assert isinstance(vendor, str) and " " not in vendor and ":" not in vendor
