"""Session 32: attack on inducing-point kernels over block mean and group kernels.

Found: ``ChunkedInducingPointKernel`` evaluates its base kernel a block of training rows at a time. A
``BlockMeanKernel`` takes such a block for new points (its rows are not the whole bound ``train_x``), so each block's
covariance with the inducing points was the exact base kernel, not the block means over the whole training set: past
``chunk_rows`` rows (the default chunk is at least 1,024 rows, fewer inducing points give more) the root, the marginal
log likelihood, its gradients and the predictions were those of another model, without a word (loss 0.066 off at
n = 120 with 16 rows a chunk; the same alone and in sums with a ``BlockMeanKernel``). A base kernel with a
``BlockMeanKernel`` in it is now evaluated on all rows at once (an ``n x m`` matrix, as GPyTorch's kernel forms), and an
explicit ``chunk_rows`` with such a base kernel is refused in words.

Found: after ``model.set_train_data`` alone, a ``BlockMeanKernel`` inside an inducing-point kernel took the new
training inputs for new points (the exact base kernel's ``K_xZ``) and the model trained and predicted as another one,
without a word: the check that refuses this for a block mean kernel anywhere else did not look inside an
inducing-point kernel, and GPyTorch's SGPR strategy (the model's, with the kernel alone) checks nothing. It is now
refused in training and in eval mode.

Checked that held (against dense linear algebra on the same kernel values: ``Q = K_xZ K_ZZ^{-1} K_Zx`` plus the other
summands and the noise, the SGPR trace term, and GPyTorch's diagonal correction at the test points):
``InducingPointKernel`` / ``ChunkedInducingPointKernel`` over ``BlockMeanKernel`` and over ``GroupKernel`` (inducing
points in id space: a subset of the groups), alone (GPyTorch's Woodbury operator and SGPR strategy) and plus a
``GroupKernel`` (the package's closed-form sum), with ``max_cholesky_size(0)`` under the closed-forms guard.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, GroupKernel, Partition
from closed_form_guard import closed_forms_only

IPK = gpytorch.kernels.InducingPointKernel
CIPK = ChunkedInducingPointKernel


def _data(dtype, n=64):
    g = torch.Generator().manual_seed(11)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 5, (n,), generator=g).double()
    y = torch.sin(6 * x[:, 0]) + 0.3 * ids + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    labels = (x[:, 0] * 7).long().clamp(max=6)
    labels[::5] = 7  # a block of scattered points
    inputs = torch.cat([x, ids.unsqueeze(-1)], -1)
    test = torch.cat([torch.rand(4, 2, generator=g, dtype=torch.float64), torch.tensor([[0.0], [2], [4], [6]])], -1)
    return inputs.to(dtype), y.to(dtype), Partition.from_labels(labels), test.to(dtype)


def _model(kernel_class, base: str, extra: bool, dtype, chunk_rows=None):
    """An SGPR over ``base`` ('block mean': a BlockMeanKernel on the two real columns; 'group': a GroupKernel on the
    id column, inducing points a subset of the ids), plus a GroupKernel on the ids if ``extra``."""
    inputs, y, part, test = _data(dtype)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    if base == "block mean":
        inner = BlockMeanKernel(gpytorch.kernels.RBFKernel(), inputs[:, :2], part)
        sgpr = kernel_class(inner, inputs[::8, :2].clone(), lik, active_dims=[0, 1])
    else:
        inner = GroupKernel(7)
        sgpr = kernel_class(inner, torch.tensor([[0.0], [1], [3]], dtype=dtype), lik, active_dims=[2])
    if chunk_rows is not None:
        sgpr.chunk_rows = chunk_rows  # set after construction: the constructor refuses it over a BlockMeanKernel
    covar = sgpr + GroupKernel(7, active_dims=[2]) if extra else sgpr

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(inputs, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = Model().to(dtype)
    with torch.no_grad():
        lik.noise = 0.05
        inner_kernel = inner.base_kernel if base == "block mean" else inner
        if base == "block mean":
            inner_kernel.lengthscale = 0.3
        else:
            inner_kernel.var = 0.7
    return model, lik, sgpr, inputs, y, test


def _leaves(model, sgpr):
    """The parameters, in a fixed order, with the SGPR's own (its base kernel's, its inducing points) first."""
    own = [p for p in sgpr.base_kernel.parameters()] + [sgpr.inducing_points]
    return own + [p for p in model.parameters() if all(p is not q for q in own)]


def _dense_reference(model, lik, sgpr, inputs, y, test):
    """Loss, its gradients, predictive mean and variance by dense linear algebra on the same kernel values."""
    sgpr_inputs = inputs[..., sgpr.active_dims]
    test_inputs = test[..., sgpr.active_dims]
    base, Z = sgpr.base_kernel, sgpr.inducing_points
    extra = model.covar_module.kernels[1] if isinstance(model.covar_module, gpytorch.kernels.AdditiveKernel) else None
    model.train()
    Kxz = base(sgpr_inputs, Z).to_dense()
    Kzz = base(Z, Z).to_dense()
    Ktz = base(test_inputs, Z).to_dense()
    kxx_diag = base(sgpr_inputs, sgpr_inputs, diag=True)
    ktt_diag = base(test_inputs, test_inputs, diag=True)
    chol = torch.linalg.cholesky(Kzz)
    A = torch.cholesky_solve(Kxz.mT, chol)  # K_ZZ^{-1} K_Zx
    Q = Kxz @ A
    Qtx = Ktz @ A
    Qtt = Ktz @ torch.cholesky_solve(Ktz.mT, chol)
    Ktt = Qtt - torch.diag(Qtt.diagonal()) + torch.diag(ktt_diag)  # GPyTorch's diagonal correction in eval mode
    K, Ktx = Q, Qtx
    if extra is not None:
        K = K + extra(inputs).to_dense()
        Ktx = Ktx + extra(test, inputs).to_dense()
        Ktt = Ktt + extra(test).to_dense()
    noise = lik.noise.squeeze()
    n = y.shape[-1]
    cov = K + noise * torch.eye(n, dtype=K.dtype)
    mean_x = model.mean_module(inputs)
    mvn = torch.distributions.MultivariateNormal(mean_x, cov)
    trace = 0.5 * (kxx_diag - Q.diagonal()).sum() / noise
    loss = -(mvn.log_prob(y) - trace) / n
    grads = torch.autograd.grad(loss, _leaves(model, sgpr), allow_unused=True)
    with torch.no_grad():
        # in eval mode the kernel's training covariance carries the diagonal correction too (GPyTorch's SGPR)
        cov = cov + torch.diag(kxx_diag - Q.diagonal())
        resid = torch.linalg.solve(cov, (y - mean_x).unsqueeze(-1))
        mean = model.mean_module(test) + (Ktx @ resid).squeeze(-1)
        var = Ktt.diagonal() - (Ktx @ torch.linalg.solve(cov, Ktx.mT)).diagonal() + noise
    return loss.detach(), grads, mean, var


def _fit_and_predict(model, lik, sgpr, inputs, y, test):
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    loss = -mll(model(inputs), y)
    grads = torch.autograd.grad(loss, _leaves(model, sgpr), allow_unused=True)
    model.eval()
    with torch.no_grad():
        pred = lik(model(test))
    return loss.detach(), grads, pred.mean, pred.variance


def _assert_close(got, want, dtype):
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 3e-3, "atol": 3e-4}
    assert torch.allclose(got[0], want[0], **tol), (got[0], want[0])
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        if w is None:
            assert g is None or torch.all(g == 0), i
        else:
            assert g is not None and torch.allclose(g, w, **tol), (i, g, w)
    assert got[2].dtype == dtype and torch.allclose(got[2], want[2], **tol), (got[2], want[2])
    assert torch.allclose(got[3], want[3], **tol), (got[3], want[3])


@pytest.mark.parametrize("extra", [False, True], ids=["alone", "plus a group kernel"])
def test_chunked_inducing_point_kernel_over_a_block_mean_kernel_in_chunks_of_rows(extra):
    """Past ``chunk_rows`` the chunked kernel took each block of training rows for new points of the block mean
    kernel (the exact base kernel against the inducing points): another model's loss, gradients and predictions.
    A chunk of 10 rows of 64 here; the default chunk does the same past 1,024 rows and more."""
    dtype = torch.float64
    model, lik, sgpr, inputs, y, test = _model(CIPK, "block mean", extra, dtype, chunk_rows=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no other warning
        got = _fit_and_predict(model, lik, sgpr, inputs, y, test)
    want = _dense_reference(*_model(CIPK, "block mean", extra, dtype))
    _assert_close(got, want, dtype)


def test_chunked_inducing_point_kernel_refuses_chunk_rows_over_a_block_mean_kernel():
    inputs, _, part, _ = _data(torch.float64)
    block_mean = BlockMeanKernel(gpytorch.kernels.RBFKernel(), inputs[:, :2], part)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    with pytest.raises(ValueError, match=r"chunk_rows=64 cannot be honoured: base_kernel contains a BlockMeanKernel"):
        CIPK(gpytorch.kernels.ScaleKernel(block_mean), inputs[::8, :2].clone(), lik, chunk_rows=64)
    CIPK(block_mean, inputs[::8, :2].clone(), lik)  # the default is taken (all rows at once)
    # a group kernel is a kernel of each row's id alone: chunks of rows are fine
    assert CIPK(GroupKernel(7), torch.tensor([[0.0], [1]]), lik, chunk_rows=4).chunk_rows == 4


_CASES = [
    (kernel_class, base, extra, torch.float64)
    for kernel_class in (IPK, CIPK)
    for base in ("block mean", "group")
    for extra in (False, True)
] + [
    (IPK, "block mean", True, torch.float32),
    (CIPK, "block mean", False, torch.float32),
    (CIPK, "group", True, torch.float32),
]


@pytest.mark.parametrize("kernel_class, base, extra, dtype", _CASES)
def test_inducing_point_kernel_over_block_mean_and_group_kernels_against_dense(kernel_class, base, extra, dtype):
    """Held: SGPR over a block mean kernel, or over a group kernel with inducing points in id space (a subset of the
    groups: ``Q`` is the group kernel restricted to them), alone or plus a group kernel, trains and predicts as dense
    linear algebra on the same kernel values, without warnings; chunked in 5-row blocks over the group kernel."""
    chunk_rows = 5 if kernel_class is CIPK and base == "group" else None
    model, lik, sgpr, inputs, y, test = _model(kernel_class, base, extra, dtype, chunk_rows=chunk_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _fit_and_predict(model, lik, sgpr, inputs, y, test)
    ref_model = _model(kernel_class, base, extra, torch.float64)
    want = _dense_reference(*ref_model)
    _assert_close(
        got,
        tuple(w if not torch.is_tensor(w) else w.to(dtype) for w in want[:1])
        + (
            tuple(None if g is None else g.to(dtype) for g in want[1]),
            want[2].to(dtype),
            want[3].to(dtype),
        ),
        dtype,
    )


@pytest.mark.parametrize("base", ["block mean", "group"])
def test_inducing_point_kernel_sums_stay_closed_form_without_cholesky(base):
    """Held: with ``max_cholesky_size(0)`` nothing iterative and no ``n x n`` factorisation runs, training or
    predicting (``fast_pred_var`` on and off), alone or plus a group kernel."""
    for extra in (False, True):
        model, lik, sgpr, inputs, y, test = _model(CIPK, base, extra, torch.float64)
        want = _dense_reference(*_model(CIPK, base, extra, torch.float64))
        with gpytorch.settings.max_cholesky_size(0), closed_forms_only(inputs.shape[0]):
            got = _fit_and_predict(model, lik, sgpr, inputs, y, test)
            with torch.no_grad(), gpytorch.settings.fast_pred_var():
                fast = lik(model(test)).variance
        _assert_close(got, want, torch.float64)
        assert torch.allclose(fast, want[3], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("extra", [False, True], ids=["alone", "plus a group kernel"])
@pytest.mark.parametrize("kernel_class", [IPK, CIPK], ids=["InducingPointKernel", "ChunkedInducingPointKernel"])
def test_new_training_data_without_the_block_mean_kernels_is_refused_inside_an_inducing_point_kernel(
    kernel_class, extra
):
    """After ``model.set_train_data`` alone, a block mean kernel inside an inducing-point kernel took the new training
    inputs for new points (the exact base kernel's ``K_xZ``): the model trained and predicted as another one, without a
    word, where a block mean kernel anywhere else raises. The check now follows the inducing-point kernel to its base
    kernel, in training and in eval mode; once the kernel is given the data too, the model is the fresh one's."""
    model, lik, sgpr, inputs, y, test = _model(kernel_class, "block mean", extra, torch.float64)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    new = inputs.clone()
    new[:, :2] = torch.rand(new.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=new.dtype)
    model.set_train_data(new, y, strict=False)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        with pytest.raises(ValueError, match="training inputs do not match BlockMeanKernel.train_x"):
            if mode == "train":
                mll(model(new), y)
            else:
                with torch.no_grad():
                    model(test)
    block_mean = sgpr.base_kernel
    part = block_mean.partition
    block_mean.set_train_data(new[:, :2], part)
    got = _fit_and_predict(model, lik, sgpr, new, y, test)
    fresh = _model(kernel_class, "block mean", extra, torch.float64)
    fresh[2].base_kernel.set_train_data(new[:, :2], part)
    fresh[0].set_train_data(new, y, strict=False)
    _assert_close(got, _fit_and_predict(fresh[0], fresh[1], fresh[2], new, y, test), torch.float64)


@pytest.mark.parametrize("extra", [False, True], ids=["alone", "plus a group kernel"])
def test_chunked_kept_training_root_follows_the_block_mean_kernels_partition(extra):
    """In eval mode the chunked kernel keeps the root of the training inputs between predictions, keyed by their
    values, its inducing points and its base kernel's parameters. A block mean kernel's values also depend on its
    partition: after ``set_partition`` and ``model.set_train_data(..., strict=False)`` (what the block mean kernel's
    error asks for), the old partition's root was served for the same inputs (predictive means 0.65 off). The key now
    holds the block mean kernels' data versions."""
    model, lik, sgpr, inputs, y, test = _model(CIPK, "block mean", extra, torch.float64)
    model.eval()
    with torch.no_grad():
        lik(model(test))
    other = Partition.from_labels((inputs[:, 1] * 5).long())
    sgpr.base_kernel.set_partition(other)
    model.set_train_data(inputs, y, strict=False)
    with torch.no_grad():
        pred = lik(model(test))
    fresh = _model(CIPK, "block mean", extra, torch.float64)
    fresh[2].base_kernel.set_partition(other)
    want = _dense_reference(*fresh)
    assert torch.allclose(pred.mean, want[2], rtol=1e-7, atol=1e-9)
    assert torch.allclose(pred.variance, want[3], rtol=1e-7, atol=1e-9)
