"""The numba kernels of the fused step on CPU (bma_gp.optim._jit) against the plain-PyTorch passes of _fused.

The passes are compared directly, on random ``(rows, cols)`` layouts: rows that are one chunk, many
chunks with a ragged end, and single entries; entries with ``h = 0`` (masked), ``eps = 0``, both
dtypes, the serial and the parallel kernels, and parameters that are not contiguous or not in the
statistics' dtype. Optimizer-level runs with numba are in test_optim_fused.py (the ``backend`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from bma_gp.optim import _fused, _jit

if not _jit.AVAILABLE:  # an optional dependency, like CUDA: this module tests only the numba kernels
    pytest.skip("numba is not installed (pip install bma-gp[jit])", allow_module_level=True)

SHAPES = [(1, 5), (3, 7), (2, _jit.CHUNK + 3), (1, 3 * _jit.CHUNK - 1), (40, 600)]


def _case(shape, dtype, seed=0, zero_h=True):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    h = torch.rand(rows, cols, generator=gen, dtype=torch.float64).to(dtype) * 4
    g = torch.randn(rows * cols, generator=gen, dtype=torch.float64).to(dtype)
    p = torch.randn(rows * cols, generator=gen, dtype=torch.float64).to(dtype)
    if zero_h:  # entries that never had a gradient (h = 0 and g = 0): r is 0 there
        idx = torch.randperm(rows * cols, generator=gen)[: max(1, rows * cols // 10)]
        h.view(-1)[idx] = 0
        g[idx] = 0
    coef = torch.randn(rows, 3, generator=gen, dtype=torch.float64).to(dtype)
    return g, h, p, coef


def _tol(dtype, sums=False):
    """Elementwise results agree to a few roundings; sums over up to 50,000 entries are added in another order."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10) if sums else dict(rtol=1e-12, atol=1e-14)
    return dict(rtol=1e-4, atol=1e-3) if sums else dict(rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-10, 0.0])
def test_block_sums_match_the_torch_pass(shape, dtype, eps):
    g, h, _, _ = _case(shape, dtype)
    h_before = h.clone()
    got, finite = _jit.block_sums([g], [h], eps)
    want, want_finite = _fused.block_sums([g], [h], eps)
    assert got.dtype == dtype and got.shape == (shape[0], 3)
    assert torch.isfinite(got).all()  # eps = 0 with h = g = 0: r = 0, not 0 / 0
    torch.testing.assert_close(got, want, **_tol(dtype, sums=True))
    assert bool(finite) and bool(want_finite)
    assert torch.equal(h, h_before)  # pass 1 writes nothing


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-10, 0.0])
def test_apply_update_matches_the_torch_pass(shape, dtype, eps):
    g, h, p, coef = _case(shape, dtype, seed=1)
    h2, p2 = h.clone(), p.clone()
    _jit.apply_update([g], [h], [p], [coef], eps)
    _fused.apply_update([g], [h2], [p2], [coef], eps)
    torch.testing.assert_close(h, h2, rtol=0, atol=0)  # h + g g: one rounding either way
    torch.testing.assert_close(p, p2, **_tol(dtype))
    assert not torch.equal(p, _case(shape, dtype, seed=1)[2])


def test_several_tensors_in_one_call_and_the_serial_and_parallel_kernels_agree(monkeypatch):
    cases = [_case(shape, torch.float64, seed=i) for i, shape in enumerate(SHAPES)]
    gs, hs = [c[0] for c in cases], [c[1] for c in cases]
    got, _ = _jit.block_sums(gs, hs, 1e-10)
    assert got.shape == (sum(s[0] for s in SHAPES), 3)
    torch.testing.assert_close(got, _fused.block_sums(gs, hs, 1e-10)[0], **_tol(torch.float64, sums=True))
    monkeypatch.setattr(_jit, "SERIAL_MAX", 10**9)  # every tensor on the calling thread
    torch.testing.assert_close(_jit.block_sums(gs, hs, 1e-10)[0], got, **_tol(torch.float64, sums=True))
    monkeypatch.setattr(_jit, "SERIAL_MAX", 0)  # every tensor through the parallel kernel
    torch.testing.assert_close(_jit.block_sums(gs, hs, 1e-10)[0], got, **_tol(torch.float64, sums=True))
    ps, coefs = [c[2].clone() for c in cases], [c[3] for c in cases]
    h_par = [h.clone() for h in hs]
    _jit.apply_update(gs, h_par, ps, coefs, 1e-10)
    monkeypatch.setattr(_jit, "SERIAL_MAX", 10**9)
    ps_serial = [c[2].clone() for c in cases]
    h_serial = [h.clone() for h in hs]
    _jit.apply_update(gs, h_serial, ps_serial, coefs, 1e-10)
    for a, b in zip(ps + h_par, ps_serial + h_serial):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_clears_the_flag(bad):
    g, h, _, _ = _case((3, 50), torch.float32)
    g[77] = bad
    _, finite = _jit.block_sums([g], [h], 1e-10)
    assert not bool(finite)


def test_a_finite_gradient_whose_square_overflows_is_finite():
    # g^2 = inf in float32 makes h inf, r 0 and n 0: the gradient is finite, and so are the sums
    g, h, _, _ = _case((2, 40), torch.float32)
    g[3] = 1e20
    sums, finite = _jit.block_sums([g], [h], 1e-10)
    assert bool(finite) and torch.isfinite(sums).all()
    torch.testing.assert_close(sums, _fused.block_sums([g], [h], 1e-10)[0], **_tol(torch.float32, sums=True))


def test_parameters_in_another_layout_or_dtype_are_written_back():
    g, h, p, coef = _case((6, 9), torch.float32, seed=3)
    h_ref, p_ref = h.clone(), p.clone().view(6, 9)
    _fused.apply_update([g], [h_ref], [p_ref], [coef], 1e-10)
    # a transposed (non-contiguous) parameter whose row-major entries are those of p
    strided = p.clone().view(6, 9).t().contiguous().t()
    assert not strided.is_contiguous()
    h1 = h.clone()
    _jit.apply_update([g], [h1], [strided], [coef], 1e-10)
    torch.testing.assert_close(strided, p_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(h1, h_ref, rtol=0, atol=0)
    # a bfloat16 parameter with float32 statistics: updated in float32, rounded once
    low = p.clone().to(torch.bfloat16)
    want = low.float().view(6, 9)
    _fused.apply_update([g], [h.clone()], [want], [coef], 1e-10)
    _jit.apply_update([g], [h.clone()], [low], [coef], 1e-10)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want.view(-1).to(torch.bfloat16).float(), rtol=0, atol=0)


def test_gradients_in_another_dtype_and_requires_grad_parameters():
    g, h, p, coef = _case((4, 30), torch.float64, seed=4)
    param = torch.nn.Parameter(p.clone())
    h1, h2, p2 = h.clone(), h.clone(), p.clone()
    with torch.no_grad():
        _jit.apply_update([g.float()], [h1], [param], [coef], 1e-10)
    _fused.apply_update([g.float()], [h2], [p2], [coef], 1e-10)
    torch.testing.assert_close(param.detach(), p2, rtol=1e-12, atol=1e-14)


def test_the_kernels_use_torchs_thread_count():
    import numba

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g, h, _, _ = _case((2, 3 * _jit.CHUNK), torch.float32)
        _jit.block_sums([g], [h], 1e-10)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    _jit.block_sums([g], [h], 1e-10)
    assert numba.get_num_threads() == min(old, numba.config.NUMBA_NUM_THREADS)


def test_usable_only_for_cpu_float32_and_float64():
    cpu = torch.device("cpu")
    assert _jit.usable(cpu, torch.float32) and _jit.usable("cpu", torch.float64)
    assert not _jit.usable(cpu, torch.float16) and not _jit.usable(cpu, torch.bfloat16)
    assert not _jit.usable(torch.device("cuda", 0), torch.float32)  # a device object, nothing allocated there


def test_a_numba_that_fails_to_import_warns_once_and_the_fused_step_uses_torch_compile(monkeypatch):
    import builtins

    from bma_gp.optim import BlockMeanAdagrad, _fused

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("Numba needs NumPy 2.3 or less")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(_jit, "_IMPORT", [])
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    from bma_gp.optim import block_mean_adagrad

    monkeypatch.setattr(block_mean_adagrad, "FUSED_MIN_NUMEL", 0)  # torch.compile's size threshold applies again
    seen = []
    monkeypatch.setattr(
        _fused, "_inductor", lambda name: lambda *args: seen.append(name) or getattr(_fused, name)(*args)
    )
    model = torch.nn.Linear(3, 2).double()
    opt = BlockMeanAdagrad(model.parameters(), lr=0.1, fused=True)
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.warns(RuntimeWarning, match="numba is installed but could not be imported.*NumPy 2.3"):
        opt.step()
    assert seen == ["block_sums", "apply_update"]  # the torch passes ran (here uncompiled)
    assert not _jit.usable("cpu", torch.float64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        opt.step()
    assert opt.global_state["step"] == 2


def test_the_thread_count_is_set_in_every_calling_thread():
    # numba's thread count is per calling thread: a step from another thread must set it there too
    import threading

    import numba

    g, h, _, _ = _case((2, 3 * _jit.CHUNK), torch.float32)
    seen = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _jit.block_sums([g], [h], 1e-10)  # the main thread is set to 1; a new thread starts at numba's default
        worker = threading.Thread(
            target=lambda: (_jit.block_sums([g], [h], 1e-10), seen.append(numba.get_num_threads()))
        )
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(old)
    assert seen == [1]
