import time, statistics, inspect, textwrap, re
import torch
import bma_gp.optim.functional as F
from bma_gp.optim import BlockMeanAdagrad
src = inspect.getsource(F._tensor_blocks_cpu_step)
marks = ["    present = ", "    squares = [0.0]", "    if check_finite and", "    scales = _ratio_scales", "    if big:\n        values", "    rows = [", "    c_n = [c * -lr", "    for j in reversed(big):", "    with np.errstate(all=\"ignore\"):\n        for j in on_host:\n            _host_update", "    increment_version(stepped)"]
for i, mk in enumerate(marks):
    assert src.count(mk) == 1, mk
    src = src.replace(mk, f"    _T.append(_time.perf_counter())\n" + mk)
src = src.replace("    ws.h_version = state_sum._version", "    ws.h_version = state_sum._version\n    _T.append(_time.perf_counter())")
g = F.__dict__; g["_T"] = []; g["_time"] = time
exec(src, g)
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(1024,1024), torch.nn.Tanh(), torch.nn.Linear(1024,1024))
for p in m.parameters(): p.grad = torch.randn_like(p)*1e-3
o = BlockMeanAdagrad(m.parameters(), lr=1e-2, partition="tensor")
o.step(); o.step()
flush = torch.empty(64*2**20//4)
names = ["start","gg dots","chkfin","host pass","ratio passes","sums/repair","coeffs","decay","add_two","host upd","end"]
for fl in (False, True):
    rows = []; tot=[]
    for _ in range(200):
        if fl: flush.fill_(1.0)
        g["_T"].clear(); t0=time.perf_counter(); o.step(); t1=time.perf_counter()
        T = g["_T"]; rows.append([b-a for a,b in zip([t0]+T, T+[t1])]); tot.append(t1-t0)
    med = [statistics.median(c)*1e6 for c in zip(*rows)]
    print("flushed" if fl else "b2b", "total %.0f us" % (statistics.median(tot)*1e6))
    print("  ", ", ".join(f"{n}:{v:.0f}" for n, v in zip(["pre"]+names[1:], med)))
