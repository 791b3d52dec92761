"""Session 31: attack on the kernel block sums (``bma_gp.kernel_block_mean`` and its engines)."""

import importlib

import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

from bma_gp import Partition, block_mean
from bma_gp.kernel_block_mean import kernel_block_mean
from test_audit_kernel_sums import _exact_matern12  # ScaleKernel(MaternKernel(nu=0.5)) from exact differences

jit = importlib.import_module("bma_gp._kernel_sums.jit")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_matern12_float32_lengthscale_gradient_with_an_outlying_point(backend, monkeypatch):
    """Matern-1/2's derivative weight ``exp(-rho) / rho`` is set to 0 where ``rho^2`` is rounding noise of the
    distance GEMM. That bound was taken from the largest norms in the whole tile, so one far point (here at 3000,
    the others in [0, 20], lengthscale 0.69) made it 53 in float32: every pair closer than 7.3 lengthscales lost its
    weight, and the lengthscale gradient was 0.0079 where the exact one is 1.8187 (both backends). The bound is
    now each pair's own."""
    monkeypatch.setattr(jit, "BACKEND", backend)
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    gen = torch.Generator().manual_seed(0)
    n = 400
    x = torch.cat([torch.rand(n - 1, 1, generator=gen, dtype=torch.float64) * 20, torch.tensor([[3000.0]]).double()])
    partition = Partition.from_labels(torch.randint(0, 8, (n,), generator=gen))

    def loss(lam, B):
        w = torch.linspace(-1, 2, B.shape[-1], dtype=B.dtype)
        return (lam * w).sum() + (B * w.unsqueeze(-1)).sum() + B.square().sum()

    ref_kernel = ScaleKernel(MaternKernel(nu=0.5)).double()
    exact = block_mean(_exact_matern12(ref_kernel, x), partition)
    ref = torch.autograd.grad(loss(exact.lam, exact.B), ref_kernel.base_kernel.raw_lengthscale)[0]
    for dtype, rtol in ((torch.float32, 2e-3), (torch.float64, 1e-9)):
        kernel = ScaleKernel(MaternKernel(nu=0.5)).to(dtype)
        op = kernel_block_mean(kernel, x.to(dtype), partition, fused=True)
        g = torch.autograd.grad(loss(op.lam, op.B), kernel.base_kernel.raw_lengthscale)[0]
        torch.testing.assert_close(g.double(), ref, rtol=rtol, atol=0)


def test_a_call_under_inference_mode_leaves_the_next_ordinary_call_working(monkeypatch):
    """The stationary engine keeps its ``k x k`` float64 accumulator for the next call of that size (the numba means
    free it). Made under ``torch.inference_mode()`` it is an inference tensor, which may not be changed in place
    outside it: the next ordinary call of the same size raised ``RuntimeError: Inplace update to inference tensor
    outside InferenceMode``. Each mode now reuses its own."""
    pytest.importorskip("numba")  # the accumulator is kept where the numba means free it
    monkeypatch.setattr(jit, "MIN_ENTRIES", 0)
    stationary = importlib.import_module("bma_gp._kernel_sums.stationary")
    monkeypatch.setattr(stationary, "_SPARE", {})
    gen = torch.Generator().manual_seed(1)
    n, k = 300, 150  # k * k above jit.MEANS_MIN_ENTRIES: the numba means
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % k)
    kernel = ScaleKernel(MaternKernel(nu=2.5)).double()
    with torch.no_grad():
        expected = block_mean(kernel(x, x).to_dense(), partition)
    for mode in ("inference", "grad", "inference", "inference", "no_grad", "grad"):
        if mode == "inference":
            with torch.inference_mode():
                op = kernel_block_mean(kernel, x, partition)
        elif mode == "no_grad":
            with torch.no_grad():
                op = kernel_block_mean(kernel, x, partition)
        else:
            op = kernel_block_mean(kernel, x, partition)
            grads = torch.autograd.grad(op.lam.sum() + op.B.sum(), [kernel.raw_outputscale])
            assert torch.isfinite(grads[0]).all()
        torch.testing.assert_close(op.B.detach().clone(), expected.B, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.lam.detach().clone(), expected.lam, rtol=1e-10, atol=1e-12)


def test_block_mean_kernel_made_under_inference_mode_is_not_reused_with_autograd():
    """``BlockMeanKernel`` keeps its training block means while its inputs and hyperparameters are unchanged and need
    no gradient. Made under ``torch.inference_mode()`` they are inference tensors, and reused in an ordinary call
    (the block mean kernel frozen inside a ``ScaleKernel`` whose outputscale is learnt) the scaled operator's
    log-determinant raised ``RuntimeError: Inference tensors cannot be saved for backward`` (so did a product with a
    tensor needing a gradient), where a plain GPyTorch kernel works. They are now made afresh outside that mode."""
    from bma_gp import BlockMeanKernel

    gen = torch.Generator().manual_seed(2)
    n = 120
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    partition = Partition.from_labels(torch.arange(n) % 7)

    def scaled_frozen():
        inner = BlockMeanKernel(MaternKernel(nu=1.5), x, partition).double()
        for p in inner.parameters():
            p.requires_grad_(False)
        return ScaleKernel(inner).double()

    def scale_gradient(kernel):
        covar = kernel(x, x).evaluate_kernel().add_diagonal(torch.tensor(0.1, dtype=torch.float64))
        quad, logdet = covar.inv_quad_logdet(y, logdet=True)
        return torch.autograd.grad(quad + logdet, kernel.raw_outputscale)[0]

    kernel = scaled_frozen()
    with torch.inference_mode():
        kernel(x, x).evaluate_kernel() @ y  # the block means are kept
    torch.testing.assert_close(scale_gradient(kernel), scale_gradient(scaled_frozen()), rtol=1e-10, atol=0)
    with torch.inference_mode():  # and still reused under inference_mode
        assert (kernel(x, x).evaluate_kernel() @ y).is_inference()
