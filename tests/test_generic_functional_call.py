"""kernel_block_mean's generic engine with parameter values that are not leaves (torch.func.functional_call with
computed values, a MAML-style inner step): the gradient reaches the leaves they were computed from. It was refused
as "a tensor that needs a gradient but is not one of the kernel's parameters"."""

import gpytorch
import pytest
import torch
from torch.func import functional_call

from bma_gp import BlockMeanKernel, Partition


class _Objective(torch.nn.Module):
    def __init__(self, x, y, partition):
        super().__init__()
        self.x, self.y = x, y
        base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.PeriodicKernel())  # the generic engine
        self.kernel = BlockMeanKernel(base, x, partition).double()

    def forward(self, dense: bool):
        K = self.kernel(self.x)
        noise = torch.tensor(0.1, dtype=torch.float64)
        if dense:
            D = K.to_dense() + noise * torch.eye(len(self.x), dtype=torch.float64)
            return self.y @ torch.linalg.solve(D, self.y) + torch.logdet(D)
        q, logdet = K.evaluate_kernel().add_diagonal(noise).inv_quad_logdet(self.y, logdet=True)
        return q + logdet


def _problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(4 * x[:, 0]) + 0.1 * torch.randn(60, generator=gen, dtype=torch.float64)
    return _Objective(x, y, Partition.from_labels(torch.arange(60) % 9))


def test_non_leaf_parameter_values_get_the_dense_gradient():
    module = _problem()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
    inner = {name: v * 1.0 + 0.01 * v.square() for name, v in leaves.items()}  # computed values
    got = torch.autograd.grad(functional_call(module, inner, (False,)), list(leaves.values()))
    inner = {name: v * 1.0 + 0.01 * v.square() for name, v in leaves.items()}
    want = torch.autograd.grad(functional_call(module, inner, (True,)), list(leaves.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_a_tensor_outside_the_parameters_is_still_refused():
    module = _problem()
    period = module.kernel.base_kernel.base_kernel
    hidden = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    original = period.forward

    def forward(x1, x2, **kwargs):  # depends on a tensor the kernel does not register
        return original(x1, x2, **kwargs) * (1 + hidden)

    period.forward = forward
    with pytest.raises(ValueError, match="needs a gradient but is not one of"):
        module(False)
