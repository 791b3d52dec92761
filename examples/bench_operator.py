"""Benchmark of the block mean operator's closed forms (issue 2 figures).

1. ``dense``: at n = 6,000 the block mean solve, inverse-square-root product and log-det against
   torch's dense Cholesky / eigh on the same matrix, in one run (ratios printed).
2. ``large``: n = 10,000,000, k = 1,000: solve + logdet + inverse-square-root product, wall time
   and peak resident memory, measured in a fresh subprocess so the peak belongs to this work alone.

Output: JSON lines on stdout (one per measurement) and a summary table.

    python examples/bench_operator.py                 # both parts, full size
    python examples/bench_operator.py --smoke         # seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bma_gp import BlockMeanLinearOperator, Partition


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_operator(n: int, k: int, seed: int, dtype=torch.float64, scattered: bool = True):
    gen = torch.Generator().manual_seed(seed)
    if scattered:
        labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
        labels = labels[torch.randperm(n, generator=gen)]
        partition = Partition.from_labels(labels, num_blocks=k)
    else:
        sizes = torch.full((k,), n // k)
        sizes[: n - int(sizes.sum())] += 1
        partition = Partition.from_sizes(sizes)
    root = torch.randn(k, k, generator=gen, dtype=dtype)
    lam = torch.rand(k, generator=gen, dtype=dtype) + 0.5
    B = root @ root.T / k + 0.1
    return lam, B, partition


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def dense_comparison(n: int, k: int, repeats: int) -> list[dict]:
    lam, B, partition = random_operator(n, k, seed=0)
    x = torch.randn(n, 1, dtype=torch.float64)
    A = BlockMeanLinearOperator(lam, B, partition).to_dense()

    def fresh():  # a new operator every call: no cached factorisation is reused
        return BlockMeanLinearOperator(lam, B, partition)

    dense = {
        "solve": lambda: torch.cholesky_solve(x, torch.linalg.cholesky(A)),
        "logdet": lambda: 2 * torch.linalg.cholesky(A).diagonal().log().sum(),
        "inv_sqrt_matmul": lambda: (lambda e, V: V @ (e.rsqrt().unsqueeze(-1) * (V.T @ x)))(*torch.linalg.eigh(A)),
    }
    blockmean = {
        "solve": lambda: fresh().solve(x),
        "logdet": lambda: fresh().logdet(),
        "inv_sqrt_matmul": lambda: fresh().sqrt_inv_matmul(x),
    }
    records = []
    for name in dense:
        torch.testing.assert_close(blockmean[name](), dense[name](), rtol=1e-6, atol=1e-8)
        t_dense = best_of(dense[name], max(1, repeats // 5) if name != "inv_sqrt_matmul" else 1)
        t_bm = best_of(blockmean[name], repeats)
        rec = {"bench": "operator_vs_dense", "op": name, "n": n, "k": k, "dtype": "float64",
               "dense_s": t_dense, "blockmean_s": t_bm, "speedup": t_dense / t_bm}
        emit(rec)
        records.append(rec)
    return records


def large_child(n: int, k: int, repeats: int) -> None:
    """Runs in a subprocess: times solve + logdet + inverse-square-root product, reports peak RSS."""
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lam, B, partition = random_operator(n, k, seed=1, scattered=True)
    x = torch.randn(n, dtype=torch.float64)

    def work():
        op = BlockMeanLinearOperator(lam, B, partition)
        y = op.solve(x)
        ld = op.logdet()
        z = op.sqrt_inv_matmul(x)
        return y, ld, z

    times = {}
    t_total = []
    for _ in range(repeats):
        op = BlockMeanLinearOperator(lam, B, partition)
        t0 = time.perf_counter()
        op.solve(x)
        t1 = time.perf_counter()
        op.logdet()
        t2 = time.perf_counter()
        op.sqrt_inv_matmul(x)
        t3 = time.perf_counter()
        t_total.append(t3 - t0)
        times = {"solve_s": t1 - t0, "logdet_s": t2 - t1, "inv_sqrt_matmul_s": t3 - t2} if t3 - t0 <= min(
            t_total) else times
    y, ld, z = work()
    check = float((BlockMeanLinearOperator(lam, B, partition) @ y - x).abs().max())
    emit({"bench": "large", "n": n, "k": k, "dtype": "float64", "labels": "scattered", "total_s": min(t_total),
          **times, "residual_max": check, "threads": torch.get_num_threads(),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "baseline_rss_mb": base_rss})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    parser.add_argument("--part", choices=["all", "dense", "large"], default="all")
    parser.add_argument("--_child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        large_child(*args._child)
        return 0
    dense_n, dense_k, large_n, large_k, reps = (6000, 60, 10_000_000, 1000, 5)
    if args.smoke:
        dense_n, dense_k, large_n, large_k, reps = (300, 10, 100_000, 50, 2)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.part in ("all", "dense"):
        records = dense_comparison(dense_n, dense_k, reps)
        print(f"\n| op (n={dense_n}, k={dense_k}) | dense s | block mean s | speedup |")
        print("|---|---|---|---|")
        for r in records:
            print(f"| {r['op']} | {r['dense_s']:.4f} | {r['blockmean_s']:.6f} | {r['speedup']:.0f}x |")
        print(flush=True)
    if args.part in ("all", "large"):
        out = subprocess.run([sys.executable, __file__, "--_child", str(large_n), str(large_k), str(reps)],
                             check=True, capture_output=True, text=True)
        sys.stdout.write(out.stdout)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\nn={large_n:,} k={large_k}: solve + logdet + inverse-sqrt product {rec['total_s']:.3f} s "
              f"(solve {rec['solve_s']:.3f}, logdet {rec['logdet_s']:.3f}, inv-sqrt {rec['inv_sqrt_matmul_s']:.3f}); "
              f"peak RSS {rec['peak_rss_mb']:.0f} MB (after importing torch: {rec['baseline_rss_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
