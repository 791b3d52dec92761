"""Matrix functions of small symmetric matrices (bma_gp._symmetric_function) against autograd through eigh, with
repeated eigenvalues where eigh's own backward divides by zero."""

from __future__ import annotations

import torch

from bma_gp._symmetric_function import (
    floored_sqrt,
    symmetric_matrix_function,
    symmetric_matrix_functions,
)


def _spd(k: int, gen: torch.Generator) -> torch.Tensor:
    W = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return W @ W.mT / k + 0.5 * torch.eye(k, dtype=torch.float64)


def test_two_functions_from_one_eigendecomposition_match_two_separate_ones():
    gen = torch.Generator().manual_seed(0)
    C = _spd(6, gen).requires_grad_(True)
    probe_f, probe_g = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(6, 6, generator=gen).double()
    F, G = symmetric_matrix_functions(C, torch.sqrt, torch.rsqrt)
    grad = torch.autograd.grad((F * probe_f).sum() + (G * probe_g).sum(), C)[0]
    F2, G2 = symmetric_matrix_function(C, torch.sqrt), symmetric_matrix_function(C, torch.rsqrt)
    grad2 = torch.autograd.grad((F2 * probe_f).sum() + (G2 * probe_g).sum(), C)[0]
    torch.testing.assert_close(F, F2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(G, G2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, grad2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F @ F, C.detach(), rtol=1e-12, atol=1e-12)
    # one output only: the other's gradient is None
    only_g = torch.autograd.grad(symmetric_matrix_functions(C, torch.sqrt, torch.rsqrt)[1].sum(), C)[0]
    torch.testing.assert_close(only_g, torch.autograd.grad(symmetric_matrix_function(C, torch.rsqrt).sum(), C)[0])
    assert torch.autograd.gradcheck(
        lambda c: symmetric_matrix_functions(0.5 * (c + c.mT), torch.sqrt, torch.exp),
        (C.detach().clone().requires_grad_(True),),
        fast_mode=True,
    )


def test_floored_sqrt_has_zero_derivative_at_rounding_level_eigenvalues():
    # a rank-two 4 x 4 matrix: its square root is exact and its gradient finite (sqrt's derivative at 0 is inf)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    C = (W @ W.mT).requires_grad_(True)
    R = symmetric_matrix_function(C, floored_sqrt, lambda e: e.clamp_min(0))
    torch.testing.assert_close(R @ R, C.detach(), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad((R * torch.randn(4, 4, generator=gen, dtype=torch.float64)).sum(), C)
    assert bool(torch.isfinite(grad).all())
    values = torch.tensor([0.0, 1e-30, 4.0], dtype=torch.float64, requires_grad=True)
    out = floored_sqrt(values)
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    (d,) = torch.autograd.grad(out.sum(), values)
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, 0.25], dtype=torch.float64))
