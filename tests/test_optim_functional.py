"""The optimizer's lean root (:func:`bma_gp.optim.functional._normalised_inverse_root`) against the
operator path it replaces: ``inverse_root(normalised_correlation(U, w, partition), damping)``."""

from __future__ import annotations

import pytest
import torch

from bma_gp import Partition
from bma_gp.optim import functional as F
from bma_gp.optim.functional import inverse_root, normalised_correlation


def _stats(sizes, dtype, unseen=(), seed=0):
    """``U`` and ``w`` of a few steps of random gradients over blocks of ``sizes`` (scattered labels);
    blocks in ``unseen`` never had a gradient (their ``w`` is 0)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    partition = Partition(labels)
    k = len(sizes)
    U = torch.zeros(k, k, dtype=dtype)
    w = torch.zeros(k, dtype=dtype)
    for _ in range(3):
        n = torch.randn(labels.numel(), generator=gen, dtype=torch.float64).to(dtype)
        n[torch.isin(labels, torch.tensor(list(unseen), dtype=labels.dtype))] = 0
        sums = partition.block_sum(n)
        U += torch.outer(sums, sums)
        w += partition.block_sum(n * n)
    return U, w, partition


def _canonical_parts(lam, B, partition):
    """``(lam, B)`` with a singleton block's one entry in ``lam`` and ``B_ii = 0`` (``from_core``'s convention): the
    same matrix, whichever way a root split that entry (its ``lam_i`` is no eigenvalue)."""
    single = partition.sizes == 1
    diag = torch.diagonal(B, dim1=-2, dim2=-1)
    lam = torch.where(single, lam + diag, lam)
    return lam, B - torch.diag_embed(torch.where(single, diag, torch.zeros_like(diag)))


def _canonical(op):
    lam, B = _canonical_parts(op.lam, op.B, op.partition)
    return type(op)(lam, B, op.partition)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "sizes, unseen",
    [([5, 1, 3, 1, 7], ()), ([4, 4, 4], (1,)), ([1], ()), ([2, 9, 1, 1, 6, 3], (0, 3)), ([300, 1000], ())],
)
@pytest.mark.parametrize("damping", [1e-3, 0.5])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lean_root_matches_operator_path(sizes, unseen, dtype, rtol, damping, backend, monkeypatch):
    """The reference is the operator path in float64 on the same statistics. In float32 the lean path
    works in float64 from the start, where the operator path normalises in float32 first: it must be at
    least as close to the reference (measured: 4.5e-7 against 3.1e-4 on B for the first case)."""
    if backend == "torch":  # CPU roots of up to NUMPY_ROOT_MAX_BLOCKS blocks take numpy; this forces torch
        monkeypatch.setattr(F, "NUMPY_ROOT_MAX_BLOCKS", 0)
    U, w, partition = _stats(sizes, dtype, unseen)
    ref = _canonical(inverse_root(normalised_correlation(U.double(), w.double(), partition), damping))
    lam, B = F._normalised_inverse_root(U, w, partition, damping)
    assert lam.dtype == dtype and B.dtype == dtype
    lam, B = _canonical_parts(lam, B, partition)
    scale_lam, scale_B = float(ref.lam.abs().max()), float(ref.B.abs().max())
    torch.testing.assert_close(lam.double(), ref.lam, rtol=rtol, atol=rtol * scale_lam)
    torch.testing.assert_close(B.double(), ref.B, rtol=rtol, atol=rtol * scale_B + 1e-30)
    if dtype == torch.float32:
        op = _canonical(inverse_root(normalised_correlation(U, w, partition), damping))
        assert (B.double() - ref.B).abs().max() <= (op.B.double() - ref.B).abs().max() + 1e-7 * scale_B
        assert (lam.double() - ref.lam).abs().max() <= (op.lam.double() - ref.lam).abs().max() + 1e-7 * scale_lam


def test_preconditioner_takes_the_lean_path_only_for_the_default_correlation(monkeypatch):
    U, w, partition = _stats([3, 4, 1], torch.float64)
    calls = []
    monkeypatch.setattr(F, "_normalised_inverse_root", lambda *a: calls.append(a) or (w, U))
    stats = {"U": U, "w": w, "step": 1, "root_lam": None, "root_B": None, "root_step": None}
    F.preconditioner(stats, partition, damping=1e-3, update_interval=1)
    assert len(calls) == 1
    stats["root_lam"] = None

    def identity(U, w, partition):
        return normalised_correlation(torch.zeros_like(U), torch.ones_like(w) * partition.sizes, partition)

    F.preconditioner(stats, partition, damping=1e-3, update_interval=1, correlation=identity)
    assert len(calls) == 1  # a replaced correlation goes through the operator


def test_numpy_and_torch_roots_agree_and_leave_the_statistics_alone(monkeypatch):
    U, w, partition = _stats([5, 1, 3, 1, 7, 2], torch.float32, unseen=(4,))
    U0, w0 = U.clone(), w.clone()
    lam_np, B_np = F._normalised_inverse_root(U, w, partition, 1e-3)
    monkeypatch.setattr(F, "NUMPY_ROOT_MAX_BLOCKS", 0)
    lam_t, B_t = F._normalised_inverse_root(U, w, partition, 1e-3)
    assert lam_np.dtype == lam_t.dtype == torch.float32 and B_np.shape == B_t.shape == (6, 6)
    torch.testing.assert_close(lam_np, lam_t, rtol=1e-6, atol=0)
    torch.testing.assert_close(B_np, B_t, rtol=1e-6, atol=1e-7 * float(B_t.abs().max()))
    assert torch.equal(U, U0) and torch.equal(w, w0)  # no in-place change reaches the optimizer's state
