"""An inducing-point kernel over a block mean kernel (``InducingPointKernel(BlockMeanKernel(...))``, GPyTorch's or
the package's ``ChunkedInducingPointKernel``) as the whole covariance module: SGPR whose ``K_XZ`` and ``K_ZZ`` come
from the block mean kernel. Its evaluation is a low-rank root whatever the base kernel, which plus the noise is
GPyTorch's own closed form (Woodbury), and GPyTorch's SGPR prediction strategy reads that operator's parts. The
package routed the sum to its own operator because a block mean kernel sat somewhere in the module tree: training
ran, prediction raised ``AttributeError: 'BlockMeanSumLinearOperator' object has no attribute '_linear_op'``.

The reference is the same model with the block mean kernel hidden from the package (its values, held outside the
module tree): plain GPyTorch SGPR over the same base kernel values.

Also: a likelihood whose training groups were 1-D ids refuses to read a test column known not to hold ids, and the
functional ``block_mean_adagrad`` checks its switches (``mask``, ``check_finite``, ``fused``) as the class
does.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch

from bma_gp import BlockMeanKernel, ChunkedInducingPointKernel, Partition


class _Hidden(gpytorch.kernels.Kernel):
    """A block mean kernel's values as a kernel the package does not recognise (held outside the module tree)."""

    def __init__(self, block_mean: BlockMeanKernel):
        super().__init__()
        self._held = [block_mean]

    def forward(self, x1, x2, diag=False, **kwargs):
        dense = self._held[0](x1, x2).to_dense()
        return dense.diagonal(dim1=-2, dim2=-1) if diag else dense


def _data(dtype):
    g = torch.Generator().manual_seed(3)
    n = 150
    x = torch.rand(n, 2, generator=g, dtype=torch.float64).to(dtype)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    labels = (x[:, 0] * 9).long().clamp(max=8)
    labels[::7] = 9  # a block of scattered points, unequal sizes
    return x, y.to(dtype), Partition.from_labels(labels), torch.rand(6, 2, generator=g, dtype=torch.float64).to(dtype)


def _fit_and_predict(x, y, part, xt, kernel_class, hidden: bool):
    """One marginal log-likelihood with its gradients, then the predictive mean and variance at ``xt``."""
    lik = gpytorch.likelihoods.GaussianLikelihood().to(x.dtype)
    block_mean = BlockMeanKernel(gpytorch.kernels.RBFKernel(), x, part).to(x.dtype)
    base = _Hidden(block_mean) if hidden else block_mean

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = kernel_class(base, inducing_points=x[::10].clone(), likelihood=lik)
            self.block_mean = block_mean  # registered either way: the same parameter names

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = Model().to(x.dtype)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no other warning
        loss = -mll(model(x), y)
        loss.backward()
        named = model.named_parameters()
        grads = {name.replace("covar_module.base_kernel.", "block_mean."): p.grad for name, p in named}
        model.eval()
        with torch.no_grad():
            pred = lik(model(xt))
            mean, variance = pred.mean, pred.variance
    return loss.detach(), grads, mean, variance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel_class", [gpytorch.kernels.InducingPointKernel, ChunkedInducingPointKernel])
def test_inducing_point_kernel_over_a_block_mean_kernel_trains_and_predicts_as_sgpr(kernel_class, dtype):
    x, y, part, xt = _data(dtype)
    loss, grads, mean, variance = _fit_and_predict(x, y, part, xt, kernel_class, hidden=False)
    # the reference: GPyTorch's own SGPR (the chunked kernel evaluates its base on row chunks, which a hidden block
    # mean kernel cannot average over the whole training set; GPyTorch's kernel evaluates it whole)
    want = _fit_and_predict(x, y, part, xt, gpytorch.kernels.InducingPointKernel, hidden=True)
    tol = {"rtol": 1e-8, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-3, "atol": 2e-4}
    assert torch.allclose(loss, want[0], **tol)
    assert grads.keys() == want[1].keys()
    for name, grad in grads.items():
        assert grad is not None and torch.allclose(grad, want[1][name], **tol), name
    assert mean.dtype == dtype and torch.allclose(mean, want[2], **tol)
    assert torch.allclose(variance, want[3], **tol)
    assert torch.all(variance > 0)


@pytest.mark.parametrize("switch", ["mask", "check_finite", "fused"])
@pytest.mark.parametrize("value", ["no", 1, None, torch.tensor(True)])
def test_functional_block_mean_adagrad_checks_its_switches_before_changing_anything(switch, value):
    """The functional step took any truthy value for ``mask``, ``check_finite`` and ``fused`` (``check_finite="no"``
    checked; ``fused=1`` took the fused path), where the class refuses them: now the same ``ValueError`` naming the
    argument, raised before the parameters, the statistics or the step count change; NumPy bools pass as the class's
    do."""
    import numpy as np

    from bma_gp.optim.functional import block_mean_adagrad
    from bma_gp.optim.param_blocks import ParamBlocks

    def call(params, h, stats, **switches):
        n = len(params)
        grads = [torch.ones_like(p) for p in params]
        options = {"mask": True, "check_finite": True, "fused": False, **switches}
        with torch.no_grad():
            block_mean_adagrad(
                params, grads, h, stats, blocks, None, lr=[0.1] * n, weight_decay=[0.0] * n, maximize=[False] * n,
                eps=1e-10, damping=0.1, update_interval=1, **options,
            )  # fmt: skip

    params = [torch.nn.Parameter(torch.arange(6.0, dtype=torch.float64).reshape(2, 3))]
    params.append(torch.nn.Parameter(torch.ones(4, dtype=torch.float64)))
    blocks = ParamBlocks.build(params, "tensor")
    h = torch.zeros(blocks.bounds[-1], dtype=torch.float64)
    stats = {"U": torch.zeros(2, 2, dtype=torch.float64), "w": torch.zeros(2, dtype=torch.float64), "step": 0}
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=rf"Invalid {switch} value: .*; it must be True or False"):
        call(params, h, stats, **{switch: value})
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not h.any() and stats["step"] == 0
    call(params, h, stats, **{switch: np.bool_(switch != "fused")})  # NumPy's bools are bools
    assert stats["step"] == 1 and not torch.equal(params[0], before[0])


def test_a_column_known_not_to_hold_the_ids_is_not_read_as_the_test_points_groups():
    """Training groups given as 1-D ids and single-column inputs (sleepstudy's days): after a prediction had shown
    the training inputs' column to hold other values than the ids, ``likelihood(model(x), x)`` still read the test
    points' days as their groups (the noise of subjects 2 and 7 for days 2 and 7, silently). It now raises and says
    to pass ``groups=``; where the column does hold the ids, it is read as before."""
    from bma_gp import GroupGaussianLikelihood
    from test_session31_mixed import DTYPE, _SmoothGP
    from test_session31_mixed_attack import _days_model

    model, likelihood, x, y, groups = _days_model()
    k = likelihood.num_groups
    x_test = torch.tensor([[2.0], [7.0]], dtype=DTYPE)
    with torch.no_grad():
        latent = model(x_test)
        with pytest.raises(ValueError, match=r"1-D ids .* groups= \(likelihood\(model\(x\), groups=ids\)\)"):
            likelihood(latent, x_test)
        noisy = likelihood(latent, groups=torch.tensor([0, 17]))
    torch.testing.assert_close(noisy.variance - latent.variance, likelihood.noise[[0, 17]].detach())

    # the ids as the inputs' last column (and also given as 1-D ids): that column is read for the test points
    x2 = torch.cat([x, groups.to(DTYPE).unsqueeze(-1)], -1)
    likelihood = GroupGaussianLikelihood(k, train_inputs=groups)
    model = _SmoothGP(x2, y, likelihood).to(DTYPE)
    with torch.no_grad():
        likelihood.noise = torch.linspace(0.01, 3.0, k)
    model.eval()
    x2_test = torch.tensor([[2.0, 4.0], [7.0, 11.0]], dtype=DTYPE)
    with torch.no_grad():
        latent = model(x2_test)
        with pytest.warns(UserWarning, match="reads the group ids from the last column"):  # group_dim not given
            read = likelihood(latent, x2_test)
    torch.testing.assert_close(read.variance - latent.variance, likelihood.noise[[4, 11]].detach())


def test_the_training_inputs_passed_with_the_call_get_the_stored_1d_ids():
    """``likelihood(model(train_x), train_x)`` in eval mode with training groups given as 1-D ids: the training
    points' groups are the stored ids (their day column was read as groups before)."""
    from test_session31_mixed_attack import _days_model

    model, likelihood, x, y, groups = _days_model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)  # (the training inputs, on purpose)
        latent = model(x)
        for inputs in (x, x.clone()):
            noisy = likelihood(latent, inputs)
            torch.testing.assert_close(noisy.variance - latent.variance, likelihood.noise[groups].detach())
