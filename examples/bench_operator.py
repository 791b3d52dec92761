"""Benchmark of the block mean operator's closed forms (issue 2 figures).

1. ``dense``: at n = 6,000 the block mean solve, inverse-square-root product and log-det against
   torch's dense Cholesky / eigh on the same matrix, in one run (ratios printed).
2. ``large``: n = 10,000,000, k = 1,000: solve + logdet + inverse-square-root product, wall time
   and peak resident memory, measured in a fresh subprocess so the peak belongs to this work alone.
3. ``sweep`` (issue 5): matvec, solve, logdet and inverse-square-root product over n = 10^4 .. 10^7,
   k = 10 .. 4,000, contiguous and scattered labels, float32 and float64, each as a ratio to one
   elementwise pass over an n-vector (``x * 2``, the memory-bandwidth floor) timed in turn with the
   matvec in the same process; one subprocess per n, whose peak resident memory is reported beside
   its rows.
4. ``matvec`` (issue 5): the matvec alone at one n (default 10^7) over the same k, layouts and dtypes,
   interleaved with the floor and, with ``--baseline REV``, with the operator and partition modules
   as of git revision REV loaded side by side (before / after in one process).

Output: JSON lines on stdout (one per measurement) and a summary table.

    python examples/bench_operator.py                 # both parts, full size
    python examples/bench_operator.py --smoke         # seconds
    python examples/bench_operator.py --part sweep    # the issue-5 grid (several minutes)
    python examples/bench_operator.py --part sweep --ns 10000000 --ks 10,4000   # a corner of it
    python examples/bench_operator.py --part matvec --baseline 6c1013c --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. VmHWM belongs to this address space alone; the
    rusage figure can carry the parent's peak across fork + exec, so it is only the fallback."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        rec = {
            "bench": "operator_vs_dense",
            "op": name,
            "n": n,
            "k": k,
            "dtype": "float64",
            "dense_s": t_dense,
            "blockmean_s": t_bm,
            "speedup": t_dense / t_bm,
        }
        emit(rec)
        records.append(rec)
    return records


def large_child(n: int, k: int, repeats: int) -> None:
    """Runs in a subprocess: times solve + logdet + inverse-square-root product, reports peak RSS."""
    base_rss = peak_rss_mb()
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
        times = (
            {"solve_s": t1 - t0, "logdet_s": t2 - t1, "inv_sqrt_matmul_s": t3 - t2}
            if t3 - t0 <= min(t_total)
            else times
        )
    y, ld, z = work()
    check = float((BlockMeanLinearOperator(lam, B, partition) @ y - x).abs().max())
    emit(
        {
            "bench": "large",
            "n": n,
            "k": k,
            "dtype": "float64",
            "labels": "scattered",
            "total_s": min(t_total),
            **times,
            "residual_max": check,
            "threads": torch.get_num_threads(),
            "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": base_rss,
        }
    )


SWEEP_KS = (10, 100, 1000, 4000)


def sweep_child(n: int, repeats: int, ks: tuple[int, ...]) -> None:
    """One n: every k, layout and dtype; matvec always, the k^3 operations where k^3 stays affordable."""
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, dtype=dtype)
        for k in ks:
            if k > n // 2:
                continue
            for scattered in (False, True):
                lam, B, partition = random_operator(n, k, seed=k, dtype=dtype, scattered=scattered)
                op = BlockMeanLinearOperator(lam, B, partition)
                ops = {"matvec": lambda: op @ x}
                if k <= 1000 or n == 1_000_000:
                    ops.update(
                        {
                            "solve": lambda: BlockMeanLinearOperator(lam, B, partition).solve(x),
                            "logdet": lambda: BlockMeanLinearOperator(lam, B, partition).logdet(),
                            "inv_sqrt_matmul": lambda: BlockMeanLinearOperator(lam, B, partition).sqrt_inv_matmul(x),
                        }
                    )
                # the floor is timed in turn with the matvec (best of the same rounds): on a shared machine a
                # floor measured once per dtype can land in a quiet or a busy moment of its own
                best = interleaved({"floor": lambda: x * 2.0, "matvec": ops.pop("matvec")}, repeats)
                floor = best["floor"]
                for name, fn in [("matvec", None), *ops.items()]:
                    t = best["matvec"] if fn is None else best_of(fn, repeats if k <= 1000 else 1)
                    emit(
                        {
                            "bench": "operator_sweep",
                            "op": name,
                            "n": n,
                            "k": k,
                            "labels": "scattered" if scattered else "contiguous",
                            "dtype": str(dtype).split(".")[-1],
                            "seconds": t,
                            "floor_s": floor,
                            "ratio_to_floor": t / floor,
                            "peak_rss_mb": peak_rss_mb(),
                        }
                    )


def run_sweep(ns, repeats: int, ks, threads: int | None = None) -> list[dict]:
    records = []
    for n in ns:
        cmd = [sys.executable, __file__, "--_sweep", str(n), str(repeats), ",".join(map(str, ks))]
        out = subprocess.run(cmd + (["--threads", str(threads)] if threads else []), capture_output=True, text=True)
        sys.stdout.write(out.stdout)  # the records of a child that failed part way are kept
        sys.stdout.flush()
        records += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0:  # say why: the suite's log showed only the exit status before
            sys.stderr.write(f"n = {n}: child exited {out.returncode}; its stderr ends:\n{out.stderr[-3000:]}\n")
            raise subprocess.CalledProcessError(out.returncode, cmd)
    print("\n| n | k | labels | dtype | matvec / floor | solve s | logdet s | inv-sqrt product s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for r in records:
        rows.setdefault((r["n"], r["k"], r["labels"], r["dtype"]), {})[r["op"]] = r
    for (n, k, labels, dtype), ops in rows.items():

        def sec(name):
            return f"{ops[name]['seconds']:.4f}" if name in ops else "-"

        peak = max(r["peak_rss_mb"] for r in ops.values())
        print(
            f"| {n:,} | {k} | {labels} | {dtype} | {ops['matvec']['ratio_to_floor']:.2f} | {sec('solve')} | "
            f"{sec('logdet')} | {sec('inv_sqrt_matmul')} | {peak:.0f} |"
        )
    return records


def load_baseline(rev: str):
    """``BlockMeanLinearOperator`` as of git revision ``rev`` (with that revision's ``Partition``),
    loaded as separate modules beside the current ones."""
    root = Path(__file__).resolve().parents[1]

    def module(name: str, path: str, replace: tuple[str, str] | None = None):
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        if replace is not None:
            source = source.replace(*replace)
        mod = types.ModuleType(name)
        mod.__file__ = f"{rev}:{path}"
        sys.modules[name] = mod
        exec(compile(source, mod.__file__, "exec"), mod.__dict__)
        return mod

    part = module("_baseline_partition", "bma_gp/partition.py")
    op = module(
        "_baseline_operator",
        "bma_gp/block_mean_linear_operator.py",
        ("from bma_gp.partition import Partition", "from _baseline_partition import Partition"),
    )
    return op.BlockMeanLinearOperator, part.Partition


def interleaved(fns: dict, rounds: int) -> dict:
    """Best time of each function over ``rounds`` rounds that call every function once, in turn."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matvec_compare(n: int, ks, rounds: int, baseline: str | None) -> list[dict]:
    """Matvec / floor at one n for every k, layout and dtype; the baseline revision beside it."""
    old = load_baseline(baseline) if baseline else None
    records = []
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, dtype=dtype)
        for k in ks:
            for scattered in (False, True):
                lam, B, partition = random_operator(n, k, seed=k, dtype=dtype, scattered=scattered)
                op = BlockMeanLinearOperator(lam, B, partition)
                fns = {"floor": lambda: x * 2.0, "matvec": lambda: op @ x}
                if old is not None:
                    old_op = old[0](lam, B, old[1].from_labels(partition.labels, partition.num_blocks))
                    new = op @ x  # summation orders differ (reshaped sums are pairwise): compare to the scale
                    scale = float(new.abs().max()) * (1e-4 if dtype == torch.float32 else 1e-10)
                    torch.testing.assert_close(old_op @ x, new, rtol=0, atol=scale)
                    fns["baseline"] = lambda: old_op @ x
                best = interleaved(fns, rounds)
                rec = {
                    "bench": "matvec",
                    "n": n,
                    "k": k,
                    "labels": "scattered" if scattered else "contiguous",
                    "dtype": str(dtype).split(".")[-1],
                    "threads": torch.get_num_threads(),
                    "floor_s": best["floor"],
                    "seconds": best["matvec"],
                    "ratio_to_floor": best["matvec"] / best["floor"],
                }
                if old is not None:
                    rec.update(
                        {
                            "baseline": baseline,
                            "baseline_s": best["baseline"],
                            "baseline_ratio_to_floor": best["baseline"] / best["floor"],
                            "speedup": best["baseline"] / best["matvec"],
                        }
                    )
                emit(rec)
                records.append(rec)
    head = "| k | labels | dtype | matvec / floor |" + (f" {baseline} / floor | speedup |" if baseline else "")
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in records:
        row = f"| {r['k']} | {r['labels']} | {r['dtype']} | {r['ratio_to_floor']:.2f} |"
        if baseline:
            row += f" {r['baseline_ratio_to_floor']:.2f} | {r['speedup']:.1f}x |"
        print(row)
    return records


def _sizes(text: str) -> tuple[int, ...]:
    """``--ns`` / ``--ks``: comma-separated integers >= 1 (argparse names the option in front of the message)."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 10,100, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    repeated = sorted({str(v) for v in sizes if sizes.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, finishes in seconds")
    parser.add_argument(
        "--part",
        choices=["all", "dense", "large", "sweep", "matvec"],
        default="all",
        help="all = dense + large (the issue-2 figures); sweep = the issue-5 grid; "
        "matvec = the matvec alone at one n, optionally against --baseline",
    )
    parser.add_argument("--ns", type=_sizes, help="sweep: comma-separated n (default 10^4 .. 10^7); matvec: the one n")
    parser.add_argument("--ks", type=_sizes, help="sweep / matvec: comma-separated k (default 10,100,1000,4000)")
    parser.add_argument("--baseline", metavar="REV", help="matvec: also time the operator of git revision REV")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (the sweep's subprocesses too)")
    parser.add_argument("--_child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_sweep", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:  # 0 was ignored, < 0 a traceback from torch
        parser.error(f"--threads must be at least 1, got {args.threads}")
    given = [option for option, value in (("--ns", args.ns), ("--ks", args.ks)) if value]
    if given and args.part not in ("sweep", "matvec"):  # were ignored: the other parts have fixed sizes
        parser.error(f"{' and '.join(given)}: only with --part sweep or matvec (--part {args.part} has fixed sizes)")
    if args.baseline and args.part != "matvec":  # was ignored
        parser.error(f"--baseline: only with --part matvec, not --part {args.part}")
    if args.part == "matvec" and args.ns and len(args.ns) > 1:  # the first was timed, the others ignored
        parser.error(f"--ns: --part matvec times one n, got {len(args.ns)} ({','.join(map(str, args.ns))})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        large_child(*args._child)
        return 0
    if args._sweep:
        n, repeats, ks = args._sweep
        sweep_child(int(n), int(repeats), tuple(int(k) for k in ks.split(",")))
        return 0
    ks, ns = args.ks, args.ns
    if args.part == "sweep":
        default_ns, default_ks = (
            ((10_000, 100_000), (10, 100)) if args.smoke else ((10_000, 100_000, 1_000_000, 10_000_000), SWEEP_KS)
        )
        run_sweep(ns or default_ns, 2 if args.smoke else 3, ks or default_ks, args.threads)
        return 0
    if args.part == "matvec":
        n = ns[0] if ns else (100_000 if args.smoke else 10_000_000)
        print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
        matvec_compare(n, ks or ((10, 100) if args.smoke else SWEEP_KS), 2 if args.smoke else 5, args.baseline)
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
        out = subprocess.run(
            [sys.executable, __file__, "--_child", str(large_n), str(large_k), str(reps)],
            check=True,
            capture_output=True,
            text=True,
        )
        sys.stdout.write(out.stdout)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"\nn={large_n:,} k={large_k}: solve + logdet + inverse-sqrt product {rec['total_s']:.3f} s "
            f"(solve {rec['solve_s']:.3f}, logdet {rec['logdet_s']:.3f}, inv-sqrt {rec['inv_sqrt_matmul_s']:.3f}); "
            f"peak RSS {rec['peak_rss_mb']:.0f} MB (after importing torch: {rec['baseline_rss_mb']:.0f} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
