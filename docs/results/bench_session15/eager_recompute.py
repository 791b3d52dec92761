import time, statistics, math, sys
import torch
from bma_gp.optim import _cpu_kernels as ck
torch.manual_seed(0)
N = 2**20; T = 2
C = ck.ratio_chunk_numel(torch.float32); print("chunk", C, "threads", torch.get_num_threads())
eps = 1e-10; s = 2.0**40
ps = [torch.randn(N) for _ in range(T)]; gs = [torch.randn(N)*1e-3 for _ in range(T)]
hs = [torch.rand(N) for _ in range(T)]
ns = [torch.empty(N) for _ in range(T)]; rs = [torch.empty(N) for _ in range(T)]
one = torch.ones(())
dots = torch.empty(T, 4); cd = torch.empty(64, 3)
sn, sr, sh = torch.empty(C), torch.empty(C), torch.empty(C)
def A():
    for j in range(T): torch.dot(gs[j], gs[j], out=dots[j,0])
    dots[:,0].tolist()
    for j in range(T):
        g,h,n,r = gs[j],hs[j],ns[j],rs[j]
        for c,a in enumerate(range(0,N,C)):
            b=a+C; gc=g[a:b]; ck.adagrad_ratio(gc,h[a:b],n[a:b],r[a:b],one,s,eps)
            torch.dot(gc, r[a:b], out=cd[c,0]); torch.sum(n[a:b],0,out=cd[c,1]); torch.dot(n[a:b],n[a:b],out=cd[c,2])
        cd.tolist()
    for j in reversed(range(T)):
        ck.add_two(ps[j], ns[j], rs[j], -1e-2/s, -1e-3/math.sqrt(s))
def B():
    for j in range(T): torch.dot(gs[j], gs[j], out=dots[j,0])
    dots[:,0].tolist()
    for j in range(T):
        g,h = gs[j],hs[j]
        for c,a in enumerate(range(0,N,C)):
            b=a+C; gc=g[a:b]; sh.copy_(h[a:b]); ck.adagrad_ratio(gc,sh,sn,sr,one,s,eps)
            torch.dot(gc, sr, out=cd[c,0]); torch.sum(sn,0,out=cd[c,1]); torch.dot(sn,sn,out=cd[c,2])
        cd.tolist()
    for j in reversed(range(T)):
        g,h,p = gs[j],hs[j],ps[j]
        for a in range(0,N,C):
            b=a+C; ck.adagrad_ratio(g[a:b],h[a:b],sn,sr,one,s,eps)
            ck.add_two(p[a:b], sn, sr, -1e-2/s, -1e-3/math.sqrt(s))
pa = [torch.nn.Parameter(p.clone()) for p in ps]
for p,g in zip(pa,gs): p.grad=g
opt = torch.optim.Adagrad(pa, lr=1e-2)
def AD(): opt.step()
flush = torch.empty(64*2**20//4)
res = {k: [] for k in "A B AD".split()}
fns = dict(A=A, B=B, AD=AD)
for fl in (False, True):
    res = {k: [] for k in fns}
    for rnd in range(30):
        for k,f in (fns.items() if rnd%2 else reversed(fns.items())):
            for _ in range(5):
                if fl: flush.fill_(1.0)
                t=time.perf_counter(); f(); res[k].append(time.perf_counter()-t)
    med = {k: statistics.median(v)*1e3 for k,v in res.items()}
    print("flushed" if fl else "b2b", {k: round(v,3) for k,v in med.items()}, "A/AD %.2f B/AD %.2f" % (med['A']/med['AD'], med['B']/med['AD']))
