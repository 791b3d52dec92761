"""BlockMeanKernel's lazily_evaluate_kernels(False) warning fires for the user's setting only.

GPyTorch's ``LazyEvaluatedKernelTensor.evaluate_kernel`` switches ``lazily_evaluate_kernels`` off itself while it
evaluates (``kernel(x).to_dense()``, a fantasy update), so the setting alone cannot say whether the user turned lazy
evaluation off; those evaluations used to warn that the model predicts with GPyTorch's default strategy, which
they have nothing to do with. The warning is right where the user's ``lazily_evaluate_kernels(False)`` makes an
``ExactGP`` in eval mode evaluate its kernel on ``cat(train_x, test_x)`` at once.
"""

from __future__ import annotations

import copy
import threading
import warnings

import gpytorch
import pytest
import torch
from gpytorch.lazy import LazyEvaluatedKernelTensor

from bma_gp import BlockMeanKernel, ClosedFormFallbackWarning, Partition
from bma_gp.kernels import block_mean_kernel
from bma_gp.kernels.block_mean_kernel import _EAGER_PREDICTION_MESSAGE, _inside_lazy_evaluation
from gp_reference import GP, DenseKernel
from test_gp_inference import dense_block_mean

DTYPE = torch.float64


def data(n=30, k=5, t=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=DTYPE)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)
    xt = torch.randn(t, 2, generator=generator, dtype=DTYPE)
    return x, y, xt, Partition.from_labels(torch.arange(n) % k)


def base_kernel():
    base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    base.outputscale = 1.3
    base.base_kernel.lengthscale = 0.7
    return base.to(DTYPE)


def eager_warnings(caught) -> list:
    return [
        w
        for w in caught
        if issubclass(w.category, ClosedFormFallbackWarning) and str(w.message) == _EAGER_PREDICTION_MESSAGE
    ]


def joint_reference(base, x, xt, partition) -> torch.Tensor:
    """The joint covariance of training and new points, densely: the block mean of ``base`` over the training
    blocks plus one singleton block per new point."""
    z = torch.cat([x, xt])
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        K = base(z, z).to_dense()
    k = partition.num_blocks
    labels = torch.cat([partition.labels, torch.arange(k, k + xt.shape[0])])
    return dense_block_mean(K, labels)


# ---------------------------------------------------------------------------- (a) evaluating a lazy kernel tensor
@pytest.mark.parametrize("how", ["to_dense", "evaluate_kernel"])
@pytest.mark.parametrize("scaled", [False, True])
def test_evaluating_the_lazy_joint_covariance_in_eval_mode_does_not_warn(how, scaled):
    x, y, xt, partition = data()
    base = base_kernel()
    kernel = BlockMeanKernel(base, x, partition)
    covar = gpytorch.kernels.ScaleKernel(kernel).to(DTYPE) if scaled else kernel
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar).to(DTYPE)
    model.eval()
    z = torch.cat([x, xt])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        lazy = model.covar_module(z)
        assert isinstance(lazy, LazyEvaluatedKernelTensor)
        K = lazy.to_dense() if how == "to_dense" else lazy.evaluate_kernel().to_dense()
        mean = model(xt).mean  # the closed-form prediction next to it stays silent as well
    assert eager_warnings(caught) == []

    # the numbers: those of the (warned) eager evaluation, bit for bit, and the dense block mean reference
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        with pytest.warns(ClosedFormFallbackWarning, match="lazily_evaluate_kernels on"):
            eager = model.covar_module(z).to_dense()
    assert torch.equal(K, eager)
    reference = joint_reference(base, x, xt, partition)
    if scaled:
        reference = model.covar_module.outputscale.detach() * reference
    torch.testing.assert_close(K, reference, rtol=1e-12, atol=1e-12)
    n = x.shape[0]
    noisy = reference[:n, :n] + model.likelihood.noise.detach() * torch.eye(n, dtype=DTYPE)
    c = model.mean_module.constant.detach()
    ref_mean = c + reference[n:, :n] @ torch.linalg.solve(noisy, y - c)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- (b) fantasy models of sums
def test_fantasy_model_of_a_sum_with_a_block_mean_kernel_does_not_warn():
    x, y, xt, partition = data(t=6)
    xf, xt = xt[:2], xt[2:]
    yf = torch.tensor([0.3, -0.2], dtype=DTYPE)
    smooth = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(DTYPE)
    smooth.outputscale, smooth.base_kernel.lengthscale = 0.4, 1.5
    covar = BlockMeanKernel(base_kernel(), x, partition) + smooth
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar).to(DTYPE)
    model.eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(xt)
        fantasy = model.get_fantasy_model(xf, yf)
        post = fantasy(xt)
        mean, var = post.mean, post.variance
    assert eager_warnings(caught) == []  # other ClosedFormFallbackWarnings (GPyTorch's fantasy roots) may remain

    # the same numbers as conditioning on the fantasy points densely (they are new points for the kernel)
    reference = GP(
        torch.cat([x, xf]), torch.cat([y, yf]), copy.deepcopy(model.likelihood), DenseKernel(copy.deepcopy(covar))
    )
    reference.mean_module = copy.deepcopy(model.mean_module)
    reference.eval()
    with warnings.catch_warnings(), torch.no_grad(), gpytorch.settings.max_cholesky_size(10**6):
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)
        ref = reference(xt)
        ref_mean, ref_var = ref.mean, ref.variance
    torch.testing.assert_close(mean, ref_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------- the user's own setting still warns
def test_the_users_lazily_evaluate_kernels_false_still_warns_in_eval_mode_only():
    x, y, xt, partition = data()
    base = base_kernel()
    model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), BlockMeanKernel(base, x, partition)).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gpytorch.settings.lazily_evaluate_kernels(False):
            mll(model(x), y).backward()  # training: the training covariance alone, nothing to warn about
    assert eager_warnings(caught) == []

    model.eval()
    for inputs in (x, xt):
        model.prediction_strategy = None
        with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
            with pytest.warns(ClosedFormFallbackWarning) as record:
                eager_mean = model(inputs).mean
        assert len(eager_warnings(record)) == 1
        # the values the warning describes: every row a new point, so even model(train_x) is the new-point posterior
        reference = joint_reference(base, x, inputs, partition)
        n = x.shape[0]
        noisy = reference[:n, :n] + model.likelihood.noise.detach() * torch.eye(n, dtype=DTYPE)
        c = model.mean_module.constant.detach()
        torch.testing.assert_close(
            eager_mean, c + reference[n:, :n] @ torch.linalg.solve(noisy, y - c), rtol=1e-9, atol=1e-9
        )


# ---------------------------------------------------------------------------- the mark on GPyTorch's evaluation
class _Probe(gpytorch.kernels.RBFKernel):
    """Records, at each full evaluation, whether lazy evaluation was on and whether the mark was set."""

    def __init__(self, fail=False):
        super().__init__()
        self.seen: list[tuple[bool, bool, bool]] = []
        self.fail = fail

    def forward(self, x1, x2, diag=False, **params):
        if not diag:
            other: list[bool] = []
            thread = threading.Thread(target=lambda: other.append(_inside_lazy_evaluation()))
            thread.start()
            thread.join()
            self.seen.append((gpytorch.settings.lazily_evaluate_kernels.on(), _inside_lazy_evaluation(), other[0]))
            if self.fail:
                raise RuntimeError("probe")
        return super().forward(x1, x2, diag=diag, **params)


def test_gpytorchs_lazy_evaluation_is_marked_and_the_users_is_not():
    """Guards the assumption the warning rests on: GPyTorch evaluates a lazily evaluated kernel tensor through
    ``LazyEvaluatedKernelTensor.evaluate_kernel`` (wrapped by ``install``), with lazy evaluation switched off there.
    If a GPyTorch release evaluates it elsewhere, the first assertion fails (and the false warning would return)."""
    block_mean_kernel.install()
    block_mean_kernel.install()  # idempotent: wrapped once
    method = LazyEvaluatedKernelTensor.__dict__["evaluate_kernel"]
    assert not hasattr(method._bma_gp_original, "_bma_gp_original")

    x = torch.randn(5, 2, dtype=DTYPE)
    probe = _Probe().to(DTYPE)
    lazy = probe(x)
    lazy.to_dense()
    lazy.evaluate_kernel()  # GPyTorch's cache still answers: no second evaluation
    assert probe.seen == [(False, True, False)]  # marked in this thread only
    with gpytorch.settings.lazily_evaluate_kernels(False):
        probe(x)
    assert probe.seen[1:] == [(False, False, False)]  # the user's setting: not marked
    assert not _inside_lazy_evaluation()

    failing = _Probe(fail=True).to(DTYPE)
    with pytest.raises(RuntimeError, match="probe"):
        failing(x).to_dense()
    assert failing.seen == [(False, True, False)]
    assert not _inside_lazy_evaluation()  # the mark is cleared when the evaluation raises
