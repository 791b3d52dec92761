import sys, time, statistics
import torch, gpytorch, bma_gp
from bma_gp import BlockMeanKernel, Partition
torch.manual_seed(0)
n, k = 4000, 400
x = torch.rand(n, 2, dtype=torch.float64)
part = Partition.from_labels(torch.randperm(n) % k)
y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(n, dtype=torch.float64)
noise = 0.01 + 0.02 * torch.rand(n, dtype=torch.float64)
class M(gpytorch.models.ExactGP):
    def __init__(s, lik):
        super().__init__(x, y, lik); s.mean = gpytorch.means.ConstantMean()
        s.covar = BlockMeanKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), x, part)
    def forward(s, z): return gpytorch.distributions.MultivariateNormal(s.mean(z), s.covar(z))
lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
m = M(lik).double(); mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, m)
m.covar.base_kernel.base_kernel.lengthscale = 0.3
def step():
    loss = -mll(m(x), y); loss.backward()
step()
out = {}
for rep in range(3):
    for v in (True, False):
        with bma_gp.settings.validate(v):
            t = time.perf_counter(); step(); out.setdefault(v, []).append(time.perf_counter() - t)
print(bma_gp.__file__, {k: round(statistics.median(v), 3) for k, v in out.items()})
B = m.covar(x).evaluate_kernel()
print(type(B).__name__, torch.linalg.eigvalsh(B.B).min().item())
