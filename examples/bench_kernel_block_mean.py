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
                kernel(x[a:a + chunk], x).to_dense()

    weight = torch.randn(chunk, n, dtype=dtype)

    def bare_fwd_bwd():
        with gpt_settings.lazily_evaluate_kernels(False):
            for a in range(0, n, chunk):
                values = kernel(x[a:a + chunk], x).to_dense()
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
        extra = {"baseline_ratio_fwd": round(times["base_fwd"] / times["bare_fwd"], 3),
                 "baseline_ratio_fwd_bwd_vs_bare_fwd": round(times["base_fwd_bwd"] / times["bare_fwd"], 3)}
    return {
        "case": name, "n": n, "d": d, "k": partition.num_blocks, "dtype": dtype_name, "chunk_rows": chunk,
        "threads": torch.get_num_threads(),
        **{f"t_{key}_s": round(val, 4) for key, val in times.items()},
        "ratio_fwd": round(times["kbm_fwd"] / times["bare_fwd"], 3),
        "ratio_fwd_bwd_vs_bare_fwd": round(times["kbm_fwd_bwd"] / times["bare_fwd"], 3),
        "ratio_fwd_bwd_vs_bare_fwd_bwd": round(times["kbm_fwd_bwd"] / times["bare_fwd_bwd"], 3),
        **extra,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--smoke", action="store_true", help="n = 2,000, k = 50, one repeat")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every case")
    parser.add_argument("--baseline", default=None,
                        help="a file with another version of bma_gp/kernel_block_mean.py, timed in the same run")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    if args.smoke:
        args.n, args.k, args.repeat = 2_000, 50, 1
    if args.case is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case, args.n, args.d, args.k, args.repeat, args.dtype, args.baseline)),
              flush=True)
        return

    header = {"benchmark": "kernel_block_mean", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(),
              "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    lines = [json.dumps(header)]
    print(lines[0], flush=True)
    for name in args.cases.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--n", str(args.n), "--d", str(args.d),
               "--k", str(args.k), "--repeat", str(args.repeat), "--dtype", args.dtype]
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
