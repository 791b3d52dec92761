"""Where BlockMeanAdagrad's eager CPU step spends its time outside the passes (session 29, docs/optimizer.md).

Apply step_markers.patch to a copy of the package (it appends (name, perf_counter()) to bma_gp.optim.functional._T
at points of the step), then: PYTHONPATH=COPY python step_segments.py WIDTH [UPDATE_INTERVAL]; WIDTH 1024 is the
2.1M-parameter model of examples/bench_optimizer.py, 8 a model of 144 parameters. Prints the median time between
consecutive markers over 280 steps ("pre": from opt.step() to the first marker, "post": from the last one back).
"""
import time, statistics, torch, sys, collections
from bma_gp.optim import BlockMeanAdagrad, functional as F
W=int(sys.argv[1])
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(W,W), torch.nn.Tanh(), torch.nn.Linear(W,W))
for p in m.parameters(): p.grad = torch.randn_like(p)*1e-3
o = BlockMeanAdagrad(m.parameters(), lr=1e-2, update_interval=int(sys.argv[2]) if len(sys.argv)>2 else 1)
for _ in range(5): o.step()
seg = collections.defaultdict(list); tot=[]; inner=[]
for _ in range(300):
    F._T.clear()
    s=time.perf_counter(); o.step(); e=time.perf_counter()
    T=F._T
    for (a,ta),(b,tb) in zip(T,T[1:]): seg[a+"->"+b].append(tb-ta)
    seg["pre"].append(T[0][1]-s); seg["post"].append(e-T[-1][1]); tot.append(e-s)
for k,v in seg.items(): print(f"{k:24s} {statistics.median(v[20:])*1e6:8.1f} us")
print("total", statistics.median(tot[20:])*1e6)
