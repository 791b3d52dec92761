import torch, time, statistics, sys
torch.set_num_threads(int(sys.argv[1]))
from bma_gp.optim import BlockMeanAdagrad, _cpu_kernels
print("auto chunk", _cpu_kernels.ratio_chunk_numel(torch.float32), _cpu_kernels._l2_bytes(), _cpu_kernels._parallel_call_seconds())
torch.manual_seed(0)
def model():
    return torch.nn.Sequential(torch.nn.Linear(1024,1024), torch.nn.Tanh(), torch.nn.Linear(1024,1024))
res = {}
cfgs = {}
for name, chunk in [("auto", None), ("none", 0), ("2^16", 2**16), ("2^17", 2**17), ("2^18",2**18)]:
    m = model()
    for p in m.parameters(): p.grad = torch.randn_like(p)
    cfgs[name] = (chunk, BlockMeanAdagrad(m.parameters(), lr=1e-2), m)
m = model()
for p in m.parameters(): p.grad = torch.randn_like(p)
cfgs["adagrad"] = (None, torch.optim.Adagrad(m.parameters(), lr=1e-2), m)
for rnd in range(12):
    for name, (chunk, opt, m) in cfgs.items():
        _cpu_kernels.RATIO_CHUNK_NUMEL = chunk
        ts = []
        for _ in range(10):
            t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
        if rnd >= 2: res.setdefault(name, []).extend(ts)
base = statistics.median(res["adagrad"])
for k, v in res.items(): print(k, round(statistics.median(v)*1e3, 3), round(statistics.median(v)/base, 3))
