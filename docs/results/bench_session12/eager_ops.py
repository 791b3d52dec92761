"""Time of each operation of the eager CPU step (ratio form) in the step's order, two 2^20-entry float32 tensors.

python docs/results/bench_session12/eager_ops.py   # output: eager_ops.txt
"""

import collections
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
d = torch.empty(4)


def ops(j):
    t = []

    def T(name, f):
        s = time.perf_counter()
        f()
        t.append((name, time.perf_counter() - s))

    T("dotgg", lambda: torch.dot(g[j], g[j], out=d[0]))
    T("zero", lambda: n[j].zero_())
    T(
        "fadagrad",
        lambda: torch._fused_adagrad_(
            [n[j]], [g[j]], [h[j]], [one], lr=-(2.0**30), lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False
        ),
    )
    T("div", lambda: torch.div(g[j], n[j], out=r[j]))
    T("rsqrt", lambda: r[j].rsqrt_())
    T("dotgr", lambda: torch.dot(g[j], r[j], out=d[1]))
    T("sumn", lambda: torch.sum(n[j], 0, out=d[2]))
    T("dotnn", lambda: torch.dot(n[j], n[j], out=d[3]))
    return t


def upd(j):
    s = time.perf_counter()
    K.add_two(p[j], n[j], r[j], -1e-3 * 2**-30, -1e-3 * 2**-15)
    return ("add_two", time.perf_counter() - s)


acc = collections.defaultdict(list)
for _it in range(60):
    tot = time.perf_counter()
    for j in range(2):
        for k, v in ops(j):
            acc[k].append(v)
    for j in (1, 0):
        k, v = upd(j)
        acc[k].append(v)
    acc["total"].append(time.perf_counter() - tot)
    for hh in h:
        hh.fill_(1.0)
for k, v in acc.items():
    v = sorted(v[10:])
    print(f"{k:10s} {1e3 * v[len(v) // 2]:.3f} ms")
