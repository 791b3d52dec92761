"""Bugs found by attacking the late session-30 changes (the bound-data check inside multitask containers, batch
indexing of the noisy Kronecker sums, dense parts in block mean products, positive multiples of the noisy Kronecker
sums). Each test failed at 0be3729 and compares with dense float64 linear algebra."""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, Partition
from closed_form_guard import closed_forms_only
from test_lcm_attack import _BatchMultitaskGP  # the same multitask model (T = 2 tasks)

pytestmark = pytest.mark.usefixtures("one_thread")

T, N, B = 2, 12, 3  # tasks, points, batch


def _noisy_training_covariance(kind: str, rank: int):
    """The batched noisy training covariance ``likelihood(model(x))`` of a ``MultitaskKernel`` around a
    ``BlockMeanKernel`` or of an ``LCMKernel`` of two (a batch of ``B`` independent models)."""
    gen = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 4, (N,), generator=gen)
    x = torch.stack([torch.rand(N, generator=gen, dtype=torch.float64), groups.double()], -1)
    part = Partition.from_labels(groups)
    batch = torch.Size([B])
    if kind == "multitask":
        kernel = gpytorch.kernels.MultitaskKernel(
            BlockMeanKernel(gpytorch.kernels.RBFKernel(batch_shape=batch), x, part), num_tasks=T, rank=1
        )
    else:
        members = [
            BlockMeanKernel(gpytorch.kernels.RBFKernel(batch_shape=batch), x, part),
            BlockMeanKernel(gpytorch.kernels.MaternKernel(batch_shape=batch), x, part),
        ]
        kernel = gpytorch.kernels.LCMKernel(members, num_tasks=T, rank=1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=T, batch_shape=batch, rank=rank)
    xb = x.expand(B, N, 2)
    y = torch.randn(B, N, T, generator=gen, dtype=torch.float64)
    model = _BatchMultitaskGP(xb, y, likelihood, kernel, batch).double()
    return likelihood(model(xb)).lazy_covariance_matrix


@pytest.mark.parametrize("kind, rank", [("multitask", 0), ("multitask", 1), ("lcm", 0), ("lcm", 1)])
def test_a_batch_of_positive_constants_scales_a_batched_noisy_kronecker_sum(kind, rank):
    """``A * c`` with one positive constant per batch entry (shape ``(B, 1, 1)``) for a batched noisy Kronecker sum:
    the constant went unaligned into the noise's identity factor (linear_operator's
    ``ConstantDiagLinearOperator._mul_constant`` multiplies ``(B, 1)`` values by ``(B,)``), a ``ValueError`` about
    ``diag_values`` instead of the scaled covariance. Scaled in closed form, gradients w.r.t. the constants as dense."""
    op = _noisy_training_covariance(kind, rank)
    dense = op.to_dense().detach()
    c = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64).view(B, 1, 1).requires_grad_()
    scaled = op.detach() * c
    assert scaled.shape == dense.shape
    rhs = torch.randn(B, N * T, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with closed_forms_only(N * T), warnings.catch_warnings():
        warnings.simplefilter("error", ClosedFormFallbackWarning)
        inv_quad, logdet = scaled.inv_quad_logdet(rhs, logdet=True)
        solved = scaled.solve(rhs)
    c_ref = c.detach().clone().requires_grad_()
    ref = dense * c_ref
    ref_solved = torch.linalg.solve(ref, rhs)
    ref_inv_quad, ref_logdet = (rhs * ref_solved).sum((-2, -1)), torch.logdet(ref)
    assert torch.allclose(scaled.to_dense(), ref, atol=1e-12)
    assert torch.allclose(solved, ref_solved.detach(), atol=1e-10)
    assert torch.allclose(inv_quad, ref_inv_quad, atol=1e-10)
    assert torch.allclose(logdet, ref_logdet, atol=1e-10)
    (inv_quad + logdet).sum().backward()
    (ref_inv_quad + ref_logdet).sum().backward()
    assert torch.allclose(c.grad, c_ref.grad, atol=1e-8)


@pytest.mark.parametrize("kind", ["multitask", "lcm"])
@pytest.mark.parametrize("index", ["slice", "points"])
def test_a_principal_submatrix_of_a_kronecker_sum_warns_without_advising_a_principal_submatrix(kind, index):
    """A principal submatrix of a noisy multitask Kronecker sum (``A[..., a:b, a:b]``, ``A[..., idx, :][..., idx]``)
    is solved by linear_operator's generic path, announced: the warning told the user to "index with one slice, or
    the same distinct points, on both sides (M[a:b, a:b], M[idx][:, idx]) to keep the closed forms", advice that
    gives this very warning again for a Kronecker sum (no submatrix of it is in the family). It now says so. The
    solve itself is the dense one."""
    op = _noisy_training_covariance(kind, 1).detach()
    idx = torch.tensor([0, 3, 5, 8])
    sub = op[..., 2:9, 2:9] if index == "slice" else op[..., idx, :][..., :, idx]
    want = op.to_dense()[..., 2:9, 2:9] if index == "slice" else op.to_dense()[..., idx, :][..., :, idx]
    rhs = torch.randn(*sub.shape[:-1], 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.warns(ClosedFormFallbackWarning) as record:
        solved = sub.solve(rhs)
    messages = [str(w.message) for w in record if issubclass(w.category, ClosedFormFallbackWarning)]
    assert messages and all("principal" in m for m in messages)
    assert not any("to keep the closed forms." in m and "Index with one slice" in m for m in messages), messages
    assert torch.allclose(solved, torch.linalg.solve(want, rhs), atol=1e-10)
