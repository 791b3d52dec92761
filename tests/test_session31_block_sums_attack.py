"""Session 31: attack on the kernel block sums fixes (Matern-1/2's per-pair noise floor, the accumulator kept per
inference mode, ``BlockMeanKernel``'s block means made afresh outside inference mode)."""

import importlib
import math
import threading

import pytest
import torch
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from bma_gp import BlockMeanKernel, BlockMeanLinearOperator, Partition, block_mean
from bma_gp.block_mean_product_linear_operator import BlockMeanProductLinearOperator
from bma_gp.kernel_block_mean import kernel_block_mean

jit = importlib.import_module("bma_gp._kernel_sums.jit")
stationary = importlib.import_module("bma_gp._kernel_sums.stationary")


def _matern12(x, lengthscale, outputscale):
    """Matern-1/2 from exact differences (0 distance at duplicates, where autograd's weight is 0), differentiable.
    # shapes: (*b, n, d), (*b, 1, d), (*b,) -> (*b, n, n)"""
    r2 = ((x.unsqueeze(-2) - x.unsqueeze(-3)) / lengthscale.unsqueeze(-2)).square().sum(-1)
    r = torch.where(r2 > 0, r2.clamp_min(1e-300).sqrt(), torch.zeros_like(r2))
    return outputscale[..., None, None] * torch.exp(-r)


def _loss(lam, B):
    w = torch.linspace(-1, 2, B.shape[-1], dtype=B.dtype)
    return (lam * w).sum() + (B * w.unsqueeze(-1)).sum() + B.square().sum()


def _matern12_kernel(dtype, batch=(), lengthscale=None, **kw):
    kernel = ScaleKernel(MaternKernel(nu=0.5, batch_shape=torch.Size(batch), **kw), batch_shape=torch.Size(batch))
    if lengthscale is not None:
        kernel.base_kernel.lengthscale = lengthscale
    return kernel.to(dtype)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_matern12_gradient_at_exact_and_near_duplicates_far_from_the_origin(backend, monkeypatch):
    """Held: ``rho = 0`` exactly (duplicates) has weight 0 under the per-pair floor, in both dtypes and backends,
    with the data translated by 1e3 and 1e4 (float64 within 1e-8 of the exact gradient), in a batch kernel with ARD
    lengthscales, and with ``active_dims``. Near-duplicates at 1e-8 lie under their floor in float64 and lose their
    exact contribution, about ``rho`` each: 4e-9 of the gradient here."""
    if backend == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(jit, "BACKEND", backend)
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    gen = torch.Generator().manual_seed(0)
    half = torch.rand(60, 3, generator=gen, dtype=torch.float64) * 4
    x0 = torch.cat([half, half, half + 1e-8])
    partition = Partition.from_labels(torch.randint(0, 5, (180,), generator=gen))
    ls = torch.tensor([[[0.5, 1.0, 2.0]], [[3.0, 0.2, 1.0]]], dtype=torch.float64)
    ref_kernel = _matern12_kernel(torch.float64, (2,), ls, ard_num_dims=3)
    exact = block_mean(_matern12(x0, ref_kernel.base_kernel.lengthscale, ref_kernel.outputscale), partition)
    ref = torch.autograd.grad(_loss(exact.lam, exact.B), ref_kernel.base_kernel.raw_lengthscale)[0]
    for shift in (0.0, 1e3, 1e4):
        for dtype, rtol in ((torch.float64, 1e-8), (torch.float32, 1e-4 if shift < 1e4 else 2e-3)):
            x = (x0 + shift).to(dtype)
            kernel = _matern12_kernel(dtype, (2,), ls.to(dtype), ard_num_dims=3)
            op = kernel_block_mean(kernel, x, partition, fused=True)
            g = torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)[0].double()
            err = (g - ref).abs().max() / ref.abs().max()
            assert err < rtol, (shift, dtype, err.item())
    # active_dims: columns 0 and 2 of a four-column input, the others pure noise
    wide = torch.cat([x0[:, :1], torch.randn(180, 1, generator=gen, dtype=torch.float64), x0[:, 2:]], -1) + 1e3
    ref_kernel = _matern12_kernel(torch.float64, active_dims=[0, 2])
    exact = block_mean(_matern12(x0[:, [0, 2]], ref_kernel.base_kernel.lengthscale, ref_kernel.outputscale), partition)
    ref = torch.autograd.grad(_loss(exact.lam, exact.B), ref_kernel.base_kernel.raw_lengthscale)[0]
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        kernel = _matern12_kernel(dtype, active_dims=[0, 2])
        op = kernel_block_mean(kernel, wide.to(dtype), partition, fused=True)
        g = torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)[0].double()
        torch.testing.assert_close(g, ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_one_far_point_costs_no_stationary_kernel_its_gradient(backend, monkeypatch):
    """Held: the helper's outlier case (399 points in [0, 20], one at 3000, float32) for every kernel of the
    stationary engine, k = 1 and k = n included: no other tile-wide bound remains (RBF, Matern 3/2 and 5/2 have no
    near-zero weight to guard)."""
    if backend == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(jit, "BACKEND", backend)
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(399, 1, generator=gen, dtype=torch.float64) * 20, torch.tensor([[3000.0]]).double()])
    cases = [
        (0.5, torch.zeros(400, dtype=torch.long)),  # k = 1
        (0.5, torch.randperm(400, generator=gen)),  # k = n
        *((nu, torch.randint(0, 8, (400,), generator=gen)) for nu in (0.5, 1.5, 2.5, None)),
    ]
    for nu, labels in cases:
        partition = Partition.from_labels(labels)

        def make(dtype, nu=nu):
            return ScaleKernel(RBFKernel() if nu is None else MaternKernel(nu=nu)).to(dtype)

        ref_kernel = make(torch.float64)
        r = (x - x.T).abs() / ref_kernel.base_kernel.lengthscale
        if nu is None:
            f = torch.exp(-0.5 * r.square())
        else:
            r = r * math.sqrt(2 * nu)
            f = {0.5: 1, 1.5: 1 + r, 2.5: 1 + r + r.square() / 3}[nu] * torch.exp(-r)
        exact = block_mean(ref_kernel.outputscale * f, partition)
        ref = torch.autograd.grad(_loss(exact.lam, exact.B), ref_kernel.base_kernel.raw_lengthscale)[0]
        kernel = make(torch.float32)
        op = kernel_block_mean(kernel, x.float(), partition, fused=True)
        g = torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)[0]
        torch.testing.assert_close(g.double(), ref, rtol=1e-3, atol=0)


def test_kept_accumulator_across_modes_and_threads(monkeypatch):
    """Held: two kernels of one size, in two threads, each alternating ``inference_mode``, ``no_grad`` and
    gradient calls over the numba means path (k = 150), give the values and gradients of sequential calls: the
    kept accumulator is taken by one call at a time."""
    pytest.importorskip("numba")
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    monkeypatch.setattr(stationary, "_SPARE", {})
    gen = torch.Generator().manual_seed(5)
    n, k = 300, 150
    xs = [torch.randn(n, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    partition = Partition.from_labels(torch.arange(n) % k)
    kernels = [ScaleKernel(MaternKernel(nu=0.5)).double(), ScaleKernel(RBFKernel()).double()]

    def call(i, mode):
        kernel = kernels[i]
        if mode != "grad":
            with torch.inference_mode() if mode == "inference" else torch.no_grad():
                return kernel_block_mean(kernel, xs[i], partition).B.clone(), None
        op = kernel_block_mean(kernel, xs[i], partition)
        return op.B.detach(), torch.autograd.grad(_loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)[0]

    expected = {(i, m): call(i, m) for i in range(2) for m in ("inference", "no_grad", "grad")}
    failures: list = []

    def worker(i):
        try:
            for mode in ["inference", "grad", "no_grad", "grad", "inference", "inference", "grad"][i:] * 2:
                B, g = call(i, mode)
                torch.testing.assert_close(B, expected[(i, mode)][0], rtol=0, atol=0)
                if g is not None:
                    torch.testing.assert_close(g, expected[(i, mode)][1], rtol=1e-12, atol=0)
        except Exception as e:  # reported in the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def _operator(gen, n=60, k=6):
    A = torch.randn(k, k, generator=gen, dtype=torch.float64)
    B = A @ A.T / k + torch.eye(k, dtype=torch.float64)
    lam = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    return BlockMeanLinearOperator(lam, B, Partition.from_labels(torch.arange(n) % k))


def _uses(op, y):
    """Gradients with respect to ``y`` of several of ``op``'s kept results (dense matrix, solve, inverse, square
    root, inverse quadratic form and log-determinant); under inference mode only their sum."""
    yy = y.clone().requires_grad_(not torch.is_inference_mode_enabled())
    out = (
        (op.to_dense() @ yy).sum()
        + op.solve(yy).sum()
        + (op.inverse() @ yy).sum()
        + (op.matrix_sqrt() @ yy).sum()
        + op.inv_quad_logdet(yy, logdet=True)[0]
    )
    return torch.autograd.grad(out, yy)[0] if yy.requires_grad else out


def test_results_kept_under_inference_mode_are_not_served_to_autograd():
    """A block mean operator keeps the results of its decompositions (dense matrix, Cholesky of its core, inverse,
    square root) while its ``lam`` and ``B`` need no gradient. Kept under ``torch.inference_mode()`` they are
    inference tensors, and the same operator used afterwards with a gradient of another tensor (a right-hand side)
    raised ``RuntimeError: Inference tensors cannot be saved for backward``. A ``BlockMeanKernel`` reaches this
    between calls: its kept training block means are that operator, so a validation step under inference mode made
    the next training step with a frozen kernel raise. Results made under inference mode are now kept apart and
    served only under it."""
    gen = torch.Generator().manual_seed(6)
    y = torch.randn(60, 1, generator=gen, dtype=torch.float64)
    op = _operator(gen)
    expected = _uses(op, y)
    op = BlockMeanLinearOperator(op.lam, op.B, op.partition)
    with torch.inference_mode():
        _uses(op, y)
        kept = op.to_dense()
        assert op.to_dense() is kept  # still kept under inference mode
    torch.testing.assert_close(_uses(op, y), expected, rtol=1e-12, atol=0)
    assert op.to_dense() is op.to_dense() and not op.to_dense().is_inference()  # and kept outside it now
    with torch.inference_mode():  # one kept outside inference mode serves it too
        assert op.to_dense() is op.to_dense() and not op.to_dense().is_inference()

    # the product of two block mean operators keeps its dense matrix the same way
    left, right = _operator(gen), _operator(gen)
    yy = y.clone().requires_grad_(True)
    expected = torch.autograd.grad((BlockMeanProductLinearOperator(left, right).to_dense() @ yy).sum(), yy)[0]
    product = BlockMeanProductLinearOperator(left, right)
    with torch.inference_mode():
        product.to_dense()
    torch.testing.assert_close(torch.autograd.grad((product.to_dense() @ yy).sum(), yy)[0], expected)

    # a frozen BlockMeanKernel: block means kept outside inference mode, used under it, then with a gradient
    x = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(60) % 7)

    def frozen():
        kernel = BlockMeanKernel(MaternKernel(nu=1.5), x, partition).double()
        for p in kernel.parameters():
            p.requires_grad_(False)
        return kernel

    expected = _uses(frozen()(x, x).evaluate_kernel(), y)
    kernel = frozen()
    with torch.no_grad():
        kernel(x, x).evaluate_kernel()  # kept, made outside inference mode
    with torch.inference_mode():
        _uses(kernel(x, x).evaluate_kernel(), y)
    torch.testing.assert_close(_uses(kernel(x, x).evaluate_kernel(), y), expected, rtol=1e-12, atol=0)
