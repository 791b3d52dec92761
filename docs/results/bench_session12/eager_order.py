"""Three orders of the eager CPU step's operations (A: the step's own), against torch.optim.Adagrad, alternating rounds.

python docs/results/bench_session12/eager_order.py   # output: eager_order.txt
"""

import time

import torch

from bma_gp.optim import _cpu_kernels as K

torch.manual_seed(0)
N = 2**20
g = [torch.randn(N) for _ in range(2)]
h = [torch.rand(N) + 1 for _ in range(2)]
n = [torch.empty(N) for _ in range(2)]
r = [torch.empty(N) for _ in range(2)]
p = [torch.randn(N) for _ in range(2)]
one = torch.ones(())
d = torch.empty(2, 4)


def fa(j):
    torch._fused_adagrad_(
        [n[j]], [g[j]], [h[j]], [one], lr=-(2.0**30), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False
    )


def A():
    for j in range(2):
        torch.dot(g[j], g[j], out=d[j, 0])
    for j in range(2):
        n[j].zero_()
        fa(j)
        torch.div(g[j], n[j], out=r[j]).rsqrt_()
        torch.dot(g[j], r[j], out=d[j, 1])
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
    d.tolist()
    for j in (1, 0):
        K.add_two(p[j], n[j], r[j], -1e-3 * 2**-30, -1e-3 * 2**-15)


def B():
    for j in range(2):
        torch.dot(g[j], g[j], out=d[j, 0])
    for j in (1, 0):
        n[j].zero_()
        fa(j)
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
        torch.div(g[j], n[j], out=r[j]).rsqrt_()
        torch.dot(g[j], r[j], out=d[j, 1])
    d.tolist()
    for j in (0, 1):
        K.add_two(p[j], n[j], r[j], -1e-3 * 2**-30, -1e-3 * 2**-15)


def C():  # B with the sums between the quotient and its reciprocal square root
    for j in range(2):
        torch.dot(g[j], g[j], out=d[j, 0])
    for j in (1, 0):
        n[j].zero_()
        fa(j)
        torch.div(g[j], n[j], out=r[j])
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
        r[j].rsqrt_()
        torch.dot(g[j], r[j], out=d[j, 1])
    d.tolist()
    for j in (0, 1):
        K.add_two(p[j], n[j], r[j], -1e-3 * 2**-30, -1e-3 * 2**-15)


ps = [torch.nn.Parameter(torch.randn(N)) for _ in range(2)]
for q, gg in zip(ps, g):
    q.grad = gg.clone()
opt = torch.optim.Adagrad(ps, lr=0.01)
res = {}
fs = [("adagrad", opt.step), ("A", A), ("B", B), ("C", C)]
for rnd in range(30):
    for name, f in fs if rnd % 2 else fs[::-1]:
        s = time.perf_counter()
        f()
        res.setdefault(name, []).append(time.perf_counter() - s)
        for hh in h:
            hh.fill_(1.0)
for k, v in res.items():
    v = sorted(v[3:])
    print(k, f"{1e3 * v[len(v) // 2]:.3f}", end="  ")
print()
