"""Experiments on the eager CPU step of BlockMeanAdagrad (ratio form, one block per tensor), on two 2^20-entry
float32 tensors, against torch.optim.Adagrad on the same sizes in the same process (docs/optimizer.md, "Twelfth
session").

    python docs/results/bench_session12/eager_experiments.py ops            # eager_ops.txt
    python docs/results/bench_session12/eager_experiments.py chunks [--flush]  # eager_chunks.txt
    python docs/results/bench_session12/eager_experiments.py order          # eager_order.txt

``ops`` times each operation of the step in the step's order; ``chunks`` runs the operations on chunks of
2^15 ... 2^20 entries; ``order`` compares three orders of the operations (A: the step's own; B: tensors
last-read-first and the sums of n right after the fused kernel; C: B with the sums between the quotient and its
reciprocal square root).
"""

import argparse
import collections
import time

import torch

from bma_gp.optim import _cpu_kernels as K

N = 2**20
SCALE = 2.0**30


def buffers():
    torch.manual_seed(0)
    return {
        "g": [torch.randn(N) for _ in range(2)],
        "h": [torch.rand(N) + 1 for _ in range(2)],
        "n": [torch.empty(N) for _ in range(2)],
        "r": [torch.empty(N) for _ in range(2)],
        "p": [torch.randn(N) for _ in range(2)],
    }


B = buffers()
g, h, n, r, p = (B[k] for k in "ghnrp")
one = torch.ones(())
d = torch.empty(64, 4)


def fused(j, lo=0, hi=N):
    torch._fused_adagrad_(
        [n[j][lo:hi]], [g[j][lo:hi]], [h[j][lo:hi]], [one], lr=-SCALE, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
        maximize=False,
    )  # fmt: skip


def update(j):
    K.add_two(p[j], n[j], r[j], -1e-3 / SCALE, -1e-3 / SCALE**0.5)


def adagrad():
    params = [torch.nn.Parameter(torch.randn(N)) for _ in range(2)]
    for q, gg in zip(params, g):
        q.grad = gg.clone()
    return torch.optim.Adagrad(params, lr=0.01)


def run(configs, rounds, flush=None, alternate=False):
    """Median ms per call of each configuration, interleaved round by round (reversed every other round with
    ``alternate``); ``h`` is reset after every call, the first rounds are dropped."""
    res = collections.defaultdict(list)
    for rnd in range(rounds):
        order = configs if not alternate or rnd % 2 else configs[::-1]
        for name, f in order:
            if flush is not None:
                flush.fill_(1.0)
            s = time.perf_counter()
            f()
            res[name].append(time.perf_counter() - s)
            for hh in h:
                hh.fill_(1.0)
    skip = 2 if rounds < 20 else 3
    return {k: sorted(v[skip:])[len(v[skip:]) // 2] * 1e3 for k, v in res.items()}


OPS = [
    ("dotgg", lambda j: torch.dot(g[j], g[j], out=d[0, 0])),
    ("zero", lambda j: n[j].zero_()),
    ("fadagrad", fused),
    ("div", lambda j: torch.div(g[j], n[j], out=r[j])),
    ("rsqrt", lambda j: r[j].rsqrt_()),
    ("dotgr", lambda j: torch.dot(g[j], r[j], out=d[0, 1])),
    ("sumn", lambda j: torch.sum(n[j], 0, out=d[0, 2])),
    ("dotnn", lambda j: torch.dot(n[j], n[j], out=d[0, 3])),
]


def ops():
    acc = collections.defaultdict(list)

    def timed(name, f, j):
        s = time.perf_counter()
        f(j)
        acc[name].append(time.perf_counter() - s)

    for _ in range(60):
        total = time.perf_counter()
        for j in range(2):
            for name, f in OPS:
                timed(name, f, j)
        for j in (1, 0):
            timed("add_two", update, j)
        acc["total"].append(time.perf_counter() - total)
        for hh in h:
            hh.fill_(1.0)
    for k, v in acc.items():
        v = sorted(v[10:])
        print(f"{k:10s} {1e3 * v[len(v) // 2]:.3f} ms")


def chunked_step(size):
    for j in range(2):
        torch.dot(g[j], g[j], out=d[0, 0])
        for c, lo in enumerate(range(0, N, size)):
            hi = lo + size
            gg, nn, rr = g[j][lo:hi], n[j][lo:hi], r[j][lo:hi]
            nn.zero_()
            fused(j, lo, hi)
            torch.div(gg, nn, out=rr).rsqrt_()
            torch.dot(gg, rr, out=d[c, 1])
            torch.sum(nn, 0, out=d[c, 2])
            torch.dot(nn, nn, out=d[c, 3])
        d.tolist()
    for j in (1, 0):
        update(j)


def chunks(flush):
    opt = adagrad()
    sizes = [N, 2**19, 2**18, 2**17, 2**16, 2**15]
    configs = [("adagrad", opt.step)] + [(str(s), lambda s=s: chunked_step(s)) for s in sizes]
    out = run(configs, 12, torch.empty(16 * 2**20) if flush else None)
    print("  ".join(f"{k} {v:.3f}" for k, v in out.items()))


def chain(j, sums_first):
    n[j].zero_()
    fused(j)
    if sums_first:
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
        torch.div(g[j], n[j], out=r[j]).rsqrt_()
    else:
        torch.div(g[j], n[j], out=r[j])
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
        r[j].rsqrt_()
    torch.dot(g[j], r[j], out=d[j, 1])


def order_a():
    for j in range(2):
        torch.dot(g[j], g[j], out=d[j, 0])
    for j in range(2):
        n[j].zero_()
        fused(j)
        torch.div(g[j], n[j], out=r[j]).rsqrt_()
        torch.dot(g[j], r[j], out=d[j, 1])
        torch.sum(n[j], 0, out=d[j, 2])
        torch.dot(n[j], n[j], out=d[j, 3])
    d.tolist()
    for j in (1, 0):
        update(j)


def order_bc(sums_first):
    for j in range(2):
        torch.dot(g[j], g[j], out=d[j, 0])
    for j in (1, 0):
        chain(j, sums_first)
    d.tolist()
    for j in (0, 1):
        update(j)


def order():
    opt = adagrad()
    configs = [("adagrad", opt.step), ("A", order_a), ("B", lambda: order_bc(True)), ("C", lambda: order_bc(False))]
    out = run(configs, 30, alternate=True)
    print("  ".join(f"{k} {v:.3f}" for k, v in out.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["ops", "chunks", "order"])
    parser.add_argument("--flush", action="store_true", help="chunks: write 64 MB before every call (untimed)")
    args = parser.parse_args()
    {"ops": ops, "chunks": lambda: chunks(args.flush), "order": order}[args.mode]()
