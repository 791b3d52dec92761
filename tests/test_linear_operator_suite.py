"""linear_operator's own operator test-suite run on BlockMeanLinearOperator.

Each class only says how to build the operator and its dense twin; the ~60 inherited checks
follow. ``should_call_cg`` / ``should_call_lanczos`` are False: the inherited solve,
inv_quad_logdet and root-decomposition tests then assert that CG and Lanczos were *not* called.
"""

import unittest

import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

from bma_gp import BlockMeanLinearOperator, Partition


def _random_operator(labels, batch_shape=(), seed=0, diag_shift=1.0):
    gen = torch.Generator().manual_seed(seed)
    partition = Partition.from_labels(torch.tensor(labels))
    k = partition.num_blocks
    root = torch.randn(*batch_shape, k, k, generator=gen)
    B = root @ root.mT / k + 0.1
    lam = torch.rand(*batch_shape, k, generator=gen) + diag_shift
    return BlockMeanLinearOperator(lam, B, partition)


def _dense_twin(linear_op):
    """Dense matrix built from the operator's own tensors (so gradients reach lam and B)."""
    lam, B = linear_op.representation()
    labels = linear_op.partition.labels
    B = 0.5 * (B + B.mT)
    return B[..., labels, :][..., :, labels] + torch.diag_embed(lam[..., labels])


# unequal sizes, a singleton block (4), scattered labels
LABELS = [0, 1, 0, 2, 1, 1, 3, 0, 2, 1, 0, 2]


def _newton_schulz_inv_sqrt(A, iters=60):
    """Dense A^{-1/2} by the coupled Newton-Schulz iteration: plain matmuls, so autograd gives
    correct gradients even when A has exactly repeated eigenvalues (where eigh's backward is nan)."""
    A = A.double()
    c = torch.linalg.matrix_norm(A, keepdim=True)
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
    Y, Z = A / c, eye
    for _ in range(iters):
        T = 0.5 * (3 * eye - Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / c.sqrt()


class _Common:
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = False
    should_call_lanczos_diagonalization = False
    seed = 0

    def evaluate_linear_op(self, linear_op):
        return _dense_twin(linear_op)

    # The inherited sqrt_inv_matmul tests differentiate torch.linalg.eigh of the dense matrix. A
    # block mean matrix has eigenvalue lam_i with multiplicity s_i - 1, where eigh's backward is
    # nan or garbage (it divides by eigenvalue gaps). Same checks, with a reference that is
    # differentiable at repeated eigenvalues.
    def _sqrt_inv_matmul_check(self, with_lhs):
        linear_op = self.create_linear_op().detach().requires_grad_(True)
        linear_op_copy = torch.clone(linear_op).detach().requires_grad_(True)
        evaluated = self.evaluate_linear_op(linear_op_copy)
        rhs = torch.randn(*linear_op.shape[:-1], 3, requires_grad=True)
        lhs = torch.randn(*linear_op.shape[:-2], 2, linear_op.size(-1), requires_grad=True)
        rhs_copy = rhs.detach().clone().requires_grad_(True)
        lhs_copy = lhs.detach().clone().requires_grad_(True)
        inv_root = _newton_schulz_inv_sqrt(evaluated).to(evaluated.dtype)
        if with_lhs:
            res, inv_quad = linear_op.sqrt_inv_matmul(rhs, lhs)
            actual = lhs_copy @ inv_root @ rhs_copy
            inv_quad_actual = (lhs_copy @ inv_root).pow(2).sum(-1)
            self.assertAllClose(inv_quad, inv_quad_actual, **self.tolerances["sqrt_inv_matmul"])
            loss = (res * 1.3).sum() + (inv_quad * 0.7).sum()
            loss_actual = (actual * 1.3).sum() + (inv_quad_actual * 0.7).sum()
        else:
            res = linear_op.sqrt_inv_matmul(rhs)
            actual = inv_root @ rhs_copy
            loss, loss_actual = (res * 1.3).sum(), (actual * 1.3).sum()
        self.assertAllClose(res, actual, **self.tolerances["sqrt_inv_matmul"])
        loss.backward()
        loss_actual.backward()
        self.assertAllClose(rhs.grad, rhs_copy.grad, **self.tolerances["sqrt_inv_matmul"])
        if with_lhs:
            self.assertAllClose(lhs.grad, lhs_copy.grad, **self.tolerances["sqrt_inv_matmul"])
        for arg, arg_copy in zip(linear_op.representation(), linear_op_copy.representation()):
            self.assertIsNotNone(arg.grad)
            self.assertAllClose(arg.grad, arg_copy.grad, **self.tolerances["sqrt_inv_matmul"])

    def test_sqrt_inv_matmul(self):
        self._sqrt_inv_matmul_check(with_lhs=True)

    def test_sqrt_inv_matmul_no_lhs(self):
        self._sqrt_inv_matmul_check(with_lhs=False)


class _RepeatedEigenvalues:
    # The inherited test_eigh compares eigenvectors one by one whenever torch's eigenvalues are not
    # bitwise equal; for a genuinely repeated eigenvalue they differ by rounding, and the
    # eigenvectors inside that eigenspace are arbitrary. Checked here instead: eigenvalues,
    # orthonormal eigenvectors, exact reconstruction, and the projector onto each eigenspace.
    def test_eigh(self):
        for dtype in (torch.float64, torch.float32):
            linear_op = self.create_linear_op().to(dtype)
            evaluated = self.evaluate_linear_op(linear_op)
            evals, evecs = torch.linalg.eigh(linear_op)
            evecs = evecs.to_dense()
            evals_actual, evecs_actual = torch.linalg.eigh(evaluated)
            tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-8, "atol": 1e-8}
            self.assertAllClose(evals.sort(-1).values, evals_actual, **tol)
            eye = torch.eye(evals.shape[-1], dtype=dtype)
            self.assertAllClose(evecs.mT @ evecs, eye.expand_as(evecs), **tol)
            self.assertAllClose(evecs @ torch.diag_embed(evals) @ evecs.mT, evaluated, **tol)
            # projector onto the eigenspace of each block offset lam_i (multiplicity s_i - 1)
            lam = linear_op.lam.reshape(-1, linear_op.lam.shape[-1])[0]
            flat_evals = evals.reshape(-1, evals.shape[-1])[0]
            flat_vecs = evecs.reshape(-1, *evecs.shape[-2:])[0]
            flat_vecs_actual = evecs_actual.reshape(-1, *evecs_actual.shape[-2:])[0]
            flat_actual = evals_actual.reshape(-1, evals_actual.shape[-1])[0]
            for i, size in enumerate(linear_op.partition.sizes.tolist()):
                if size < 2:
                    continue
                close = lambda e, c=lam[i]: (e - c).abs() < 1e-3 * (1 + c.abs())  # noqa: E731
                V, W = flat_vecs[:, close(flat_evals)], flat_vecs_actual[:, close(flat_actual)]
                self.assertEqual(V.shape[-1], W.shape[-1])
                self.assertAllClose(V @ V.mT, W @ W.mT, rtol=1e-3, atol=1e-3)


class TestBlockMeanLinearOperator(_RepeatedEigenvalues, _Common, LinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return _random_operator(LABELS, seed=1)


class TestBlockMeanLinearOperatorBatch(_RepeatedEigenvalues, _Common, LinearOperatorTestCase, unittest.TestCase):
    def create_linear_op(self):
        return _random_operator(LABELS, batch_shape=(3,), seed=2)


class TestBlockMeanLinearOperatorMultiBatch(_RepeatedEigenvalues, _Common, LinearOperatorTestCase, unittest.TestCase):
    # the inherited getitem tests index batch dimensions with tensors and slices
    def create_linear_op(self):
        return _random_operator(LABELS, batch_shape=(2, 3), seed=3)


class TestBlockMeanLinearOperatorAllSingletons(_Common, LinearOperatorTestCase, unittest.TestCase):
    # k = n: every lam is folded into B; the spectrum has no repeated eigenvalues, so the
    # inherited eigh / eigvalsh tests also compare gradients.
    def create_linear_op(self):
        return _random_operator(list(range(7))[::-1], seed=4)


class TestBlockMeanLinearOperatorOneBlock(_RepeatedEigenvalues, _Common, LinearOperatorTestCase, unittest.TestCase):
    # k = 1: a constant matrix plus a multiple of the identity
    def create_linear_op(self):
        return _random_operator([0] * 6, seed=5)
