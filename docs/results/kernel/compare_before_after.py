"""Issue 13, before / after: RBF-ARD (or Matern 2.5-ARD) kernel_block_mean at several k against an older module.

    git show 706d3e0:bma_gp/kernel_block_mean.py > kbm_before.py
    python docs/results/kernel/compare_before_after.py 20000 10,2000,5000 new,old rbf kbm_before.py

One thread, process CPU time, fastest of three after a warm-up; random labels; d = 3.
"""

import importlib.util
import sys
import time

import torch
from gpytorch import settings as gs
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel

from bma_gp import Partition
from bma_gp.kernel_block_mean import kernel_block_mean as new

torch.set_num_threads(1)

spec = importlib.util.spec_from_file_location("old", sys.argv[5] if len(sys.argv) > 5 else "kbm_before.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
old = m.kernel_block_mean
n, d = int(sys.argv[1]), 3
ks = [int(a) for a in sys.argv[2].split(",")]
which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["new", "old"]
kname = sys.argv[4] if len(sys.argv) > 4 else "rbf"
torch.manual_seed(0)
x = torch.randn(n, d)
kernel = ScaleKernel(RBFKernel(ard_num_dims=d) if kname == "rbf" else MaternKernel(nu=2.5, ard_num_dims=d))
params = list(kernel.parameters())


def t(fn, rep=3):
    fn()
    best = 1e9
    for _ in range(rep):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


chunk = max(1, 64 * 2**20 // (n * 4))


def bare():
    with torch.no_grad(), gs.lazily_evaluate_kernels(False):
        for a in range(0, n, chunk):
            kernel(x[a : a + chunk], x).to_dense()


tb = t(bare)
print("bare fwd", round(tb, 3), flush=True)
for k in ks:
    labels = torch.unique(torch.randint(k, (n,)), return_inverse=True)[1]
    p = Partition.from_labels(labels)
    for name in which:
        f = new if name == "new" else old

        def fb(f=f, p=p):
            op = f(kernel, x, p)
            torch.autograd.grad(op.lam.sum() + op.B.square().sum(), params)

        def fw(f=f, p=p):
            with torch.no_grad():
                f(kernel, x, p)

        a, b = t(fw), t(fb)
        print(f"{name} k={k} fwd {a:.3f} ({a / tb:.2f}x) fwd+bwd {b:.3f} ({b / tb:.2f}x)", flush=True)
print("bare fwd again", round(t(bare), 3))
