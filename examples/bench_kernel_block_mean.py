"""Benchmark: kernel_block_mean against evaluating the same kernel entries in the same chunks.

Every figure is a ratio against a baseline measured in the same run:

* ``bare_fwd``: evaluate ``kernel(x[rows], x)`` chunk by chunk (no reduction, no graph),
  the chunks kernel_block_mean would use (about 64 MB each);
* ``bare_fwd_bwd``: the same chunks with autograd on, each followed by backward of a
  weighted sum of its entries (the cheapest way to get hyperparameter gradients of all
  entries without keeping them);
* ``kbm_fwd`` / ``kbm_fwd_bwd``: ``kernel_block_mean`` (forward; forward plus backward of
  a scalar of the result). The fused path is used for RBF / Matern, the generic path
  for the others (and for ``*-generic`` cases, forced with ``fused=False``).

Each case runs in a fresh subprocess so its peak resident memory can be reported.
Output: JSON lines on stdout, and with ``--out`` also written to that file.

    python examples/bench_kernel_block_mean.py                 # n = 20,000
    python examples/bench_kernel_block_mean.py --smoke         # n = 2,000, seconds

``--k-sweep 10,100,...`` instead times RBF-ARD (values plus lengthscale backward) at several
numbers of blocks in one process, in interleaved rounds (the fastest of each), against one bare
forward of all entries measured in the same rounds: the issue-13 figures (the cost at k against
the cost at the smallest k, and against the bare forward). Wall and process CPU time are both
recorded; CPU time is steadier on a shared machine. Backward takes fixed random cotangents for
``lam`` and ``B`` (``grad_outputs``), so that only the engine is timed; ``*_loss`` fields time
instead the earlier sessions' loss ``lam.sum() + B.square().sum()``, whose own ``k x k`` work
(``B.square()`` and its backward, three ``k x k`` temporaries) is about 10-20 ms at ``k = 2000``.

    python examples/bench_kernel_block_mean.py --k-sweep 10,100,1000,2000,5000 --d 3

``--baseline FILE`` also times the ``kernel_block_mean`` of another version of the module
(for example ``git show REV:bma_gp/kernel_block_mean.py > old.py``) in the same run, so
before / after ratios share one baseline measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the shared _common module
from _common import check_out_file  # noqa: E402

CASES = ["rbf", "rbf-ard", "matern25-ard", "matern05", "rbf-ard-generic", "periodic"]


def _kernel(name: str, d: int):
    from gpytorch.kernels import MaternKernel, PeriodicKernel, RBFKernel, ScaleKernel

    base = {
        "rbf": lambda: RBFKernel(),
        "rbf-ard": lambda: RBFKernel(ard_num_dims=d),
        "rbf-ard-generic": lambda: RBFKernel(ard_num_dims=d),
        "matern25-ard": lambda: MaternKernel(nu=2.5, ard_num_dims=d),
        "matern05": lambda: MaternKernel(nu=0.5),
        "periodic": lambda: PeriodicKernel(),
    }[name]()
    return ScaleKernel(base)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _load_baseline(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_block_mean_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel_block_mean


def run_case(name: str, n: int, d: int, k: int, repeat: int, dtype_name: str, baseline: str | None = None) -> dict:
    import torch
    from gpytorch import settings as gpt_settings

    from bma_gp.kernel_block_mean import _CHUNK_BYTES, kernel_block_mean
    from bma_gp.partition_builders import kmeans_partition

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=dtype)
    partition = kmeans_partition(x, k, seed=0)
    kernel = _kernel(name, d).to(dtype)
    fused = False if name.endswith("generic") else None
    chunk = max(1, _CHUNK_BYTES // (n * x.element_size()))
    params = list(kernel.parameters())

    def bare_fwd():
        with torch.no_grad(), gpt_settings.lazily_evaluate_kernels(False):
            for a in range(0, n, chunk):
                kernel(x[a : a + chunk], x).to_dense()

    weight = torch.randn(chunk, n, dtype=dtype)

    def bare_fwd_bwd():
        with gpt_settings.lazily_evaluate_kernels(False):
            for a in range(0, n, chunk):
                values = kernel(x[a : a + chunk], x).to_dense()
                torch.autograd.grad(values, params, grad_outputs=weight[: values.shape[-2]])

    def kbm_fwd():
        with torch.no_grad():
            kernel_block_mean(kernel, x, partition, fused=fused)

    def kbm_fwd_bwd():
        op = kernel_block_mean(kernel, x, partition, fused=fused)
        loss = op.lam.sum() + op.B.square().sum()
        torch.autograd.grad(loss, params)

    fns = [bare_fwd, kbm_fwd, bare_fwd_bwd, kbm_fwd_bwd]
    if baseline is not None:
        base_kbm = _load_baseline(baseline)

        def base_fwd():
            with torch.no_grad():
                base_kbm(kernel, x, partition, fused=fused)

        def base_fwd_bwd():
            op = base_kbm(kernel, x, partition, fused=fused)
            torch.autograd.grad(op.lam.sum() + op.B.square().sum(), params)

        fns += [base_fwd, base_fwd_bwd]
    times = {f.__name__: _time(f, repeat) for f in fns}
    extra = {}
    if baseline is not None:
        extra = {
            "baseline_ratio_fwd": round(times["base_fwd"] / times["bare_fwd"], 3),
            "baseline_ratio_fwd_bwd_vs_bare_fwd": round(times["base_fwd_bwd"] / times["bare_fwd"], 3),
        }
    return {
        "case": name,
        "n": n,
        "d": d,
        "k": partition.num_blocks,
        "dtype": dtype_name,
        "chunk_rows": chunk,
        "threads": torch.get_num_threads(),
        **{f"t_{key}_s": round(val, 4) for key, val in times.items()},
        "ratio_fwd": round(times["kbm_fwd"] / times["bare_fwd"], 3),
        "ratio_fwd_bwd_vs_bare_fwd": round(times["kbm_fwd_bwd"] / times["bare_fwd"], 3),
        "ratio_fwd_bwd_vs_bare_fwd_bwd": round(times["kbm_fwd_bwd"] / times["bare_fwd_bwd"], 3),
        **extra,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_k_sweep(n: int, d: int, ks: list[int], rounds: int, dtype_name: str, device: str = "cpu") -> list[dict]:
    """RBF-ARD forward and forward + backward at each k, interleaved with the bare forward, best of ``rounds``.

    On CPU where numba is installed the tiles are reduced by its kernel (the default); forward + backward is then
    also timed with torch's tile reduction (``bma_gp._kernel_sums.jit.BACKEND = "torch"``) in the same rounds.
    On ``device="cuda"`` (``examples/benchmarks.py --device cuda``) the same inputs on the GPU, every timing
    between two synchronisations.
    """
    import torch
    from gpytorch import settings as gpt_settings

    from bma_gp._kernel_sums import jit
    from bma_gp.kernel_block_mean import _CHUNK_BYTES, kernel_block_mean
    from bma_gp.partition_builders import kmeans_partition

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(n, d, dtype=dtype).to(dev)
    kernel = _kernel("rbf-ard", d).to(device=dev, dtype=dtype)
    params = list(kernel.parameters())
    chunk = max(1, _CHUNK_BYTES // (n * x.element_size()))
    partitions = {k: kmeans_partition(x, k, seed=0) for k in ks}

    def bare_fwd():
        with torch.no_grad(), gpt_settings.lazily_evaluate_kernels(False):
            for a in range(0, n, chunk):
                kernel(x[a : a + chunk], x).to_dense()

    def kbm_fwd(partition):
        with torch.no_grad():
            kernel_block_mean(kernel, x, partition)

    gen = torch.Generator().manual_seed(1)
    cotangents = {
        k: (
            torch.randn(p.num_blocks, generator=gen, dtype=dtype).to(dev),
            torch.randn(p.num_blocks, p.num_blocks, generator=gen, dtype=dtype).to(dev),
        )
        for k, p in partitions.items()
    }

    def kbm_fwd_bwd(partition, k):  # values plus lengthscale backward, with fixed cotangents: the engine alone
        op = kernel_block_mean(kernel, x, partition)
        torch.autograd.grad((op.lam, op.B), params, grad_outputs=cotangents[k])

    def kbm_fwd_bwd_loss(partition):  # the same through a scalar loss, with its own k x k work (earlier sessions)
        op = kernel_block_mean(kernel, x, partition)
        torch.autograd.grad(op.lam.sum() + op.B.square().sum(), params)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, *args) -> tuple[float, float]:
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn(*args)
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    backends = ["numba", "torch"] if jit.usable(dev, dtype) else ["torch"]
    bare_fwd(), kbm_fwd_bwd(partitions[ks[0]], ks[0])  # warm-up (and numba's first call)
    best: dict[tuple, tuple[float, float]] = {}

    def keep(key, value):
        old = best.get(key, (float("inf"), float("inf")))
        best[key] = (min(old[0], value[0]), min(old[1], value[1]))

    for _ in range(rounds):
        keep(("bare",), timed(bare_fwd))
        for k in ks:
            keep(("fwd", k), timed(kbm_fwd, partitions[k]))
            keep(("fwd_bwd", k), timed(kbm_fwd_bwd, partitions[k], k))
            keep(("fwd_bwd_loss", k), timed(kbm_fwd_bwd_loss, partitions[k]))
            if len(backends) > 1:
                jit.BACKEND = "torch"
                try:
                    keep(("fwd_bwd_torch", k), timed(kbm_fwd_bwd, partitions[k], k))
                finally:
                    jit.BACKEND = "numba"
    bare_wall, bare_cpu = best[("bare",)]
    first_wall, first_cpu = best[("fwd_bwd", ks[0])]
    out = []
    for k in ks:
        (fw, fc), (bw, bc) = best[("fwd", k)], best[("fwd_bwd", k)]
        out.append(
            {
                "bench": "kernel_k_sweep",
                "case": "rbf-ard",
                "n": n,
                "d": d,
                "k": partitions[k].num_blocks,
                "k_requested": k,
                "k_first": ks[0],
                "dtype": dtype_name,
                "device": str(dev),
                "threads": torch.get_num_threads(),
                "rounds": rounds,
                "t_bare_fwd_s": round(bare_wall, 4),
                "t_kbm_fwd_s": round(fw, 4),
                "t_kbm_fwd_bwd_s": round(bw, 4),
                "cpu_bare_fwd_s": round(bare_cpu, 4),
                "cpu_kbm_fwd_s": round(fc, 4),
                "cpu_kbm_fwd_bwd_s": round(bc, 4),
                "ratio_fwd_bwd_vs_bare_fwd": round(bw / bare_wall, 3),
                "ratio_fwd_bwd_vs_first_k": round(bw / first_wall, 3),
                "cpu_ratio_fwd_bwd_vs_bare_fwd": round(bc / bare_cpu, 3),
                "cpu_ratio_fwd_bwd_vs_first_k": round(bc / first_cpu, 3),
                "t_kbm_fwd_bwd_loss_s": round(best[("fwd_bwd_loss", k)][0], 4),
                "ratio_fwd_bwd_loss_vs_first_k": round(
                    best[("fwd_bwd_loss", k)][0] / best[("fwd_bwd_loss", ks[0])][0], 3
                ),
                "tile_backend": backends[0],
            }
        )
        if ("fwd_bwd_torch", k) in best:
            tw = best[("fwd_bwd_torch", k)][0]
            out[-1]["t_kbm_fwd_bwd_torch_s"] = round(tw, 4)
            out[-1]["ratio_fwd_bwd_vs_first_k_torch"] = round(tw / best[("fwd_bwd_torch", ks[0])][0], 3)
    return out


def _block_counts(text: str) -> list[int]:
    """``--k-sweep``: comma-separated integers >= 1 (argparse names the option in front of the message)."""
    try:
        ks = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 100,500, got {text!r}") from None
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of blocks >= 1, got {text!r}")
    repeated = sorted({str(v) for v in ks if ks.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return ks


def _case_names(text: str) -> list[str]:
    """``--cases``: a comma-separated list of ``CASES``."""
    names = text.split(",")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(CASES)}")
    repeated = sorted({str(v) for v in names if names.count(v) > 1})
    if repeated:  # the same runs twice, in two rows
        raise argparse.ArgumentTypeError(f"{','.join(repeated)} given twice in {text!r}; name each once")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--k", type=int, default=None, help="blocks of each case (default 500; --smoke: 50)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--cases", type=_case_names, default=None, help=f"comma-separated, of {','.join(CASES)} (default: all)"
    )
    parser.add_argument("--smoke", action="store_true", help="n = 2,000, k = 50, one repeat")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every case")
    parser.add_argument(
        "--baseline",
        default=None,
        help="a file with another version of bma_gp/kernel_block_mean.py, timed in the same run",
    )
    parser.add_argument(
        "--k-sweep",
        type=_block_counts,
        default=None,
        help="comma-separated k: time RBF-ARD at each k in one process instead of the cases",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args(argv)
    k_given = args.k is not None  # before --smoke's default: the sweep takes its k from --k-sweep
    if args.smoke:  # smaller defaults: an option given explicitly still wins
        parser.set_defaults(n=2_000, k=50, repeat=1)
        args = parser.parse_args(argv)
    if args.k is None:
        args.k = 500
    for option, value in (
        ("--n", args.n),
        ("--d", args.d),
        ("--k", args.k),
        ("--repeat", args.repeat),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:  # a usage error, not a traceback or inf / nan after the run
            parser.error(f"{option} must be at least 1, got {value}")
    check_out_file(parser, args.out)  # before the cases run: the JSON lines are appended last
    # k > n failed in kmeans_partition, in each case's subprocess (--smoke: the sweep keeps the k up to n / 4)
    k_option, k_max = ("--k-sweep", max(args.k_sweep)) if args.k_sweep else ("--k", args.k)
    if k_max > args.n and not (args.k_sweep and args.smoke):
        parser.error(f"{k_option}: at most --n {args.n} blocks (a block holds at least one point), got {k_max}")
    if args.k_sweep is not None:
        for option, given in (("--k", k_given), ("--cases", args.cases), ("--baseline", args.baseline)):
            if given:  # the sweep times RBF-ARD at the current version only: these were ignored
                parser.error(
                    f"{option}: an option of the per-case runs, not of --k-sweep (which times RBF-ARD of this "
                    "version at the k it lists)"
                )
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        ks = sorted(args.k_sweep)
        if args.smoke:
            ks = [k for k in ks if k <= args.n // 4] or [10]
        header = {
            "benchmark": "kernel_k_sweep",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(header), flush=True)
        lines = [json.dumps(header)]
        for rec in run_k_sweep(args.n, args.d, ks, max(2, args.repeat), args.dtype):
            lines.append(json.dumps(rec))
            print(lines[-1], flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write("\n".join(lines) + "\n")
        return
    if args.case is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(
            json.dumps(run_case(args.case, args.n, args.d, args.k, args.repeat, args.dtype, args.baseline)), flush=True
        )
        return

    header = {
        "benchmark": "kernel_block_mean",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    lines = [json.dumps(header)]
    print(lines[0], flush=True)
    for name in args.cases or CASES:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--case",
            name,
            "--n",
            str(args.n),
            "--d",
            str(args.d),
            "--k",
            str(args.k),
            "--repeat",
            str(args.repeat),
            "--dtype",
            args.dtype,
        ]
        if args.baseline:
            cmd += ["--baseline", os.path.abspath(args.baseline)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            line = json.dumps({"case": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            line = done.stdout.strip().splitlines()[-1]
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
