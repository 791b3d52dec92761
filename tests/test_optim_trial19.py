"""Fixes from user trial 19: gradients whose squares underflow, tiny statistics ``w`` in the root, and gradients
with torch's negative bit.

1. An entry whose ``g^2`` underflows to 0 in the state's dtype keeps ``h = 0``: it counts as one without gradient
   (``r = 0`` and ``n = r^2 g = 0``) in every eager form, as in the fused passes. The eager step used ``n = g / eps``
   there, in ``U``, ``w`` and the update.
2. A block whose ``w`` is tiny (subnormal) but positive: ``F`` is scale-free per block, so its root is finite; the
   root's forms overflowed ``1 / d`` (a silent NaN, or a raw ``LinAlgError`` after the state changed).
3. A contiguous real gradient with the negative bit set (``x.conj().imag``) is accepted, as by
   ``torch.optim.Adagrad``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bma_gp import Partition
from bma_gp.optim import _cpu_kernels, _fused, _jit, functional
from bma_gp.optim._scaling import z_inv_sqrt
from bma_gp.optim.functional import (
    _inverse_root_numpy,
    _inverse_root_python,
    _normalised_inverse_root_torch,
    _root_constants,
    block_mean_adagrad,
    inverse_root,
    normalised_correlation,
)
from bma_gp.optim.param_blocks import ParamBlocks
from optim import BlockMeanAdagrad, FullMatrixAdagrad
from optim_reference import dense_block_mean, dense_inv_sqrt, fused_at_any_size

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.float64]
#: a gradient scale whose squares underflow to 0 in the dtype (|g| up to about 5 times it)
UNDERFLOW = {torch.float32: 1e-25, torch.float64: 1e-170}
needs_numba = pytest.mark.skipif(not _jit.AVAILABLE, reason="numba is not installed (pip install bma-gp[jit])")


def _state(opt, params):
    gs = opt.global_state
    return (
        [p.detach().clone() for p in params],
        [opt.state[p]["sum"].clone() for p in params],
        gs["U"].clone(),
        gs["w"].clone(),
        gs["step"],
    )


def _run(shapes, dtype, dead, dead_grad, *, steps=3, seed=0, **kw):
    """Steps from one seed; tensor ``dead`` gets ``dead_grad(shape, generator)`` as its gradient."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, dtype=dtype, generator=gen)) for s in shapes]
    kw.setdefault("lr", 0.1)
    opt = BlockMeanAdagrad(params, **kw)
    for _ in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, dtype=dtype, generator=gen)
            p.grad = dead_grad(g) if i == dead else g
        opt.step()
    return opt, params


# ------------------------------------------------------------------------- 1. underflowing gradient squares

#: (shapes, the tensor whose gradient underflows, partition, options): the host form (small tensors), the ratio
#: form (a tensor above HOST_MAX_NUMEL), the by-rows loop ("row") and the scattered path (a callable partition)
FORMS = {
    "host": ([(40,), (30,), (5, 4), (7,)], 0, "tensor"),
    "ratio": ([(40000,), (40000,), (60,)], 0, "tensor"),
    "row": ([(4, 8), (3, 8), (5,)], 0, "row"),
    "scattered": ([(4, 8), (3, 8), (5,)], 0, lambda p: torch.arange(p.numel()).view(p.shape) % 2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["host", "ratio", "chain", "row", "scattered"])
@pytest.mark.parametrize("eps", [1e-10, 1e-30])
def test_a_gradient_whose_squares_underflow_counts_as_no_gradient(monkeypatch, dtype, form, eps):
    # the dead tensor's step must be the step with an exactly-zero gradient there: h = 0, n = r = 0, it does not move,
    # and the other tensors see a block without statistics (before: n = g / eps entered U, w and the update)
    if form == "chain":  # the ratio form's kernels unavailable: the chain form for the large tensors
        monkeypatch.setattr(_cpu_kernels, "available", lambda: False)
    shapes, dead, rule = FORMS["ratio" if form == "chain" else form]
    tiny = UNDERFLOW[dtype]
    opt_t, ps_t = _run(shapes, dtype, dead, lambda g: g * tiny, partition=rule, eps=eps)
    opt_z, ps_z = _run(shapes, dtype, dead, torch.zeros_like, partition=rule, eps=eps)
    assert bool((opt_t.state[ps_t[dead]]["sum"] == 0).all())  # g^2 underflowed: h = 0
    assert bool((opt_t.global_state["w"] == opt_z.global_state["w"]).all()), opt_t.global_state["w"]
    assert torch.equal(opt_t.global_state["U"], opt_z.global_state["U"])
    for p_t, p_z in zip(ps_t, ps_z):
        assert torch.equal(p_t, p_z), (p_t - p_z).abs().max()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ps_t[dead], torch.randn(*shapes[dead], dtype=dtype, generator=gen))  # not moved


@pytest.mark.parametrize("dtype", DTYPES)
def test_underflowing_entries_beside_healthy_ones_in_one_tensor(dtype):
    # half of a tensor's entries underflow: those have n = r = 0 (before: n = g / eps in the block sums and the step)
    def half_dead(g):
        g = g.clone()
        g.view(-1)[::2] *= UNDERFLOW[dtype]
        return g

    def half_zero(g):
        g = g.clone()
        g.view(-1)[::2] = 0
        return g

    for shapes, rule in (FORMS["host"][0], "tensor"), (FORMS["ratio"][0], "tensor"), (FORMS["row"][0], "row"):
        opt_t, ps_t = _run(shapes, dtype, 0, half_dead, partition=rule, eps=1e-30)
        opt_z, ps_z = _run(shapes, dtype, 0, half_zero, partition=rule, eps=1e-30)
        assert torch.equal(opt_t.global_state["w"], opt_z.global_state["w"])
        for p_t, p_z in zip(ps_t, ps_z):
            assert torch.equal(p_t, p_z), (shapes, (p_t - p_z).abs().max())


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-10, 1e-30])
def test_eager_and_fused_agree_where_gradient_squares_underflow(monkeypatch, dtype, eps):
    # the user trial's case: the eager step differed from fused=True by 0.19 on the healthy layers at step 1
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for shapes, rule in (FORMS["row"][0], "row"), (FORMS["host"][0], "tensor"):
        tiny = lambda g: g * UNDERFLOW[dtype]  # noqa: E731
        eager, ps_e = _run(shapes, dtype, 0, tiny, partition=rule, eps=eps)
        with fused_at_any_size():
            fused, ps_f = _run(shapes, dtype, 0, tiny, partition=rule, eps=eps, fused=True)
        assert torch.equal(eager.global_state["w"] == 0, fused.global_state["w"] == 0)
        torch.testing.assert_close(eager.global_state["w"], fused.global_state["w"], **tol)
        for p_e, p_f in zip(ps_e, ps_f):
            torch.testing.assert_close(p_e, p_f, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_masked_formula_of_z_inv_sqrt_masks_n_too(dtype):
    # the accelerator form (mask by formula, no list of entries): n = g / z is 0 where h = 0, as r
    g = torch.tensor([1.0, UNDERFLOW[dtype], -UNDERFLOW[dtype], 0.0, 2.0], dtype=dtype)
    h = g * g
    assert h[1] == 0 and h[2] == 0
    r, n, scratch = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
    z_inv_sqrt(h, 1e-30, mask=True, out=r, scratch=scratch, divide=(g, n))
    assert torch.equal(r[1:4], torch.zeros(3, dtype=dtype))
    assert torch.equal(n[1:4], torch.zeros(3, dtype=dtype)), n
    z = h.sqrt() + 1e-30
    torch.testing.assert_close(n[[0, 4]], (g / z)[[0, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_passes_uncompiled_treat_underflow_as_no_gradient(dtype):
    # _fused's plain-PyTorch passes (the fallback without a compiler): n = r^2 g = 0 where h stays 0
    g = torch.randn(3, 6, dtype=dtype) * UNDERFLOW[dtype]
    h = torch.zeros(3, 6, dtype=dtype)
    sums, finite = _fused.block_sums([g], [h], 1e-30)
    assert bool(finite) and torch.equal(sums, torch.zeros(3, 3, dtype=dtype))


# ------------------------------------------------------------------------- 2. tiny statistics w in the root


def _dense_root(ns: list[torch.Tensor], labels: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + damping I)^{-1/2} of the normalised gradients ``ns`` (float64, one per step), F formed densely."""
    N = sum(torch.outer(n, n) for n in ns)
    M = dense_block_mean(N, labels)
    k = int(labels.max()) + 1
    mean_diag = torch.stack([N.diagonal()[labels == i].mean() for i in range(k)])[labels]
    scale = mean_diag.rsqrt()
    F = M * scale.unsqueeze(1) * scale.unsqueeze(0)
    return dense_inv_sqrt(F + damping * torch.eye(F.shape[0], dtype=F.dtype))


def _expand(lam, B, labels) -> torch.Tensor:
    lam, B = torch.as_tensor(np.asarray(lam), dtype=torch.float64), torch.as_tensor(np.asarray(B), dtype=torch.float64)
    return torch.diag(lam[labels]) + B[labels][:, labels]


def _tiny_statistics(dtype, damping=0.1):
    """Block sums ``U``, ``w`` (float64 tensors holding values of ``dtype``) of normalised gradients whose blocks 0
    and 2 are scaled by a power of two to a subnormal (float64) or nearly subnormal (float32) ``w``; the partition,
    and the dense root of the unscaled gradients (F is scale-free per block: the same)."""
    sizes = [5, 7, 1, 4, 6]
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    gen = torch.Generator().manual_seed(3)
    ns = [torch.rand(labels.numel(), dtype=torch.float64, generator=gen) - 0.3 for _ in range(3)]
    expected = _dense_root(ns, labels, damping)
    scale = torch.ones(len(sizes), dtype=torch.float64)
    scale[[0, 2]] = 2.0**-512 if dtype == torch.float64 else 2.0**-64
    U = torch.zeros(len(sizes), len(sizes), dtype=torch.float64)
    w = torch.zeros(len(sizes), dtype=torch.float64)
    for n in ns:
        n = n * scale[labels]
        s = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, labels, n)
        U += torch.outer(s, s)
        w += torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, labels, n * n)
    U, w = U.to(dtype), w.to(dtype)
    assert 0 < float(w[0]) < torch.finfo(dtype).tiny * sizes[0]  # w / s below the smallest normal number
    return U, w, Partition.from_sizes(sizes), labels, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["numpy", "python", "torch", "operator"])
def test_the_root_of_tiny_statistics_is_finite_and_right(dtype, form):
    damping = 0.1
    U, w, partition, labels, expected = _tiny_statistics(dtype, damping)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    if form == "numpy":
        consts = _root_constants(partition, torch.float64, torch.device("cpu"), numpy=True)
        lam, B = _inverse_root_numpy(U.double().numpy(), w.double().numpy(), consts, damping)
    elif form == "python":
        consts = _root_constants(partition, torch.float64, torch.device("cpu"), lists=True)
        root = _inverse_root_python(U.double().tolist(), w.double().tolist(), consts, damping)
        assert root is not None  # not left to the numpy path
        lam, B = root
    elif form == "torch":  # the accelerators' form (and CPU above NUMPY_ROOT_MAX_BLOCKS)
        lam, B = _normalised_inverse_root_torch(U, w, partition, damping)
    else:  # the operators, in the statistics' dtype (a replaced correlation, the public functions)
        root = inverse_root(normalised_correlation(U, w, partition), damping)
        lam, B = root.lam, root.B
    lam, B = (x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (lam, B))
    assert np.isfinite(lam).all() and np.isfinite(B).all()
    torch.testing.assert_close(_expand(lam, B, labels), expected, **tol)


def test_rescaling_leaves_ordinary_roots_bit_for_bit():
    # the torch form rescales at every root (no host sync): by powers of two, so the same numbers where nothing under-
    # or overflows; the numpy form's rescaled retry gives the same root as the statistics themselves
    gen = torch.Generator().manual_seed(0)
    partition = Partition.from_sizes([3, 5, 1, 8])
    X = torch.randn(6, 4, dtype=torch.float64, generator=gen) * torch.tensor(
        [1e-3, 1.0, 30.0, 1e2], dtype=torch.float64
    )
    U = X.T @ X
    w = U.diagonal() * torch.tensor([1.7, 2.0, 1.0, 3.1], dtype=torch.float64)
    U_s, w_s = functional._rescale_statistics(U, w)
    assert not torch.equal(w_s, w) and bool(((w_s >= 0.5) & (w_s < 2)).all())
    consts = _root_constants(partition, torch.float64, torch.device("cpu"), numpy=True)
    plain = _inverse_root_numpy(U.numpy(), w.numpy(), consts, 0.1)
    scaled = _inverse_root_numpy(U_s.numpy(), w_s.numpy(), consts, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(plain, scaled))
    lam, B = _normalised_inverse_root_torch(U, w, partition, 0.1)
    np.testing.assert_allclose(lam.numpy(), plain[0], rtol=1e-13)
    np.testing.assert_allclose(B.numpy(), plain[1], rtol=1e-11, atol=1e-14)


def _expected_step(theta, g, eps, damping, lr, labels):
    """One step from a fresh state, densely in float64 (every entry has h > 0 here)."""
    h = g * g
    assert bool((h > 0).all())
    z = h.sqrt() + eps
    n = g / z
    k = int(labels.max()) + 1
    # F is scale-free per block: the dense reference from n scaled per block to magnitudes near 1 (exactly)
    block_max = torch.stack([n[labels == i].abs().max() for i in range(k)])
    c = torch.ldexp(torch.ones(k, dtype=torch.float64), -torch.frexp(block_max)[1])
    R = _dense_root([n * c[labels]], labels, damping)
    r = z.rsqrt()
    return theta - lr * r * (R @ (r * g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["python", "numpy", "torch", "row", "fused"])
def test_a_step_with_tiny_normalised_gradients_is_finite_and_right(monkeypatch, dtype, form):
    # eps large and gradients tiny but with h > 0: n = g / z ~ 1e-155 (float64), so w / s is subnormal. Before: the
    # healthy tensors became NaN silently (two tensors), or a raw LinAlgError after the step count and h changed
    if form == "fused" and not _jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    eps, g_scale = (1e3, 1e-152) if dtype == torch.float64 else (1e2, 3e-20)
    count = 12 if form == "numpy" else 2  # above PYTHON_ROOT_MAX_BLOCKS: the numpy root
    if form == "torch":
        monkeypatch.setattr(functional, "NUMPY_ROOT_MAX_BLOCKS", 0)
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 10)] + [(60,)] * (count - 1)
    params = [torch.nn.Parameter(torch.randn(*s, dtype=dtype, generator=gen)) for s in shapes]
    rule = "row" if form in ("row", "fused") else "tensor"
    grads = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
    grads[0] = grads[0] * g_scale
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    g = torch.cat([x.reshape(-1).double() for x in grads])
    if rule == "row":
        labels = torch.cat(
            [torch.arange(5).repeat_interleave(10)] + [torch.full((60,), 5 + i) for i in range(count - 1)]
        )
    else:
        labels = torch.cat([torch.full((s[0] * (s[1] if len(s) > 1 else 1),), i) for i, s in enumerate(shapes)])
    with fused_at_any_size():
        opt = BlockMeanAdagrad(params, lr=0.1, eps=eps, partition=rule, fused=form == "fused")
        for p, x in zip(params, grads):
            p.grad = x
        opt.step()
    w = opt.global_state["w"]
    assert 0 < float(w[0]) < torch.finfo(dtype).tiny * 50
    assert bool(torch.isfinite(opt.global_state["root_lam"]).all() & torch.isfinite(opt.global_state["root_B"]).all())
    got = torch.cat([p.detach().reshape(-1).double() for p in params])
    assert bool(torch.isfinite(got).all())
    g32 = g.to(dtype).double()  # the gradient as the optimizer saw it
    expected = _expected_step(theta, g32, eps, 0.1, 0.1, labels)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_damping_zero_steps_tiny_statistics_instead_of_refusing_them(dtype):
    # one block (F regular after one step): the root of tiny statistics came out inf and the step was refused as
    # "F is singular"; now it is the finite root of the definition
    eps, g_scale = (1e3, 1e-152) if dtype == torch.float64 else (1e2, 3e-20)
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(50, dtype=dtype, generator=gen))
    theta = p.detach().double().clone()
    p.grad = torch.randn(50, dtype=dtype, generator=gen) * g_scale
    opt = BlockMeanAdagrad([p], lr=0.1, eps=eps, damping=0.0)
    opt.step()
    expected = _expected_step(theta, p.grad.double(), eps, 0.0, 0.1, torch.zeros(50, dtype=torch.long))
    tol = dict(rtol=1e-8, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.detach().double(), expected, **tol)


# ------------------------------------------------------------------------- 3. gradients with the negative bit


def _negbit(g: torch.Tensor) -> torch.Tensor:
    out = torch._neg_view(-g)  # the values of g, negative bit set, contiguous
    assert out.is_neg() and out.is_contiguous() and torch.equal(out, g)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["ratio", "host", "row", "scattered", "fused", "full_matrix"])
def test_a_gradient_with_the_negative_bit_steps_as_its_values(monkeypatch, dtype, case):
    if case == "fused" and not _jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    shapes, _, rule = FORMS["row" if case == "fused" else ("host" if case == "full_matrix" else case)]
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, dtype=dtype, generator=gen) for s in shapes] for _ in range(2)]

    def run(neg):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        if case == "full_matrix":
            opt = FullMatrixAdagrad(params, lr=0.1)
        else:
            opt = BlockMeanAdagrad(params, lr=0.1, partition=rule, fused=case == "fused")
        with fused_at_any_size():
            for step in grads:
                for i, (p, g) in enumerate(zip(params, step)):
                    p.grad = _negbit(g) if neg and i == len(params) - 2 else g.clone()
                opt.step()
        return params

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["ratio", "host", "row", "scattered", "fused", "functional"])
def test_an_expanded_gradient_steps_as_its_contiguous_copy(monkeypatch, dtype, case):
    """A hand-assigned ``g.expand(p.shape)`` (zero strides) steps exactly as the same values made contiguous. torch's
    float32 dot over a zero-stride vector accumulates with less precision, and a user trial's block with a constant
    gradient (a step that nearly cancels) came out 92% off the float64 reference, against 2.7% contiguous."""
    if case == "fused" and not _jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install bma-gp[jit])")
    monkeypatch.setattr(_fused, "CPU_BACKEND", "numba")
    shapes, _, rule = FORMS["row" if case in ("fused", "functional") else case]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
    values = [[torch.randn((), dtype=dtype, generator=gen) for _ in shapes] for _ in range(2)]

    def run(expanded):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        grads = [[v.expand(p.shape) if expanded else v.expand(p.shape).contiguous() for v, p in zip(step, params)]
                 for step in values]  # fmt: skip
        if expanded:
            assert all(0 in g.stride() for step in grads for g in step if g.numel() > 1)
        if case == "functional":
            blocks = ParamBlocks.build(params, rule)
            ps = [p.detach() for p in params]
            h = torch.zeros(blocks.bounds[-1], dtype=dtype)
            k = blocks.num_blocks
            stats = {"U": torch.zeros(k, k, dtype=dtype), "w": torch.zeros(k, dtype=dtype), "step": 0}
            for step in grads:
                block_mean_adagrad(
                    ps, step, h, stats, blocks, None, lr=[0.1] * len(ps), weight_decay=[0.0] * len(ps),
                    maximize=[False] * len(ps), eps=1e-10, damping=0.1, update_interval=1, mask=True,
                    check_finite=True, fused=False,
                )  # fmt: skip
            return ps
        opt = BlockMeanAdagrad(params, lr=0.1, partition=rule, fused=case == "fused")
        with fused_at_any_size():
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = g
                opt.step()
        return params

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_a_public_negative_bit_gradient_and_the_functional_step():
    # x.conj().imag of a one-entry complex tensor: a public way to a contiguous such gradient; block_mean_adagrad
    # (the functional step) takes them too
    one = torch.randn(1, dtype=torch.complex128).conj().imag
    assert one.is_neg() and one.is_contiguous()
    big = _negbit(torch.randn(40000, dtype=torch.float64))
    params = [
        torch.nn.Parameter(torch.randn(40000, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(1, dtype=torch.float64)),
    ]
    blocks = ParamBlocks.build(params, "tensor")
    results = []
    for grads in ([big, one], [big.resolve_neg(), one.resolve_neg()]):
        ps = [p.detach().clone() for p in params]
        h = torch.zeros(blocks.bounds[-1], dtype=torch.float64)
        stats = {"U": torch.zeros(2, 2, dtype=torch.float64), "w": torch.zeros(2, dtype=torch.float64), "step": 0}
        block_mean_adagrad(
            ps, grads, h, stats, blocks, None, lr=[0.1] * 2, weight_decay=[0.0] * 2, maximize=[False] * 2,
            eps=1e-10, damping=0.1, update_interval=1, mask=True, check_finite=True, fused=False,
        )  # fmt: skip
        results.append((ps, h, stats["w"]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
