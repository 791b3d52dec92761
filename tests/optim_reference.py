"""Dense references for the optimizers in ``optim`` (test helpers, O(d^2) memory).

``DenseBlockMeanAdagrad`` implements docs/math.md section 3 with every matrix formed
explicitly: the normalised outer-product sum N_t (d x d), its block mean
approximation by direct block averages (docs/math.md section 2), the rescaled F, and
(F + damping I)^{-1/2} from ``torch.linalg.eigh``. It shares no code with the
streamed optimizer or with ``bma_gp``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def dense_block_mean(A: Tensor, labels: Tensor) -> Tensor:
    """docs/math.md section 2 by direct averaging over the blocks of ``labels`` (d x d -> d x d)."""
    k = int(labels.max()) + 1
    M = torch.zeros_like(A)
    for i in range(k):
        rows = (labels == i).nonzero().flatten()
        for j in range(k):
            cols = (labels == j).nonzero().flatten()
            block = A[rows][:, cols]
            if i != j:
                M[rows.unsqueeze(1), cols.unsqueeze(0)] = block.mean()
                continue
            s = rows.numel()
            diag = block.diagonal()
            off = (block.sum() - diag.sum()) / (s * (s - 1)) if s > 1 else torch.zeros((), dtype=A.dtype)
            lam = diag.mean() - off
            M[rows.unsqueeze(1), cols.unsqueeze(0)] = off + lam * torch.eye(s, dtype=A.dtype)
    return M


def dense_inv_sqrt(A: Tensor) -> Tensor:
    """A^{-1/2} of a symmetric positive definite matrix by eigendecomposition."""
    mu, Q = torch.linalg.eigh(0.5 * (A + A.mT))
    return (Q * mu.rsqrt()) @ Q.mT


class DenseBlockMeanAdagrad:
    """Block-mean AdaGrad of docs/math.md section 3 on an explicit flat parameter vector.

    Args:
        labels: block id of every parameter entry. # shape: (d,)
        lr: learning rate of every entry (its group's lr). # shape: (d,)
        eps, damping, update_interval: as in ``optim.BlockMeanAdagrad``.
        weight_decay: decoupled weight decay of every entry. # shape: (d,)
    """

    def __init__(
        self,
        labels: Tensor,
        lr: Tensor,
        eps: float = 1e-10,
        damping: float = 0.1,
        update_interval: int = 1,
        weight_decay: Tensor | None = None,
        dtype=torch.float64,
    ):
        d = labels.numel()
        self.labels = labels
        self.lr = lr.to(dtype)
        self.eps = eps
        self.damping = damping
        self.update_interval = update_interval
        self.weight_decay = torch.zeros(d, dtype=dtype) if weight_decay is None else weight_decay.to(dtype)
        self.h = torch.zeros(d, dtype=dtype)
        self.N = torch.zeros(d, d, dtype=dtype)
        self.t = 0
        self.R = None

    def correlation(self) -> Tensor:
        """F: the block mean of N rescaled to unit mean diagonal per block (identity blocks where unseen)."""
        M = dense_block_mean(self.N, self.labels)
        k = int(self.labels.max()) + 1
        diag = self.N.diagonal()
        mean_diag = torch.stack([diag[self.labels == i].mean() for i in range(k)])[self.labels]
        seen = mean_diag > 0
        scale = torch.where(seen, mean_diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(mean_diag))
        F = M * scale.unsqueeze(1) * scale.unsqueeze(0)
        return F + torch.diag((~seen).to(F.dtype))

    def step(self, theta: Tensor, g: Tensor, active: Tensor) -> Tensor:
        """One step from flat parameters ``theta`` with flat gradient ``g``; ``active`` marks entries
        whose parameter had a gradient (others have g = 0 and do not move). Returns the new theta."""
        g = torch.where(active, g, torch.zeros_like(g))
        self.t += 1
        self.h = self.h + g * g
        z = self.h.sqrt() + self.eps
        n = g / z
        self.N = self.N + torch.outer(n, n)
        if self.R is None or (self.t - 1) % self.update_interval == 0:
            F = self.correlation()
            self.R = dense_inv_sqrt(F + self.damping * torch.eye(F.shape[0], dtype=F.dtype))
        r = torch.where(self.h > 0, z.rsqrt(), torch.zeros_like(z))
        u = r * (self.R @ (r * g))
        new = theta - self.lr * (u + self.weight_decay * theta)
        return torch.where(active, new, theta)


class DenseFullMatrixAdagrad:
    """theta <- theta - lr [(H_t + eps I)^{-1/2} g_t + wd theta], H_t = sum g g^T, written out."""

    def __init__(self, d: int, lr: Tensor, eps: float = 1e-4, dtype=torch.float64):
        self.H = torch.zeros(d, d, dtype=dtype)
        self.lr = lr.to(dtype)
        self.eps = eps

    def step(self, theta: Tensor, g: Tensor, active: Tensor) -> Tensor:
        g = torch.where(active, g, torch.zeros_like(g))
        self.H = self.H + torch.outer(g, g)
        u = dense_inv_sqrt(self.H + self.eps * torch.eye(g.numel(), dtype=g.dtype)) @ g
        return torch.where(active, theta - self.lr * u, theta)


# ---------------------------------------------------------------------------- test fixtures
def reference_labels(params: list[Tensor], rule) -> Tensor:
    """Block id of every flat entry, written independently of ``optim.param_partition``."""
    labels, offset = [], 0
    for p in params:
        if rule == "tensor" or (rule == "row" and p.dim() < 2):
            ids = torch.zeros(p.numel(), dtype=torch.long)
        elif rule == "row":
            ids = torch.arange(p.shape[0]).view(-1, *([1] * (p.dim() - 1))).expand(p.shape).reshape(-1)
        else:
            ids = rule(p).reshape(-1).long().cpu()
        labels.append(ids + offset)
        offset += int(ids.max()) + 1
    return torch.cat(labels)


def small_model(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """A conv + linear model with tensors of 1, 2 and 3 dims (d = 60)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, kernel_size=3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 3)
    )
    return model.to(dtype)


def small_batch(step: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 2, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_of(model: torch.nn.Module, step: int) -> Tensor:
    x, y = small_batch(step, next(model.parameters()).dtype)
    return (model(x) - y).pow(2).mean()


def flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def set_flat(params: list[Tensor], values: Tensor) -> None:
    with torch.no_grad():
        for p, chunk in zip(params, values.split([p.numel() for p in params])):
            p.copy_(chunk.view(p.shape))


@contextlib.contextmanager
def fused_at_any_size():
    """Let ``fused=True`` take the compiled passes on the tiny test models too.

    Below ``FUSED_MIN_NUMEL`` entries (``FUSED_MIN_NUMEL_ONE_BLOCK`` and ``FUSED_MIN_MEAN_NUMEL_ONE_BLOCK`` per tensor
    with numba and one block per tensor)
    the optimizer takes the eager path (the compiled one is no faster there); the tests want the
    compiled code itself, on models small enough for a dense reference.
    """
    from bma_gp.optim import block_mean_adagrad

    names = ("FUSED_MIN_NUMEL", "FUSED_MIN_NUMEL_ONE_BLOCK", "FUSED_MIN_MEAN_NUMEL_ONE_BLOCK")
    old = {name: getattr(block_mean_adagrad, name) for name in names}
    for name in names:
        setattr(block_mean_adagrad, name, 0)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(block_mean_adagrad, name, value)
