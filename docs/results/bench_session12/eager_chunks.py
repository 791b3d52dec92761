"""The eager CPU step's operations on chunks of 2^15 ... 2^20 entries, against torch.optim.Adagrad in the same process.

python docs/results/bench_session12/eager_chunks.py [flush]   # output: eager_chunks.txt
"""

import sys
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
d = torch.empty(64, 4)
flush = torch.empty(16 * 2**20)


def step(C):
    for j in range(2):
        torch.dot(g[j], g[j], out=d[0, 0])
        for c, lo in enumerate(range(0, N, C)):
            sl = slice(lo, lo + C)
            gg, hh, nn, rr = g[j][sl], h[j][sl], n[j][sl], r[j][sl]
            nn.zero_()
            torch._fused_adagrad_(
                [nn], [gg], [hh], [one], lr=-(2.0**30), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False
            )
            torch.div(gg, nn, out=rr).rsqrt_()
            torch.dot(gg, rr, out=d[c, 1])
            torch.sum(nn, 0, out=d[c, 2])
            torch.dot(nn, nn, out=d[c, 3])
        d.tolist()
    for j in (1, 0):
        K.add_two(p[j], n[j], r[j], -1e-3 * 2**-30, -1e-3 * 2**-15)


def adagrad(opt):
    opt.step()


ps = [torch.nn.Parameter(torch.randn(N)) for _ in range(2)]
for q, gg in zip(ps, g):
    q.grad = gg.clone()
opt = torch.optim.Adagrad(ps, lr=0.01)
fl = len(sys.argv) > 1
res = {}
cands = [N, 2**19, 2**18, 2**17, 2**16, 2**15]
for _rnd in range(12):
    for name in ["adagrad"] + cands:
        if fl:
            flush.fill_(1.0)
        s = time.perf_counter()
        if name == "adagrad":
            opt.step()
        else:
            step(name)
        res.setdefault(name, []).append(time.perf_counter() - s)
        for hh in h:
            hh.fill_(1.0)
for k, v in res.items():
    v = sorted(v[2:])
    print(k, f"{1e3 * v[len(v) // 2]:.3f}")
