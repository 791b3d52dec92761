"""The SGPR root held as its inputs (``RBFRootFactor``): the products a closed-form sum needs, without ``U``.

* ``_RBFGram`` (``U^T S U``, ``U^T b`` and the block sums ``P_j^T W_j S U`` with ``U = K A``, never stored) against
  dense autograd in float64 (values 1e-12, every gradient 1e-10), over partitions with singleton blocks,
  unequal sizes, scattered labels and row weights, one row or many per block; gradcheck; float32;
* in a training loss ``U`` is never formed, the SGPR trace term reuses the marginal likelihood's Gram
  matrix (one pass forward, one backward), and the model equals GPyTorch's on well-conditioned inducing
  points to 1e-12 (Gaussian, fixed-noise and per-group noise likelihoods, alone and with groupings);
* everything else (products, diagonals, batches, a trace with another noise) forms ``U`` and is exact.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import bma_gp.kernels._rbf_gram as rbf_gram
from bma_gp import (
    BlockMeanSumLinearOperator,
    ChunkedInducingPointKernel,
    GroupGaussianLikelihood,
    GroupKernel,
    Partition,
)
from bma_gp.kernels._rbf_gram import LazyRootOperator, RBFRootFactor
from closed_form_guard import closed_forms_only

D64 = torch.float64


def setup(n=37, m=6, d=2, dtype=D64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    z = torch.randn(m, d, generator=gen, dtype=dtype)
    lengthscale = torch.linspace(0.7, 1.4, d, dtype=dtype).unsqueeze(0)
    a = torch.triu(torch.randn(m, m, generator=gen, dtype=dtype)) + 2 * torch.eye(m, dtype=dtype)
    dinv = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    rhs = torch.randn(n, 2, generator=gen, dtype=dtype)
    # a singleton block (label 4 once), unequal sizes, scattered labels; a second grouping with a covariate
    l1 = torch.randint(4, (n,), generator=gen)
    l1[n // 3] = 4
    l2 = torch.randint(3, (n,), generator=gen)
    w2 = torch.randn(n, generator=gen, dtype=dtype)
    return x, z, lengthscale, a, dinv, rhs, (l1, l2), (5, 3), (None, w2)


def dense(x, z, lengthscale, a, dinv, rhs, labels, ks, weights):
    u = torch.exp(-0.5 * torch.cdist(x / lengthscale, z / lengthscale).square()) @ a
    su = dinv.unsqueeze(-1) * u
    cross = []
    for lab, k, w in zip(labels, ks, weights):
        p = torch.nn.functional.one_hot(lab, k).to(u.dtype)
        if w is not None:
            p = p * w.unsqueeze(-1)
        cross.append(p.mT @ su)
    return (u.mT @ su, u.mT @ rhs, *cross)


def fused(rows, x, z, lengthscale, a, dinv, rhs, labels, ks, weights):
    return rbf_gram._RBFGram.apply(rows, labels, ks, weights, x, z, lengthscale, a, dinv, rhs)


@pytest.mark.parametrize("flush", ["default", "every_block"])
@pytest.mark.parametrize("rows", [1, 13, 1000], ids=["rows1", "rows13", "onechunk"])
@pytest.mark.parametrize("used", ["all", "gram", "cross", "rhs"])
def test_products_and_gradients_match_dense(rows, used, flush, monkeypatch):
    if flush == "every_block":  # block sums join the working-precision total after every row block
        monkeypatch.setattr(rbf_gram, "_FLUSH_TERMS", 0)
    x, z, ls, a, dinv, rhs, labels, ks, weights = setup()
    leaves = [t.requires_grad_() for t in (x, z, ls, a, dinv, rhs)]
    gen = torch.Generator().manual_seed(3)
    results = []
    for fn in (lambda: fused(rows, *leaves, labels, ks, weights), lambda: dense(*leaves, labels, ks, weights)):
        out = fn()
        picks = {"all": range(len(out)), "gram": [0], "cross": [2, 3], "rhs": [1]}[used]
        loss = sum(
            (out[i] * torch.randn(out[i].shape, generator=gen.manual_seed(10 + i), dtype=D64)).sum() for i in picks
        )
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append(([o.detach() for o in out], grads))
    (vals, grads), (ref_vals, ref_grads) = results
    for v, r in zip(vals, ref_vals):
        torch.testing.assert_close(v, r, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(["x", "Z", "lengthscale", "A", "dinv", "rhs"], grads, ref_grads):
        if r is None:
            assert g is None or bool((g == 0).all()), name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck():
    x, z, ls, a, dinv, rhs, labels, ks, weights = setup(n=9, m=3)
    leaves = tuple(t.requires_grad_() for t in (x, z, ls, a, dinv, rhs))
    assert torch.autograd.gradcheck(lambda *t: fused(4, *t, labels, ks, weights), leaves)


def test_float32_against_float64():
    args64 = setup(n=400, m=12)
    x, z, ls, a, dinv, rhs, labels, ks, weights = args64
    args32 = [t.float() for t in (x, z, ls, a)]
    out32 = fused(64, *args32, dinv, rhs, labels, ks, weights)  # dinv, rhs: the working precision
    out64 = fused(64, x, z, ls, a, dinv, rhs, labels, ks, weights)
    for o32, o64 in zip(out32, out64):
        assert o32.dtype == D64
        assert float((o32 - o64).norm() / o64.norm()) < 1e-5


# ---------------------------------------------------------------------------- in a GPyTorch model
def model_data(n=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 2, generator=gen, dtype=D64)
    g1, g2 = torch.randint(6, (n,), generator=gen), torch.randint(3, (n,), generator=gen)
    effects = 0.4 * torch.randn(6, generator=gen, dtype=D64)
    y = torch.sin(5 * s[:, 0]) + effects[g1] + 0.1 * torch.randn(n, generator=gen, dtype=D64)
    x = torch.cat([s, g1.to(D64).unsqueeze(-1), g2.to(D64).unsqueeze(-1)], -1)
    return x, y


# inducing points on a grid: K_ZZ well conditioned, so both formulations agree to rounding
GRID = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.0]], dtype=D64)


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, cls, groups):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
        base.base_kernel.lengthscale = torch.tensor([[0.3, 0.45]])
        kwargs = {"chunk_rows": 50} if cls is ChunkedInducingPointKernel else {}
        covar = cls(base, GRID.clone(), likelihood, active_dims=(0, 1), **kwargs)
        if groups:
            covar = covar + GroupKernel(6, active_dims=[2]) + GroupKernel(3, active_dims=[3])
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def likelihood_for(kind, n, x=None):
    if kind == "gaussian":
        return gpytorch.likelihoods.GaussianLikelihood()
    if kind == "per-group":  # the trace term's noise is found from the training inputs: Gram matrix shared too
        likelihood = GroupGaussianLikelihood(6, group_dim=2, train_inputs=x)
        likelihood.noise = torch.linspace(0.01, 0.06, 6)
        return likelihood
    noise = torch.linspace(0.01, 0.05, n, dtype=D64)
    return gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise, learn_additional_noise=True)


def train_loss(model, x, y, guard=False):
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with closed_forms_only(x.shape[0]) if guard else torch.enable_grad():
        loss = -mll(model(x), y)
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("groups", [False, True], ids=["sgpr", "sgpr+groups"])
@pytest.mark.parametrize("noise", ["gaussian", "fixed", "per-group"])
def test_model_matches_gpytorch_and_never_forms_the_root(groups, noise, monkeypatch):
    x, y = model_data()
    models = []
    for cls in (gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel):
        torch.manual_seed(0)
        models.append(Model(x, y, likelihood_for(noise, x.shape[0], x), cls, groups).to(D64))
    models[1].load_state_dict(models[0].state_dict())
    ref_loss, ref_grads = train_loss(models[0], x, y)

    passes = []
    apply = rbf_gram._RBFGram.apply
    monkeypatch.setattr(rbf_gram._RBFGram, "apply", lambda *a: passes.append(1) or apply(*a))

    def forbidden(*args):
        raise AssertionError("U was formed in a training step")

    monkeypatch.setattr(rbf_gram, "rbf_root", forbidden)
    loss, grads = train_loss(models[1], x, y, guard=True)
    assert len(passes) == 1, "the trace term must reuse the marginal likelihood's Gram matrix"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and any("inducing_points" in k for k in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13, msg=name)


def factor_and_dense(n=50, m=5, seed=1):
    x, z, ls, a, *_ = setup(n=n, m=m, seed=seed)
    scale = torch.tensor(1.3, dtype=D64)
    factor = RBFRootFactor(x, z, a, ls, scale, rows=7)
    u = scale * torch.exp(-0.5 * torch.cdist(x / ls, z / ls).square()) @ a
    return factor, u


def test_other_operations_form_the_root():
    factor, u = factor_and_dense()
    op = LazyRootOperator(factor)
    v = torch.randn(u.shape[0], 3, dtype=D64)
    torch.testing.assert_close(op @ v, u @ (u.mT @ v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), u.square().sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), u @ u.mT, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op[3:9, 2:5].to_dense(), (u @ u.mT)[3:9, 2:5], rtol=1e-12, atol=1e-12)
    # U U^T + D: the closed-form sum with no partition, never forming U for a solve
    d = torch.rand(u.shape[0], dtype=D64) + 0.1
    total = op.add_diagonal(d)
    assert isinstance(total, BlockMeanSumLinearOperator)
    dense_total = u @ u.mT + torch.diag(d)
    torch.testing.assert_close(total.solve(v), torch.linalg.solve(dense_total, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total.logdet(), torch.logdet(dense_total), rtol=1e-10, atol=0)
    torch.testing.assert_close(total @ v, dense_total @ v, rtol=1e-12, atol=1e-12)  # forms U here


def test_a_batch_of_sums_forms_the_root():
    factor, u = factor_and_dense()
    n = u.shape[0]
    part = Partition(torch.arange(n) % 4)
    d = torch.rand(2, n, dtype=D64) + 0.2
    B = torch.eye(4, dtype=D64) * 0.7
    op = BlockMeanSumLinearOperator(d, B, partitions=[part], root=factor)
    p = torch.nn.functional.one_hot(part.labels, 4).to(D64)
    dense_op = torch.diag_embed(d) + p @ B @ p.mT + u @ u.mT
    v = torch.randn(n, 2, dtype=D64)
    torch.testing.assert_close(op.solve(v), torch.linalg.solve(dense_op, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.logdet(), torch.logdet(dense_op), rtol=1e-10, atol=0)


def test_trace_with_another_noise_recomputes_and_stays_differentiable():
    factor, u = factor_and_dense()
    n = u.shape[0]
    d = torch.rand(n, dtype=D64) + 0.2
    with torch.no_grad():  # a Gram matrix without a graph must not be reused for a gradient
        factor.weighted_products(d, d.reciprocal(), d.new_zeros(n, 0), [], [], [])
    x, z, ls, a, *_ = setup(n=n, m=5, seed=1)
    leaves = [t.requires_grad_() for t in (x, z, ls, a)]
    factor = RBFRootFactor(*leaves[:2], leaves[3], leaves[2], torch.tensor(1.3, dtype=D64), rows=7)
    with torch.no_grad():
        factor.weighted_products(d, d.reciprocal(), d.new_zeros(n, 0), [], [], [])
    noise = torch.rand(n, dtype=D64) + 0.3
    for sigma in (d, noise):  # the same diagonal (no graph cached) and another one
        trace = factor.weighted_trace(sigma)
        grads = torch.autograd.grad(trace, leaves)
        u = 1.3 * torch.exp(-0.5 * torch.cdist(leaves[0] / leaves[2], leaves[1] / leaves[2]).square()) @ leaves[3]
        ref = (u.square().sum(-1) / sigma).sum()
        torch.testing.assert_close(trace, ref, rtol=1e-12, atol=0)
        for g, r in zip(grads, torch.autograd.grad(ref, leaves)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_eval_mode_keeps_the_formed_root():
    x, y = model_data()
    model = Model(x, y, gpytorch.likelihoods.GaussianLikelihood(), ChunkedInducingPointKernel, False).to(D64)
    model.eval()
    covar = model.covar_module(x[:20]).evaluate_kernel()
    assert not isinstance(covar, LazyRootOperator)
    model.train()
    covar = model.covar_module(x[:20]).evaluate_kernel()
    assert isinstance(covar, LazyRootOperator)


def test_second_derivatives_are_refused_not_wrong():
    x, z, ls, a, dinv, rhs, labels, ks, weights = setup(n=9, m=3)
    x.requires_grad_()
    gram = fused(4, x, z, ls, a, dinv, rhs, labels, ks, weights)[0]
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(gram.sum(), x, create_graph=True)
