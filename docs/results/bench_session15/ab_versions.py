import sys, time, statistics, torch
sys.path.insert(0, "/work/main/examples")
from bench_optimizer import load_baseline, build_model
from bma_gp.optim import BlockMeanAdagrad
Old = load_baseline("/tmp/old")
torch.manual_seed(0)
runs = {}
for name, cls in (("new", BlockMeanAdagrad), ("old", Old), ("new2", BlockMeanAdagrad), ("old2", Old)):
    m = build_model(1024, 2)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
        if sys.argv[1] == "zeros": p.grad.view(-1)[::100] = 0.0
    o = cls(m.parameters(), lr=1e-2, partition="tensor"); o.step(); o.step()
    runs[name] = (o, [])
for r in range(40):
    items = list(runs.items()) if r % 2 else list(runs.items())[::-1]
    for name, (o, ts) in items:
        for _ in range(10):
            t = time.perf_counter(); o.step(); ts.append(time.perf_counter() - t)
print(sys.argv[1], {k: round(statistics.median(v) * 1e3, 3) for k, (o, v) in runs.items()})
