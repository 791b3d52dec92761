import torch, time, statistics, sys
torch.set_num_threads(int(sys.argv[1]))
from bma_gp.optim import _cpu_kernels
N = int(sys.argv[2])
g = torch.randn(N); h = torch.rand(N) + 1; n = torch.empty(N); r = torch.empty(N); one = torch.ones(())
dots = torch.empty(64, 3)
def whole():
    _cpu_kernels.adagrad_ratio(g, h, n, r, one, 1.0, 1e-10)
    torch.dot(g, r, out=dots[0,0]); torch.sum(n, 0, out=dots[0,1]); torch.dot(n, n, out=dots[0,2])
def chunked(size):
    for c, a in enumerate(range(0, N, size)):
        gc, hc, nc, rc = g[a:a+size], h[a:a+size], n[a:a+size], r[a:a+size]
        _cpu_kernels.adagrad_ratio(gc, hc, nc, rc, one, 1.0, 1e-10)
        torch.dot(gc, rc, out=dots[c%64,0]); torch.sum(nc, 0, out=dots[c%64,1]); torch.dot(nc, nc, out=dots[c%64,2])
res = {}
fns = {"whole": whole, "c15": lambda: chunked(2**15), "c16": lambda: chunked(2**16), "c17": lambda: chunked(2**17), "c18": lambda: chunked(2**18)}
for rnd in range(15):
    for k, f in fns.items():
        t = time.perf_counter(); f(); res.setdefault(k, []).append(time.perf_counter() - t)
for k, v in res.items(): print(k, round(statistics.median(v[3:])*1e3, 3))
