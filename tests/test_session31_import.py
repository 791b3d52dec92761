"""Importing the package leaves ``torch._dynamo`` unimported (1.7 s of the 6.5 s that ``import bma_gp`` took): the
one function kept out of ``torch.compile``'s tracing imports it at its first call (``torch._disable_dynamo``), as
torch's own optimizers do, instead of ``torch.compiler.disable`` importing it when the module is loaded."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_dynamo():
    code = "import sys, bma_gp, optim, bma_gp.kernels, bma_gp.optim; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_first_prediction_does_not_load_dynamo():
    """The prediction-strategy hook is kept out of ``torch.compile``'s trace by ``torch._disable_dynamo``, which
    imports ``torch._dynamo`` at its first call: every process's first prediction took 0.8-1.2 s more for it. It now
    goes through that only while compiling (``tests/test_session26_fixes.py`` checks the compiled case)."""
    code = """
import sys
import gpytorch, torch
from bma_gp import Partition
from bma_gp.kernels import BlockMeanKernel, GroupKernel

class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar):
        super().__init__(x, y, likelihood)
        self.mean, self.covar = gpytorch.means.ConstantMean(), covar

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

x = torch.cat([torch.randint(0, 5, (40, 1)).float(), torch.rand(40, 1)], -1)
y = torch.randn(40)
blocks = Partition.from_labels(torch.arange(40) % 4)
smooth = BlockMeanKernel(gpytorch.kernels.RBFKernel(active_dims=[1]), x, blocks)
for covar in (GroupKernel(5, active_dims=[0]), smooth + GroupKernel(5, active_dims=[0])):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(x, y, likelihood, covar).eval()
    with torch.no_grad():
        likelihood(model(x[:7])).variance
print('torch._dynamo' in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
