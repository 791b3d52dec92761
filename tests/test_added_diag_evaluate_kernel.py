"""``AddedDiagLinearOperator.evaluate_kernel`` where the rebuilt operator is one of the package's sums (session 29).

linear_operator rebuilds the operator from its representation and reads the rebuilt one's ``_linear_op``; with
``bma_gp`` imported that rebuild of an evaluated fallback sum plus the noise is a ``FallbackSumLinearOperator``, and
a plain GPyTorch model, ``InducingPointKernel + ConstantKernel + RBFKernel``, raised ``AttributeError`` in
``ExactMarginalLogLikelihood`` and ``log_prob`` (without ``bma_gp`` it trains and predicts). It failed on the code
before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import torch

from bma_gp import ClosedFormFallbackWarning

# the model and what is compared, run here (bma_gp imported) and in a fresh process without bma_gp
SCRIPT = textwrap.dedent(
    """
    import gpytorch, torch

    N = 60
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)


    class Model(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
            self.covar_module = (
                gpytorch.kernels.InducingPointKernel(base, x[:12].clone(), likelihood)
                + gpytorch.kernels.ConstantKernel()
                + gpytorch.kernels.RBFKernel()
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = Model(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    loss = -mll(model(x), y)
    loss.backward()
    log_prob = likelihood(model(x)).log_prob(y)
    grad = model.covar_module.kernels[0].base_kernel.raw_outputscale.grad
    model.eval()
    with torch.no_grad():
        pred = model(x[:5] + 0.01)
    RESULT = {
        "loss": loss.item(),
        "log_prob": log_prob.item(),
        "grad": grad.item(),
        "mean": pred.mean.tolist(),
        "variance": pred.variance.tolist(),
    }
    """
)


def test_inducing_point_plus_constant_plus_exact_kernel_as_without_bma_gp():
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClosedFormFallbackWarning)  # an exact summand: a sum that says it is dense
        exec(SCRIPT, namespace)  # noqa: S102  (bma_gp is imported in this process)
    got = namespace["RESULT"]
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT + "\nimport json, sys\nassert 'bma_gp' not in sys.modules\nprint(json.dumps(RESULT))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    want = json.loads(plain.stdout.strip().splitlines()[-1])
    for key in ("loss", "log_prob", "grad"):
        assert abs(got[key] - want[key]) <= 1e-8 * abs(want[key]), (key, got[key], want[key])
    for key in ("mean", "variance"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-6, atol=1e-9), key
