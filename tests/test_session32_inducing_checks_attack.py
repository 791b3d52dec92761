"""Session 32: attack on today's changes to inducing-point kernels over block mean kernels.

Found: GPyTorch's ``InducingPointKernel`` (and ``ChunkedInducingPointKernel``) keeps ``K_ZZ`` and its inverse root in
eval mode until ``train()``. ``K_ZZ`` of a base kernel with a ``BlockMeanKernel`` depends on the kernel's training
inputs and partition wherever the inducing points start with them (inducing points equal to ``train_x``: the block
mean matrix). After ``kernel.set_partition(p)`` or ``kernel.set_train_data(x)`` followed by
``model.set_train_data(..., strict=False)`` (what the block mean kernel's error asks for), predictions used the old
``K_ZZ``: means 0.24 (new partition) to 3.3 (new inputs) off those of a fresh model, silently; the chunked kernel's
kept root, keyed by the cached inverse root, was stale with it. The model now drops an inducing-point kernel's caches
when a block mean kernel in its base kernel got new data since they were kept.

Checked that held (reference: GPyTorch's ``InducingPointKernel`` over the same base kernel, or a fresh model): the
chunked kernel over ``ScaleKernel(BlockMeanKernel)``, ``BlockMeanKernel + RBFKernel`` and ``BlockMeanKernel *
RBFKernel`` bases (loss, gradients of every parameter incl. the trace term's, predictive mean and variance with
``fast_pred_var`` on and off; float64, and float32 for the first), with ``chunk_rows`` set on the instance, and a base
kernel with a block mean kernel put in after construction with ``chunk_rows`` set: both are evaluated on all rows at
once (the behaviour chosen: as the constructor's refusal says, not a refusal at evaluation); the refusal's message, and
no refusal without a block mean kernel; no false alarm of the training-input check for inducing points equal to
``train_x``, ``active_dims`` on the inducing kernel, a block mean kernel bound to a column subset, ``model.double()``
and ``lazily_evaluate_kernels(False)`` (equal to lazy evaluation); it still raises for new inputs of the same size
inside ``ScaleKernel``. Checked by scripts: no false alarm for inducing points a subset of or the first rows of
``train_x``, ``active_dims`` on the base kernel or both, batched test inputs, repeated predictions, ``train()`` /
``eval()``, ``get_fantasy_model`` of a sum, ``set_train_data`` of the model and then the kernel (equal to a fresh
model), a ``MultitaskKernel`` around the inducing kernel; the check raises for a sum or ``ScaleKernel`` as the base
kernel; batch models equal GPyTorch's; the chunked kernel's peak memory over ``ScaleKernel(BlockMeanKernel)``,
training and predicting, is 1.0 MB at n = 2,000 and 1.6 MB at n = 6,000 (``tests/peak_memory.py``: nothing ``n x n``).
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, Partition

IPK = gpytorch.kernels.InducingPointKernel
CIPK = ChunkedInducingPointKernel
RBF = gpytorch.kernels.RBFKernel
Scale = gpytorch.kernels.ScaleKernel


def _data(n=40):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(5 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    part = Partition.from_labels((x[:, 0] * 5).long().clamp(max=4))
    test = torch.rand(5, 3, generator=g, dtype=torch.float64)
    return x, y, part, test


class _Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, lik, covar):
        super().__init__(x, y, lik)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


_BASES = {
    # alone (compared in: tests/test_session32_inducing_attack.py)
    "BlockMeanKernel": lambda x, part: BlockMeanKernel(RBF(), x, part),
    "ScaleKernel(BlockMeanKernel)": lambda x, part: Scale(BlockMeanKernel(RBF(), x, part)),
    "BlockMeanKernel + RBFKernel": lambda x, part: BlockMeanKernel(RBF(), x, part) + RBF(active_dims=[2]),
    "BlockMeanKernel * RBFKernel": lambda x, part: BlockMeanKernel(RBF(active_dims=[0, 1]), x, part) * Scale(RBF()),
}


def _model(kernel_class, base, dtype=torch.float64, inducing=None, partition=None):
    x, y, part, test = _data()
    lik = gpytorch.likelihoods.GaussianLikelihood()
    sgpr = kernel_class(_BASES[base](x, partition or part), x[::4].clone() if inducing is None else inducing, lik)
    model = _Model(x, y, lik, sgpr).to(dtype)
    with torch.no_grad():
        lik.noise = 0.05
        for m in sgpr.modules():
            if isinstance(m, RBF):
                m.lengthscale = 0.4
    return model, lik, sgpr, x.to(dtype), y.to(dtype), test.to(dtype)


def _fit_and_predict(model, lik, x, y, test):
    """Loss, its gradients (by parameter name), predictive mean and variance with fast_pred_var off and on."""
    model.train()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y)
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    model.eval()
    with torch.no_grad():
        pred = lik(model(test))
        with gpytorch.settings.fast_pred_var():
            fast = lik(model(test))
    return loss.detach(), grads, pred.mean, pred.variance, fast.variance


def _assert_same(got, want, dtype):
    tol = {"rtol": 1e-8, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    assert torch.allclose(got[0], want[0], **tol), (got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name, w in want[1].items():
        g = got[1][name]
        assert (g is None) == (w is None), name
        assert g is None or torch.allclose(g, w, **tol), (name, g, w)
    for a, b in zip(got[2:], want[2:]):
        assert a.dtype == dtype and torch.allclose(a, b, **tol), (a, b)


@pytest.mark.parametrize("base", list(_BASES)[1:])
def test_chunked_kernel_equals_gpytorchs_over_nested_block_mean_bases(base):
    """Held: with ``chunk_rows`` set on the instance (8 of 40 rows), the chunked kernel evaluates a base kernel that
    holds a block mean kernel anywhere on all rows at once: loss, every gradient (the SGPR trace term's too) and the
    predictions are GPyTorch's ``InducingPointKernel``'s on the same base kernel, in float64 and float32."""
    for dtype in (torch.float64, torch.float32) if base == "ScaleKernel(BlockMeanKernel)" else (torch.float64,):
        model, lik, sgpr, x, y, test = _model(CIPK, base, dtype)
        sgpr.chunk_rows = 8  # set after construction: the constructor refuses it over a BlockMeanKernel
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _fit_and_predict(model, lik, x, y, test)
        ref, ref_lik, _, *rest = _model(IPK, base, dtype)
        want = _fit_and_predict(ref, ref_lik, *rest)
        _assert_same(got, want, dtype)


def test_block_mean_base_kernel_put_in_after_construction_is_evaluated_on_whole_rows():
    """Held (the behaviour chosen): a base kernel with a block mean kernel assigned after construction, with an
    explicit ``chunk_rows``, is evaluated on all rows at once, as the constructor's refusal promises, not refused."""
    x, y, part, test = _data()
    lik = gpytorch.likelihoods.GaussianLikelihood()
    sgpr = CIPK(RBF(), x[::4].clone(), lik, chunk_rows=8)
    sgpr.base_kernel = Scale(BlockMeanKernel(RBF(), x, part))
    model = _Model(x, y, lik, sgpr).double()
    with torch.no_grad():
        lik.noise = 0.05
        sgpr.base_kernel.base_kernel.base_kernel.lengthscale = 0.4
    got = _fit_and_predict(model, lik, x, y, test)
    assert sgpr.chunk_rows == 8
    ref, ref_lik, _, *rest = _model(IPK, "ScaleKernel(BlockMeanKernel)")
    want = _fit_and_predict(ref, ref_lik, *rest)
    _assert_same(got, want, torch.float64)


def test_chunk_rows_refusal_names_the_fix_and_spares_other_base_kernels():
    x, _, part, _ = _data()
    lik = gpytorch.likelihoods.GaussianLikelihood()
    base = BlockMeanKernel(RBF(), x, part) + RBF()
    with pytest.raises(ValueError, match=r"chunk_rows=5 cannot be honoured.*leave chunk_rows out \(None\)"):
        CIPK(base, x[::4].clone(), lik, chunk_rows=5)
    assert CIPK(Scale(RBF()) + RBF(), x[::4].clone(), lik, chunk_rows=5).chunk_rows == 5


@pytest.mark.parametrize("kernel_class", [IPK, CIPK], ids=["InducingPointKernel", "ChunkedInducingPointKernel"])
@pytest.mark.parametrize("change", ["set_partition", "set_train_data"])
def test_inducing_kernels_caches_follow_the_block_mean_kernels_data(kernel_class, change):
    """Inducing points that start with ``train_x`` make ``K_ZZ`` a block mean matrix, which depends on the block mean
    kernel's data. Kept in eval mode, it outlived ``set_partition`` / ``set_train_data`` followed by
    ``model.set_train_data``: the predictions were those of the old data's ``K_ZZ`` (failed before: means 0.24 and
    3.3 off). Now they are a fresh model's."""
    x, y, part, test = _data()
    z = x.clone()  # (inducing points that are train_x followed by more points failed the same way)
    other = Partition.from_labels((x[:, 1] * 4).long().clamp(max=3))
    model, lik, sgpr = _model(kernel_class, "BlockMeanKernel", inducing=z)[:3]
    fresh, fresh_lik, fresh_sgpr = _model(kernel_class, "BlockMeanKernel", inducing=z)[:3]
    model.eval()
    with torch.no_grad():
        lik(model(test))
    new_x = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    for kernel in (sgpr.base_kernel, fresh_sgpr.base_kernel):
        if change == "set_partition":
            kernel.set_partition(other)
        else:
            kernel.set_train_data(new_x)
    train_x = x if change == "set_partition" else new_x
    model.set_train_data(train_x, y, strict=False)
    fresh.set_train_data(train_x, y, strict=False)
    fresh.eval()
    with torch.no_grad():
        got, want = lik(model(test)), fresh_lik(fresh(test))
    assert torch.allclose(got.mean, want.mean, rtol=1e-9, atol=1e-10), (got.mean, want.mean)
    assert torch.allclose(got.variance, want.variance, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("base", ["ScaleKernel(BlockMeanKernel)"])
def test_training_input_check_inside_an_inducing_kernel_without_false_alarms(base):
    """Held: a model whose training inputs are the block mean kernel's (inducing points equal to ``train_x``,
    ``active_dims`` on the inducing kernel and on the base kernel, lazy evaluation off, after ``model.double()``)
    trains and predicts as with lazy evaluation on; new inputs of the same size, given to the model alone, are
    refused also with the block mean kernel inside a ``ScaleKernel`` or a sum as the base kernel."""
    x, y, part, test = _data()
    lik = gpytorch.likelihoods.GaussianLikelihood()
    inner = _BASES[base](x[:, :2], part)
    for m in inner.modules():
        if isinstance(m, RBF) and m.active_dims is not None:
            m.active_dims = torch.tensor([1])
    sgpr = CIPK(inner, x[:, :2].clone(), lik, active_dims=[0, 1])
    model = _Model(x.float(), y.float(), lik, sgpr).float()
    for m in sgpr.modules():
        if isinstance(m, BlockMeanKernel):
            m.set_train_data(x[:, :2].float())
    model.double()  # converts the model's training data and the block mean kernel's
    x, y = model.train_inputs[0], model.train_targets
    assert x.dtype == torch.float64
    got = _fit_and_predict(model, lik, x, y, test)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        eager = _fit_and_predict(model, lik, x, y, test)
    _assert_same(eager, got, torch.float64)
    new = x + 0.01
    model.set_train_data(new, y, strict=False)
    model.train()
    with pytest.raises(ValueError, match="training inputs do not match BlockMeanKernel.train_x"):
        gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(new), y)
    model.eval()
    with pytest.raises(ValueError, match="training inputs do not match BlockMeanKernel.train_x"), torch.no_grad():
        model(test)
